"""The completion log: reruns and ``status`` read the pointer, the checkpoint and the markers after it, and the
markers stay the truth (a crash between compactions, an old output, a checkpoint that disagrees, ``--overwrite``).

Renders run in-process with the local runner; request counts come from a counting proxy in front of the moto
S3 server, so they are exact, not timed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.dev.counting_proxy import CountingProxy, fresh_filesystems
from jobs.job import run_job
from jobs.publishing.log import CompletionLog
from jobs.reporting.status import summary
from schemas.keys import LAST_CHECKPOINT_FILE, LOG_DIR
from schemas.log import LogPointer
from schemas.shards import SHARDS_DIR
from tests.helpers.images import png
from tests.helpers.rows import MARKERS, assert_exactly_one_ok, config_for, raw_results, rows_of, write_manifest


def pointer(output: str) -> LogPointer:
    return LogPointer.from_json(Path(output, LAST_CHECKPOINT_FILE).read_bytes())


def segments(output: str) -> list[str]:
    return sorted(path.name for path in Path(output, SHARDS_DIR).iterdir() if path.is_dir())


def crash_after(monkeypatch: pytest.MonkeyPatch, markers: int) -> None:
    """The driver dies right after publishing its ``markers``-th marker (before any later compaction)."""
    publish = CompletionLog.publish
    published = []

    def dying(self: CompletionLog, marker: object, **kwargs: object) -> str:
        key = publish(self, marker, **kwargs)
        published.append(key)
        if len(published) == markers:
            raise RuntimeError("the driver died")
        return key

    monkeypatch.setattr(CompletionLog, "publish", dying)


@pytest.fixture()
def counted(s3_endpoint: str, s3_options: dict) -> Iterator[tuple[CountingProxy, dict]]:
    """A request-counting proxy in front of the S3 server, and storage options through it (the fresh bucket)."""
    with CountingProxy(s3_endpoint) as proxy:
        options = {**s3_options["options"], "client_kwargs": {"endpoint_url": proxy.url}}
        yield proxy, {"bucket": s3_options["bucket"], "options": options}


def test_status_and_a_rerun_read_the_pointer_and_only_the_markers_after_the_checkpoint(
    tmp_path: Path, tiny_models: str, counted: tuple[CountingProxy, dict]
) -> None:
    proxy, s3 = counted
    options, output = s3["options"], f"s3://{s3['bucket']}/out"
    folder = tmp_path / "m"
    folder.mkdir()
    write_manifest(folder / "day-1.parquet", rows_of(4, "a"))
    config = config_for(str(folder), output, tiny_models, runner="local", shard_rows=1, storage_options=options)
    run_job(config)

    def status_requests() -> list[tuple[str, str]]:
        fresh_filesystems()
        proxy.reset()
        assert summary(output, storage_options=options)["num_shards_done"] > 0
        return list(proxy.requests)

    with_four = status_requests()
    assert not [path for kind, path in with_four if kind == "GET" and f"/{SHARDS_DIR}/" in path]  # no marker read
    write_manifest(folder / "day-2.parquet", rows_of(2, "b"))
    fresh_filesystems()
    proxy.reset()
    assert run_job(config).stats["num_rendered"] == 2
    assert not [path for kind, path in proxy.requests if kind == "GET" and f"/{SHARDS_DIR}/" in path]
    with_six = status_requests()
    assert len(with_six) == len(with_four) <= 12  # the same requests whatever the number of done shards
    assert summary(output, storage_options=options)["num_images"] == 6


def test_a_crash_between_compactions_loses_nothing(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(5))
    output = str(tmp_path / "out")
    config = config_for(manifest, output, tiny_models, runner="local", shard_rows=1, compact_every=2)
    crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="the driver died"):
        run_job(config)
    monkeypatch.undo()
    assert pointer(output).num_shards == 2 and len(list(Path(output).glob(MARKERS))) == 3
    found = summary(output)
    assert found["num_shards_done"] == 3 and found["log"]["markers_since"] == 1  # the third, after the checkpoint
    assert run_job(config).stats["num_rendered"] == 2
    assert_exactly_one_ok(raw_results(output), {(f"r{i}", 0) for i in range(5)})
    found = summary(output)
    assert (found["num_shards_done"], found["num_images"], found["log"]["markers_since"]) == (5, 5, 0)
    assert pointer(output).segments == tuple(segments(output))


def test_a_retry_published_after_the_checkpoint_replaces_its_shard_once(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [*rows_of(2), {**rows_of(1, "late")[0], "mode": "img2img", "image": "late.png", "strength": 0.5}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = str(tmp_path / "out")
    config = config_for(manifest, output, tiny_models, runner="local", shard_rows=1)
    run_job(config)
    before = summary(output)
    assert before["by_status"] == {"ok": 2, "error": 1} and before["num_shards_with_errors"] == 1
    (tmp_path / "late.png").write_bytes(png(7))
    crash_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="the driver died"):
        run_job(dataclasses.replace(config, retry_errors=True))
    monkeypatch.undo()
    found = summary(output)  # the retry's marker, after the checkpoint, replaces the shard's row in it
    assert found["log"]["markers_since"] == 1 and found["num_shards_done"] == 3
    assert (found["num_images"], found["by_status"], found["num_shards_with_errors"]) == (3, {"ok": 3}, 0)
    assert found["first_failed"] == {} and found["errors_by_kind"] == {}
    assert run_job(config).stats["output"]["by_status"] == {"ok": 3}
    assert summary(output, verify=True)["log"]["checkpoint_agrees"] is True


def test_an_output_written_before_the_log_is_compacted_by_its_next_run(tmp_path: Path, tiny_models: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    write_manifest(folder / "day-1.parquet", rows_of(3))
    output = str(tmp_path / "out")
    config = config_for(str(folder), output, tiny_models, runner="local", shard_rows=1)
    run_job(config)
    for path in Path(output).glob(MARKERS):  # the layout before the log: flat markers, no _log/
        path.rename(Path(output, SHARDS_DIR, path.name))
    for segment in segments(output):
        Path(output, SHARDS_DIR, segment).rmdir()
    shutil.rmtree(Path(output, LOG_DIR))
    found = summary(output)
    assert found["num_shards_done"] == 3 and "no checkpoint" in found["log"]["read_every_marker"]
    assert run_job(config).stats["num_rendered"] == 0
    assert pointer(output).flat_markers == 3 and pointer(output).num_shards == 3
    assert summary(output)["log"] == {
        "checkpoint": 1, "markers_since": 0, "parts_checked": True, "read_every_marker": None,
        "checkpoint_agrees": None,
    }  # fmt: skip
    write_manifest(folder / "day-2.parquet", rows_of(2, "b"))
    assert run_job(config).stats["num_rendered"] == 2
    assert summary(output)["num_images"] == 5 and len(list(Path(output, SHARDS_DIR).glob("*.json"))) == 3


def test_a_checkpoint_that_disagrees_with_the_markers_is_found_and_rebuilt(tmp_path: Path, tiny_models: str) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(4))
    output = str(tmp_path / "out")
    config = config_for(manifest, output, tiny_models, runner="local", shard_rows=1)
    run_job(config)
    rows = Path(output, pointer(output).checkpoint)
    rows.write_bytes(b"x" * rows.stat().st_size)  # the same size, not a checkpoint
    assert "checkpoint" in summary(output)["log"]["read_every_marker"]
    assert run_job(config).stats["num_rendered"] == 0 and pointer(output).number == 2
    assert summary(output)["log"]["read_every_marker"] is None

    (first, *_) = sorted(Path(output).glob(MARKERS))
    first.unlink()  # a marker gone from a covered segment: only a full check can tell
    assert summary(output)["num_shards_done"] == 4
    verified = summary(output, verify=True)
    assert verified["num_shards_done"] == 3 and verified["log"]["checkpoint_agrees"] is False
    assert run_job(dataclasses.replace(config, verify_parts=True)).stats["num_rendered"] == 1
    assert summary(output, verify=True)["log"]["checkpoint_agrees"] is True

    shutil.rmtree(Path(output, SHARDS_DIR, segments(output)[0]))  # a covered segment gone: its shards are not done
    found = summary(output)
    assert "is gone" in found["log"]["read_every_marker"] and found["num_shards_done"] == 1
    assert run_job(config).stats["num_rendered"] == 3
    assert_exactly_one_ok(raw_results(output), {(f"r{i}", 0) for i in range(4)})


def test_overwrite_clears_the_log(tmp_path: Path, tiny_models: str) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(3))
    output = str(tmp_path / "out")
    config = config_for(manifest, output, tiny_models, runner="local", shard_rows=1)
    run_job(config)
    run_job(dataclasses.replace(config, overwrite=True, shard_rows=3))
    (segment,) = segments(output)
    assert pointer(output).segments == (segment,) and pointer(output).num_shards == 1
    assert sorted(path.name for path in Path(output, LOG_DIR).iterdir()) == sorted(
        [Path(LAST_CHECKPOINT_FILE).name, Path(pointer(output).checkpoint).name]
    )
    assert json.loads(Path(output, LAST_CHECKPOINT_FILE).read_text())["totals"]["num_images"] == 3


def test_checkpoint_rows_that_name_other_files_are_not_the_jobs(tmp_path: Path, tiny_models: str) -> None:
    """Keys follow from a row's shard and segment names: a planted row naming ``../`` is refused, every marker read."""
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    output = str(tmp_path / "out")
    run_job(config_for(manifest, output, tiny_models, runner="local", shard_rows=1))
    found = pointer(output)
    rows = pq.read_table(Path(output, found.checkpoint))
    planted = rows.set_column(0, "shard", pa.array(["../../../secret-0123abcd-0000000000-0000000001", "x"]))
    pq.write_table(planted.cast(rows.schema), Path(output, found.checkpoint))
    raw = json.loads(Path(output, LAST_CHECKPOINT_FILE).read_text())
    raw["checkpoint_size"] = Path(output, found.checkpoint).stat().st_size
    Path(output, LAST_CHECKPOINT_FILE).write_text(json.dumps(raw))
    status = summary(output)
    assert "a shard name the job does not make" in status["log"]["read_every_marker"]
    assert status["num_shards_done"] == 2
