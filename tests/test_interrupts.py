"""Ctrl-C, SIGTERM and bad storage options end a run with one line and their exit status, releasing the lease;
nothing half-published counts as done, and a rerun renders the rest."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from schemas.keys import LEASE_FILE
from tests.helpers.cli import clean_env, command, in_process
from tests.helpers.places import REPO
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, raw_results, rows_of, write_manifest

pytestmark = [pytest.mark.fault]

ENV = clean_env()


def render_args(manifest: str, output: Path, models: str, *extra: str) -> list[str]:
    return ["--manifest", manifest, "--output", str(output), "--models", models,
            "--shard-rows", "1", "--batch-size", "1", "--progress", "off", *extra]  # fmt: skip


def render(manifest: str, output: Path, models: str, *extra: str) -> list[str]:
    return [*command(module="jobs.render"), *render_args(manifest, output, models, *extra)]


def stop_mid_run(command: list[str], output: Path, signum: int) -> tuple[int, str]:
    """Start ``command``, send ``signum`` once it has published a shard; (exit status, stderr)."""
    driver = subprocess.Popen(
        command,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's background job ignores it
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not list(output.glob(MARKERS)):
        time.sleep(0.1)
    assert driver.poll() is None, driver.communicate()[1][-3000:]
    driver.send_signal(signum)
    _, stderr = driver.communicate(timeout=180)
    return driver.returncode, stderr


def check_stopped(status: int, stderr: str, output: Path, *, expected: int, line: str, total: int) -> None:
    assert status == expected, stderr[-3000:]
    last = [text for text in stderr.splitlines() if text.strip()][-1]
    assert last.startswith(line) and "a rerun renders the rest" in last, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (output / LEASE_FILE).exists()  # released: the next run need not wait for it to expire
    markers = [json.loads(path.read_text()) for path in output.glob(MARKERS)]
    assert 1 <= len(markers) < total  # stopped mid-run, after publishing some shards
    for marker in markers:  # a marker is written last: what it lists is whole
        assert all((output / part["results"]).is_file() for part in marker["parts"])


def test_ctrl_c_ends_with_one_line_and_status_130_then_a_rerun_finishes(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    """The interrupted run is the CLI in a process of its own (the signal is under test); the rerun, the same
    command in this process."""
    rows = rows_of(8, num_inference_steps=6)
    manifest, output = write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    args = render_args(manifest, output, tiny_models, "--runner", "local")
    status, stderr = stop_mid_run([*command(module="jobs.render"), *args], output, signal.SIGINT)
    check_stopped(status, stderr, output, expected=130, line="interrupted (Ctrl-C): the run stopped", total=8)
    rerun = in_process(capsys, "render", *args)
    assert rerun.code == 0, rerun.err[-3000:]
    results = raw_results(str(output))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == 8


def test_sigterm_on_ray_exits_143_releasing_the_lease(tmp_path: Path, tiny_models: str) -> None:
    """On Ray, whose start installs its own SIGTERM handler (exit status 15) and whose core worker runs signal
    handlers inside ``ray.wait``: still 143 and one line, the lease released, published shards whole."""
    manifest, output = write_manifest(tmp_path / "m.parquet", rows_of(8, num_inference_steps=6)), tmp_path / "out"
    status, stderr = stop_mid_run(render(manifest, output, tiny_models), output, signal.SIGTERM)
    check_stopped(status, stderr, output, expected=143, line="terminated (SIGTERM): the run stopped", total=8)


def test_a_storage_option_the_store_refuses_exits_2_with_a_message(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    for option in ("client_kwargs=notjson", "foo=1"):
        argv = [*command(module="jobs.render"), "--manifest", manifest, "--output", "s3://bucket/out",
                   "--storage-option", option, "--dry-run"]  # fmt: skip
        run = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr[-3000:]
        assert run.stderr.startswith("error: cannot open s3://bucket/out with the storage options given"), run.stderr
        assert "Traceback" not in run.stderr and "notjson" not in run.stderr
