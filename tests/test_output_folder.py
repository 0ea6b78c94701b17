"""The output folder: never read as manifest however the URIs are spelled; a full disk or a killed write leaves
nothing that breaks a later run or a reader of results/."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import actors.storage_io
from actors.retry import StorageFullError
from jobs.job import run_job
from jobs.planning.manifests import list_manifest_paths
from schemas.manifest import ManifestError
from tests.helpers.rows import assert_exactly_one_ok, config_for, raw_results, rows_of, write_manifest


def test_the_output_is_never_listed_as_manifest_however_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for path in ("in/a.parquet", "in/day=2/b.parquet", "in/out/results/x.parquet", "in/out/data/y.parquet"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        write_manifest(tmp_path / path, [{"id": path}])
    os.symlink(tmp_path / "in" / "out", tmp_path / "link-to-out")
    spellings = [
        ("in", "in/out"),
        ("in/", f"file://{tmp_path}/in/out/"),
        (f"file://{tmp_path}/in", "./in/out"),
        (str(tmp_path / "in"), "in/day=2/../out"),
        ("in/**/*.parquet", "link-to-out"),
        ("in/**/*.parquet", str(tmp_path / "in" / "out")),
    ]
    for manifest, output in spellings:
        listed = [rel for _, rel in list_manifest_paths(manifest, exclude=output)]
        assert all(not rel.startswith("out/") and "results" not in rel for rel in listed), (manifest, output, listed)
        assert listed, (manifest, output)
    for manifest, output in (("in/out/results/x.parquet", "in/out"), ("in", "in"), ("in/out/", "in")):
        with pytest.raises(ManifestError, match="the manifest lies inside the output"):
            list_manifest_paths(manifest, exclude=output)
    with pytest.raises(ManifestError, match="no Parquet files found"):  # only the output's own files match
        list_manifest_paths("in/*/*/*.parquet", exclude="in/out")


def test_the_output_is_never_listed_as_manifest_on_object_storage(tmp_path: Path, s3_options: dict) -> None:
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(**options)
    for key in ("nightly/day-1.parquet", "nightly/out/results/x.parquet", "nightly/out/data/y.parquet"):
        fs.pipe_file(f"{bucket}/{key}", Path(write_manifest(tmp_path / "m.parquet", [{"id": key}])).read_bytes())
    for manifest, output in ((f"s3://{bucket}/nightly/", f"s3a://{bucket}/nightly/out/"),
                             (f"s3a://{bucket}/nightly", f"s3://{bucket}/nightly/out"),
                             (f"s3://{bucket}/nightly/**/*.parquet", f"s3://{bucket}/nightly/out/")):  # fmt: skip
        listed = [rel for _, rel in list_manifest_paths(manifest, storage_options=options, exclude=output)]
        assert listed == ["day-1.parquet"], (manifest, output, listed)
    with pytest.raises(ManifestError, match="the manifest lies inside the output"):
        list_manifest_paths(f"s3://{bucket}/nightly/out/results/", storage_options=options, exclude=f"s3a://{bucket}")


def test_an_output_inside_the_manifest_prefix_renders_once_then_skips(tmp_path: Path, tiny_models: str) -> None:
    """A nightly job over a prefix holding its own output (parquet format: data/*.parquet too), spelled with a
    trailing slash and a relative path: the second run renders nothing and succeeds."""
    rows = rows_of(3)
    prefix = tmp_path / "nightly"
    prefix.mkdir()
    write_manifest(prefix / "day-1.parquet", rows)
    output = os.path.relpath(prefix / "out")
    config = config_for(str(prefix) + "/", output, tiny_models, runner="local", output_format="parquet", shard_rows=2)
    assert run_job(config).stats["num_rendered"] == 3
    again = run_job(config)
    assert again.stats["num_rendered"] == 0 and again.stats["num_skipped_already_final"] == 3
    results = raw_results(output)
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == 3


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[str]:
    """A 1 MiB tmpfs at ``folder`` (needs mount rights: root, as in this project's containers)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(output: Path) -> list[str]:
    """Temporary files of unfinished writes, hidden or not."""
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if ".tmp-" in p.name)


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_stops_the_job_naming_the_file_and_leaves_nothing_behind(
    disk: str, tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills mid-run (a real 1 MiB tmpfs, or ENOSPC injected into the job's local writes): the run stops
    with StorageFullError naming the file, no write_failed rows, no temporary file left; once there is room the
    rerun finishes and ``pandas.read_parquet(OUTPUT/results)`` reads each image once (even beside leftovers of
    a write killed with its process)."""
    rows = rows_of(4)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    room = 50_000  # about one shard's PNG, results and marker
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            output = Path(stack.enter_context(small_disk(tmp_path / "disk"))) / "out"
            filler = Path(output.parent / "filler")
            filler.write_bytes(b"\0" * (1024 * 1024 - room))
        else:
            output, filler = tmp_path / "out", None
            budget = {"bytes": room}
            opened = open

            def writes_until_full(path: str, mode: str = "r", *args: object, **kwargs: object) -> object:
                handle = opened(path, mode, *args, **kwargs)
                if "w" in mode:
                    write = handle.write

                    def counted(data: bytes) -> int:
                        budget["bytes"] -= len(data)
                        if budget["bytes"] < 0:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        return write(data)

                    handle.write = counted
                return handle

            monkeypatch.setattr(actors.storage_io, "open", writes_until_full, raising=False)
        config = config_for(manifest, str(output), tiny_models, runner="local", shard_rows=1)
        with pytest.raises(StorageFullError, match=rf"write {re.escape(str(output))}/\S+: no space left on the device"):
            run_job(config)
        assert leftovers(output) == []
        assert all(r["status"] == "ok" for r in raw_results(str(output)))  # no image blamed for the disk
        if filler is not None:
            filler.unlink()
        else:
            monkeypatch.undo()
        # what a write killed with its process leaves (this version's hidden name, and an earlier one's)
        for name in (f".x.parquet.tmp-{uuid.uuid4().hex}", f"y.parquet.tmp-{uuid.uuid4().hex}"):
            (output / "results" / name).write_bytes(b"")
        rerun = run_job(config)
        assert leftovers(output) == []
        table = pd.read_parquet(output / "results")
        assert sorted(table["id"]) == sorted(r["id"] for r in rows) and set(table["status"]) == {"ok"}
        assert rerun.stats["output"]["by_status"] == {"ok": 4}
