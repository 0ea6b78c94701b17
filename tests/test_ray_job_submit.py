"""A job submitted with `ray job submit` to a head this module starts: its metrics on the export port (the
documented submit of the example runs in tests/test_docs.py)."""

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import clean_env
from tests.helpers.places import REPO, free_port

pytestmark = [pytest.mark.cluster]

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A Ray head on loopback owned by this module (its own ports, temp dir and auth token), stopped by its pid."""
    tmp_path = tmp_path_factory.mktemp("head")
    # A short temp dir: Ray's socket paths must fit in 107 characters. Its own dir also keeps
    # drivers that look for "the local cluster" (ray.init() without an address) away from it.
    temp_dir = tempfile.mkdtemp(prefix="krh-", dir="/tmp")
    dashboard_port = free_port()
    env = clean_env()
    # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; an explicit token makes the head and
    # every client agree whatever the home directory holds.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain at the end: stop at once, not in 30 s
    env["RAY_metrics_report_interval_ms"] = "1000"  # metrics reach the export port within a second, not 10
    ports = {
        flag: str(free_port())
        for flag in (
            "--port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
    }
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"]
    command += ["--dashboard-port", str(dashboard_port), "--num-cpus", "4", "--num-gpus", "2", "--temp-dir", temp_dir]
    command += [item for pair in ports.items() for item in pair]
    log = open(tmp_path / "head.log", "w")  # closed after the head stops
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                [RAY, "job", "list", "--address", address], capture_output=True, text=True, env=env, timeout=60
            )
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not come up: {(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "metrics_port": int(ports["--metrics-export-port"])}
    finally:
        head.terminate()  # `ray start --block` drains and stops its own Ray processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # only the head's own session (start_new_session above)
            head.wait(timeout=30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def tracked_files(target: Path) -> Path:
    """A copy of the repository's tracked files: the working dir a job is submitted with. Not the checkout itself,
    which the suite's other worker writes meanwhile (caches, bytecode): `ray job submit` hashes the folder, then
    zips and uploads it, and a file that changed between the two once left the job a package the head could not
    download ("Failed to download runtime_env file package gcs://_ray_pkg_...", the job failed)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The Prometheus text of a node's metrics export port: (sample name, sorted labels) -> value (ours only)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 60  # the node's metrics agent starts a little after the head answers jobs
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                text = answer.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    keep = ("run_id", "stage", "state", "status", "mode", "error_kind", "kind", "le")
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k in keep))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ray_kandinsky_render_")
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, tags), v in samples.items() if n == name and set(labels.items()) <= set(tags))


@pytest.mark.slow
def test_a_submitted_job_exports_its_metrics_to_prometheus(ray_head: dict, tiny_models: str, tmp_path: Path) -> None:
    """A job submitted to a head started with --metrics-export-port: its pool sizes and queues are on the port
    while it runs; its images, shards, stage calls and seconds per image after it ends (read as Prometheus does)."""
    from tests.helpers.rows import write_manifest

    rows = [{"id": f"r{i}", "prompt": f"p{i}", "seed": i, "num_inference_steps": 2, "prior_num_inference_steps": 2,
             "height": 64, "width": 64} for i in range(4)]  # fmt: skip
    rows.append({"id": "bad", "prompt": "p", "height": 66, "width": 64})  # refused: unsupported_size
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    job = ["python", "-m", "jobs.render", "--manifest", manifest, "--output", str(output), "--models", tiny_models]
    job += ["--shard-rows", "3", "--progress-every", "1"]
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}}
    submit = subprocess.Popen(
        [RAY, "job", "submit", "--address", ray_head["address"], "--working-dir", ".", "--runtime-env-json"]
        + [json.dumps(runtime_env), "--", *job],
        cwd=tracked_files(tmp_path / "app"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ray_head["env"],
    )
    seen: dict = {}
    deadline = time.monotonic() + 480
    while submit.poll() is None and time.monotonic() < deadline:
        seen.update({key: v for key, v in scrape(ray_head["metrics_port"]).items() if key[0].endswith("pool_actors")})
        time.sleep(0.5)
    logs = submit.communicate(timeout=60)[0]
    assert submit.returncode == 0, logs[-4000:]
    run_id = json.loads((output / "stats.json").read_text())["run_id"]
    assert value(seen, "ray_kandinsky_render_pool_actors", stage="decoder", state="total", run_id=run_id) >= 1
    assert value(seen, "ray_kandinsky_render_pool_actors", stage="writer", state="ready", run_id=run_id) >= 1

    after = scrape(ray_head["metrics_port"])  # counters stay on the node's agent after the driver exits
    ours = {"run_id": run_id}
    assert value(after, "ray_kandinsky_render_images_total", status="ok", mode="text2img", **ours) == 4
    assert value(after, "ray_kandinsky_render_images_total", status="error", **ours) == 1
    assert value(after, "ray_kandinsky_render_image_errors_total", error_kind="unsupported_size", **ours) == 1
    assert value(after, "ray_kandinsky_render_shards_published_total", **ours) == 2
    for stage in ("prior", "decoder", "writer"):
        assert value(after, "ray_kandinsky_render_stage_calls_total", stage=stage, **ours) >= 1, stage
        assert value(after, "ray_kandinsky_render_stage_busy_seconds_total", stage=stage, **ours) > 0, stage
    assert value(after, "ray_kandinsky_render_seconds_per_image_count", stage="decoder", **ours) >= 1
    assert value(after, "ray_kandinsky_render_seconds_per_image_bucket", stage="decoder", le="+Inf", **ours) >= 1
