"""A real multi-node Ray cluster on this machine for tests: a head and worker nodes (`ray start`, logical GPUs, own
ports, temp root and token), optionally autoscaled by Ray's fake multi-node provider; and the job's CLI joining it.

Everything is started and stopped by the test by its own process ids: nodes stop with SIGTERM to their
`ray start --block` (which stops what it started); what is left of their process trees (nodes the fake
autoscaler launched from the head's monitor) is collected by pid first and signalled after. Never
`ray stop`, never a broad kill.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.cli import clean_env
from tests.helpers.places import REPO, free_port
from tests.helpers.rows import MARKERS

RAY = str(Path(sys.executable).with_name("ray"))
TEST_NODE_LABEL = "kandinsky-render-test/node"  # each worker a value of its own: found alive by it
# The probe: a driver joined to the cluster (``address='auto'`` finds it through RAY_TMPDIR) answering one question
# per line of stdin: ``alive`` (each live node's test label, "head" for the head) or ``busy`` (CPUs and GPUs held).
# Ray may print its own lines on stdout: answers start with ANSWER.
PROBE = """
import json, sys
import ray
ray.init(address=sys.argv[2], logging_level="ERROR")
label = sys.argv[1]
for line in sys.stdin:
    if line.strip() == "alive":
        answer = [n["Labels"].get(label, "head") for n in ray.nodes() if n["Alive"]]
    else:
        total, free = ray.cluster_resources(), ray.available_resources()
        answer = sum(total.get(k, 0) - free.get(k, 0) for k in ("CPU", "GPU"))
    print("ANSWER " + json.dumps(answer), flush=True)
"""
PROBE_ANSWER_S = 60.0  # its first answer includes importing Ray and connecting
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")  # fmt: skip


class Cluster:
    """A head and worker nodes added and killed by the test (see the module docstring)."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root, self.logs = root, logs
        self.env = clean_env()
        # Its own temp root (RAY_TMPDIR): `--address auto` finds this head's record there and nowhere else.
        self.env.update(RAY_TMPDIR=str(root), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
        # A dead node is noticed within a few seconds rather than Ray's default tens of seconds.
        self.env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000")
        self.env.update(RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000")
        self.gcs = f"127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        self.workers = 0
        self._probe: subprocess.Popen | None = None

    def _start(self, name: str, args: list[str], temp_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        ports = [item for flag in NODE_PORTS for item in (flag, str(free_port()))]
        command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
        command += [*args, *ports]
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - the node writes it until it stops
        node = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True
        )
        log.close()
        self.nodes.append(node)
        return node

    def start_head(self, *, num_cpus: int = 4, num_gpus: int = 2, labels: str | None = None) -> None:
        """The head, once alive."""
        head = ["--head", "--port", self.gcs.split(":")[1], "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                "--include-dashboard", "false", "--ray-client-server-port", str(free_port())]  # fmt: skip
        self._start("head", [*head, *(["--labels", labels] if labels else [])], self.root / "ray")
        self.wait_nodes(lambda alive: len(alive) == 1, what="1 live node")

    def start_autoscaling_head(self, *, head_cpus: int, worker_types: dict[str, dict]) -> None:
        """A CPU head whose autoscaler (Ray's fake multi-node provider) adds nodes of ``worker_types`` on demand:
        ``{name: {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 1}}``."""
        config = {
            "cluster_name": "kandinsky-test",
            "max_workers": sum(t.get("max_workers", 1) for t in worker_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.gcs},  # fmt: skip
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, "min_workers": 0, **t} for name, t in worker_types.items()},
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }  # fmt: skip
        path = self.root / "autoscaling.json"
        path.write_text(json.dumps(config))
        env = {**self.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        head = ["--head", "--port", self.gcs.split(":")[1], "--num-cpus", str(head_cpus), "--num-gpus", "0",
                "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                f"--autoscaling-config={path}"]  # fmt: skip
        self._start("head", head, self.root / "ray", env)
        self.wait_nodes(lambda alive: len(alive) == 1, what="1 live node")

    def add_worker(self, *, num_cpus: int = 2, num_gpus: int = 2, labels: str | None = None) -> subprocess.Popen:
        """A worker node, once the head counts it alive (found by a label of its own: a node killed just before
        may still count as alive for a while)."""
        self.workers += 1
        name = f"{TEST_NODE_LABEL}=worker{self.workers}"
        args = ["--address", self.gcs, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]
        node = self._start(f"worker{self.workers}", [*args, "--labels", f"{labels},{name}" if labels else name],
                           self.root / f"w{self.workers}")  # fmt: skip
        self.wait_nodes(lambda alive: name in alive, what=f"its node {name} alive")
        return node

    def alive(self) -> list[str]:
        """One entry per live node: its test label ``key=value`` (the head: ``head``); [] when the head is not up."""
        names = self._ask("alive")
        return [] if names is None else [name if name == "head" else f"{TEST_NODE_LABEL}={name}" for name in names]

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no actor holds a GPU or CPU: a job that just ended frees its actors' resources asynchronously."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = self._ask("busy")
            if busy is not None and busy < 1e-6:
                return
            time.sleep(0.5)

    def _ask(self, question: str) -> Any:
        """The answer of this cluster's probe (a driver process kept connected: one interpreter and Ray import for
        the test, not one per question), or None when it cannot answer (restarted for the next question)."""
        for _ in range(2):
            if self._probe is None or self._probe.poll() is not None:
                self._probe = subprocess.Popen(
                    [sys.executable, "-c", PROBE, TEST_NODE_LABEL, self.gcs], env=self.env, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                )  # fmt: skip
            try:
                self._probe.stdin.write(question + "\n")
                self._probe.stdin.flush()
                # an answer within PROBE_ANSWER_S (a probe stuck connecting is replaced, never waited on forever)
                ready, _, _ = select.select([self._probe.stdout], [], [], PROBE_ANSWER_S)
                line = self._probe.stdout.readline() if ready else ""
            except (BrokenPipeError, OSError):
                line = ""
            if line.startswith("ANSWER "):
                return json.loads(line[7:])
            self._close_probe()
        return None

    def _close_probe(self) -> None:
        if self._probe is not None and self._probe.poll() is None:
            self._probe.kill()
            self._probe.wait(timeout=30)
        self._probe = None

    def wait_nodes(self, reached: Callable[[list[str]], bool], *, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not reached(self.alive()):
            if time.monotonic() > deadline or self.nodes[-1].poll() is not None:
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.logs.glob("*.log")))
                pytest.fail(f"the cluster did not reach {what}:\n{logs}")
            time.sleep(0.5)

    def pids(self, node: subprocess.Popen) -> set[int]:
        """Every process of ``node`` now."""
        try:
            return {node.pid, *(child.pid for child in psutil.Process(node.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return set()

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
        """Worker nodes first, then the head: SIGTERM to each `ray start --block` (it stops its own processes);
        then what is left of their process trees (nodes an autoscaler launched), by the pids collected first."""
        self._close_probe()
        left = set()
        for node in self.nodes:
            left |= self.pids(node) - {node.pid}
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.terminate()
                try:
                    node.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)  # only that node's own session (start_new_session)
                    node.wait(timeout=30)
        for pid in left:
            try:
                psutil.Process(pid).send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs([p for p in map(_process, left) if p is not None], timeout=20)
        for process in alive:
            process.kill()


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


class Job:
    """The job's CLI joining the cluster with ``--address auto``; output to files, log mode progress."""

    def __init__(
        self, cluster: Cluster, manifest: str, output: Path, models: str, *extra: str, entry: tuple[str, ...] = ()
    ) -> None:
        """``entry``: the module and its own arguments, when not ``jobs.render`` (e.g. `tests.helpers.gated_render`)."""
        command = [sys.executable, "-m", *(entry or ("jobs.render",)), "--manifest", manifest, "--output",
                   str(output), "--models", models, "--address", "auto", "--batch-size", "2", "--shard-rows", "2",
                   "--progress", "log", "--progress-every", "5", *extra]  # fmt: skip
        cluster.wait_idle()  # the last job's actors gone: this one starts on the whole cluster
        self.output = output
        self.started = time.monotonic()
        self.log = cluster.logs / f"job-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=cluster.env, stdout=log, stderr=log)

    def wait_for_markers(
        self, count: int, timeout: float = 300, *, decoded_on: Callable[[], set[int]] | None = None
    ) -> bool:
        """Wait until ``count`` shards are done (and, if given, one was decoded by a pid of ``decoded_on()``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if len(list(self.output.glob(MARKERS))) >= count and (
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
