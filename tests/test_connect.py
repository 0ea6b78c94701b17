"""Which Ray the job joins: a private local one unless told, whatever earlier heads left; a dead address fails fast."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.execution.connect import RayUnreachableError, check_reachable, host_port, resolve_address
from tests.helpers.cli import clean_env, command
from tests.helpers.fault_timing import baseline, report
from tests.helpers.places import REPO, free_port
from tests.helpers.rows import rows_of, write_manifest


@pytest.fixture()
def ray_tmpdir() -> Iterator[Path]:
    """A Ray temp root owned by the test (``RAY_TMPDIR``): short, because Ray's socket paths must fit in 107 bytes."""
    root = Path(tempfile.mkdtemp(prefix="krc-", dir="/tmp"))
    (root / "ray").mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(manifest: str, output: Path, models: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    argv = [*command(module="jobs.render"), "--manifest", manifest, "--output", str(output), "--models", models,
               "--progress", "off", *extra]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def job_env(ray_tmpdir: Path) -> dict:
    env = clean_env()
    return env | {"RAY_TMPDIR": str(ray_tmpdir)}


def test_addresses_name_a_host_and_port() -> None:
    assert host_port("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert host_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_port("ray://head.example") == ("head.example", 10001)
    assert host_port("head.example") == ("head.example", 6379)
    assert host_port("http://127.0.0.1:8265") == ("127.0.0.1", 8265)
    assert host_port("127.0.0.1:notaport") is None


def test_resolving_addresses(ray_tmpdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    assert resolve_address(None) is None and resolve_address("local") is None
    with pytest.raises(RayUnreachableError, match="no local Ray head is recorded"):
        resolve_address("auto")
    dead = free_port()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
    assert resolve_address(None) is None  # a record of an earlier head never decides where a job without one goes
    with pytest.raises(RayUnreachableError, match=rf"--address auto \(the local head recorded at 127.0.0.1:{dead}\)"):
        resolve_address("auto", wait_s=0.5)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{dead}")
    with pytest.raises(RayUnreachableError, match=f"127.0.0.1:{dead}"):
        resolve_address(None, wait_s=0.5)
    started = time.monotonic()
    with pytest.raises(RayUnreachableError, match="firewall"):
        check_reachable(f"127.0.0.1:{dead}", wait_s=2.0)
    assert 1.5 < time.monotonic() - started < 10


@pytest.mark.slow
def test_a_stale_local_head_record_does_not_stop_a_job(tmp_path: Path, tiny_models: str, ray_tmpdir: Path) -> None:
    """ray_current_cluster names a head that is gone (its port answers nothing): the job starts its own Ray."""
    record = ray_tmpdir / "ray" / "ray_current_cluster"
    record.write_text(f"127.0.0.1:{free_port()}")
    before = record.read_text()
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    started = time.monotonic()
    done = render(manifest, tmp_path / "out", tiny_models, job_env(ray_tmpdir))
    report("stale-head-record", time.monotonic() - started, f"to exit {done.returncode}")
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["output"]["by_status"] == {"ok": 2} and stats["stages"]["runner"] == "ray"
    assert record.read_text() == before  # left as it was
    record.unlink()
    baseline("stale-head-record", lambda: render(manifest, tmp_path / "clean", tiny_models, job_env(ray_tmpdir)))


def test_an_address_that_does_not_answer_fails_fast_naming_it(
    tmp_path: Path, tiny_models: str, ray_tmpdir: Path
) -> None:
    port = free_port()
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    started = time.monotonic()
    address = ("--address", f"127.0.0.1:{port}", "--connect-wait", "4")
    failed = render(manifest, tmp_path / "out", tiny_models, job_env(ray_tmpdir), *address)
    seconds = time.monotonic() - started
    report("unreachable-address", seconds, f"to exit {failed.returncode}")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert 4 <= seconds < 40
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: RayUnreachableError: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert all(word in error for word in ("ray status", f"{port}", "RAY_ADDRESS", "firewall", "for 4 s")), error
    assert not (tmp_path / "out").exists()  # checked before the output is touched

    nothing = render(manifest, tmp_path / "out", tiny_models, job_env(ray_tmpdir), "--address", "auto")
    assert nothing.returncode == 1 and "no local Ray head is recorded" in nothing.stderr
