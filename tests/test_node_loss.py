"""Node loss on a real two-node Ray cluster on this machine: the worker node is SIGKILLed mid-run.

A head and worker nodes (`ray start`, logical GPUs, own ports and token) are started and stopped by the
test by their own process ids; a kill sends SIGKILL to every process of the node, by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port, write_manifest
from tests.fault_timing import baseline, report
from tests.test_robustness import assert_exactly_one_ok, raw_results, rows_of

RAY = str(Path(sys.executable).with_name("ray"))
PRIOR_LABEL = "kandinsky-render/stage=prior"
DECODER_LABEL = "kandinsky-render/stage=decoder"
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")  # fmt: skip


class Cluster:
    """A head (2 logical GPUs, label `PRIOR_LABEL`) and worker nodes added and killed by the test."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Its own temp root (RAY_TMPDIR): `--address auto` finds this head's record there and nowhere else.
        self.env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        # A dead node is noticed within a few seconds rather than Ray's default tens of seconds.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000")
        self.env.update(RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
        self.gcs = f"127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        self.workers = 0

    def _start(self, name: str, args: list[str], temp_dir: Path) -> subprocess.Popen:
        ports = [item for flag in NODE_PORTS for item in (flag, str(free_port()))]
        command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
        command += [*args, *ports]
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the node writes it until it stops
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.nodes.append(node)
        return node

    def start_head(self) -> None:
        head = ["--head", "--port", self.gcs.split(":")[1], "--num-cpus", "4", "--num-gpus", "2", "--labels",
                PRIOR_LABEL, "--include-dashboard", "false", "--ray-client-server-port", str(free_port())]  # fmt: skip
        self._start("head", head, self.root / "ray")
        self.wait_nodes(1)

    def add_worker(self) -> subprocess.Popen:
        """A worker node with 2 logical GPUs and the decoder label, once the head counts it alive."""
        self.workers += 1
        alive = self.alive()
        args = ["--address", self.gcs, "--num-cpus", "2", "--num-gpus", "2", "--labels", DECODER_LABEL]
        node = self._start(f"worker{self.workers}", args, self.root / f"w{self.workers}")
        self.wait_nodes(alive + 1)
        return node

    def alive(self) -> int:
        code = "import ray, json; ray.init(address='auto'); print(json.dumps(sum(n['Alive'] for n in ray.nodes())))"
        probe = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() != count:
            if time.monotonic() > deadline or self.nodes[-1].poll() is not None:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.logs.glob("*.log")))
                pytest.fail(f"the cluster did not reach {count} live node(s):\n{logs}")
            time.sleep(1)

    def pids(self, node: subprocess.Popen) -> set[int]:
        """Every process of ``node`` now."""
        return {node.pid, *(child.pid for child in psutil.Process(node.pid).children(recursive=True))}

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL every process of ``node`` (its `ray start`, raylet, agents and workers) by pid, at once."""
        try:
            victims = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = []
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        node.wait(timeout=30)

    def stop(self) -> None:
        """Worker nodes first, then the head: SIGTERM to each `ray start --block` (it stops its own processes)."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.terminate()
                try:
                    node.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)  # only that node's own session (start_new_session)
                    node.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One head for the module's tests; each adds the worker node(s) it kills."""
    root = Path(tempfile.mkdtemp(prefix="krn-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    cluster = Cluster(root, tmp_path_factory.mktemp("cluster-logs"))
    try:
        cluster.start_head()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


class Job:
    """The job's CLI joining the cluster with ``--address auto``, 1 GPU per stage actor; output to files."""

    def __init__(self, cluster: Cluster, manifest: str, output: Path, models: str, *extra: str) -> None:
        command = [sys.executable, "-m", "jobs.render", "--manifest", manifest, "--output", str(output), "--models",
                   models, "--address", "auto", "--batch-size", "2", "--shard-rows", "2", "--prior-gpus", "1",
                   "--decoder-gpus", "1", "--prior-node-label", PRIOR_LABEL, "--progress", "log",
                   "--progress-every", "5", *extra]  # fmt: skip
        self.output = output
        self.log = cluster.logs / f"job-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log, stderr=log)

    def wait_for_markers(
        self, count: int, timeout: float = 300, *, decoded_on: Callable[[], set[int]] | None = None
    ) -> bool:
        """Wait until ``count`` shards are done (and, if given, one was decoded by a pid of ``decoded_on()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if len(list((self.output / "shards").glob("*.json"))) >= count and (
                decoded_on is None or decoder_pids(self.output) & decoded_on()
            ):
                return True
            time.sleep(0.2)
        return False

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        """Exit status and output (the job is killed, by its pid, if it runs past ``timeout``)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.log.read_text()


def decoder_pids(output: Path) -> set[int]:
    """Pids of the decoder actors named in the published results ("host:pid ..." in ``decoder_worker``)."""
    import pyarrow.parquet as pq

    pids = set()
    for part in (output / "results").glob("*.parquet") if (output / "results").exists() else []:
        for worker in pq.read_table(part, columns=["decoder_worker"]).column(0).to_pylist():
            pids.add(int(worker.split(":")[1].split()[0]))
    return pids


def check_every_image_once(output: Path, rows: list[dict]) -> None:
    results = raw_results(str(output))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == len(rows)  # no error rows, no duplicate rows
    counts = [json.loads(p.read_text())["by_status"] for p in (output / "shards").glob("*.json")]
    assert sum(c.get("ok", 0) for c in counts) == len(rows) and not any(c.get("error") for c in counts)


@pytest.mark.slow
def test_a_lost_worker_node_costs_its_batches_not_its_images(
    cluster: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    """Prior pinned to the head; 3 decoders on 3 GPUs: one on the head, two on the worker. The worker node dies
    mid-run with its actors and objects; the job finishes on the head's decoder, each image exactly once."""
    worker = cluster.add_worker()
    rows = rows_of(24, num_inference_steps=20)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    decoders = ("--num-decoder-actors", "3")
    baseline("worker-node-sigkill", lambda: Job(cluster, manifest, tmp_path / "clean", tiny_models, *decoders).finish())
    started = time.monotonic()
    job = Job(cluster, manifest, output, tiny_models, *decoders)
    # kill it once it is busy: a shard it decoded is published (so more of its calls are in flight)
    busy = job.wait_for_markers(1, decoded_on=lambda: cluster.pids(worker))
    assert busy, job.finish(10)[1][-3000:]
    killed_at = time.monotonic()
    cluster.kill(worker)
    code, log = job.finish()
    seconds = time.monotonic() - started
    after = time.monotonic() - killed_at
    report("worker-node-sigkill", seconds, f"to exit {code} ({after:.1f} s after the kill)")
    assert code == 0, log[-4000:]
    print("\n".join(line[:300] for line in log.splitlines() if " WARNING " in line))
    assert "re-running" in log  # the node took work with it
    check_every_image_once(output, rows)
    stats = json.loads((output / "stats.json").read_text())
    assert stats["stages"]["cluster_gpus"] == 4.0 and stats["stages"]["stages"]["decoder"]["num_actors"] == 3


@pytest.mark.slow
def test_a_stage_whose_only_node_died_stops_the_job_and_a_rerun_finishes(
    cluster: Cluster, tmp_path: Path, tiny_models: str
) -> None:
    """Decoders may only run on nodes labelled `DECODER_LABEL`, and the only one dies: after --stage-wait the
    job stops naming the stage and what it lacks; with a new such node a rerun renders what is missing, once."""
    worker = cluster.add_worker()
    rows = rows_of(16, num_inference_steps=4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    pinned = ("--num-decoder-actors", "2", "--decoder-node-label", DECODER_LABEL)
    waiting = (*pinned, "--stage-wait", "10")
    baseline("decoder-node-lost", lambda: Job(cluster, manifest, tmp_path / "clean", tiny_models, *pinned).finish())
    started = time.monotonic()
    job = Job(cluster, manifest, output, tiny_models, *waiting)
    assert job.wait_for_markers(2), job.finish(10)[1][-3000:]
    killed_at = time.monotonic()
    cluster.kill(worker)
    code, log = job.finish()
    stopped = time.monotonic() - killed_at
    report("decoder-node-lost", time.monotonic() - started, f"to exit {code} ({stopped:.1f} s after the kill)")
    assert code == 1, log[-4000:]
    error = log.strip().splitlines()[-1]
    print(error)
    assert "stage decoder: no actor has been up for" in error and "--stage-wait 10" in error, error
    assert f"on nodes labelled {DECODER_LABEL}" in error and "a rerun finishes the work" in error, error
    assert 10 <= stopped < 150
    done_before = len(list((output / "shards").glob("*.json")))
    assert 2 <= done_before < 8

    cluster.add_worker()
    rerun_started = time.monotonic()
    code, log = Job(cluster, manifest, output, tiny_models, *pinned).finish()
    report("decoder-node-lost rerun", time.monotonic() - rerun_started, f"to exit {code}")
    assert code == 0, log[-4000:]
    check_every_image_once(output, rows)
    stats = json.loads((output / "stats.json").read_text())
    assert stats["num_skipped_already_final"] == 2 * done_before and stats["num_rendered"] == 16 - 2 * done_before
