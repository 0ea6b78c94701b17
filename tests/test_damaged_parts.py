"""A done shard's results part overwritten with other bytes of the same size (a hostile user, a bad disk, a botched
copy): the listing still shows it as published, so only its Parquet footer tells.

A plain rerun skips it in the gallery with one warning naming the file and exits 0; ``status --verify`` and
``render --verify-parts`` read each results file's footer, report the shard as damaged, and the rerun renders it
again. Renders run in-process with the local runner and the tiny models.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from actors.storage import Storage
from jobs.planning import index_reader, output_index
from jobs.planning.output_index import results_footer_problem
from jobs.reporting.status import summary
from schemas.shards import Marker
from tests.helpers.cli import in_process
from tests.helpers.rows import MARKERS, config_for, rows_of, write_manifest

IDS = {"r0", "r1", "r2"}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> tuple[str, str]:
    """(manifest, output) of a finished output of three one-row shards, rendered once for the module."""
    from jobs.job import run_job

    folder = tmp_path_factory.mktemp("damaged")
    manifest = write_manifest(folder / "m.parquet", rows_of(3))
    output = str(folder / "out")
    run_job(config_for(manifest, output, tiny_models, runner="local", shard_rows=1))
    return manifest, output


def damaged_copy(done: tuple[str, str], tmp_path: Path) -> tuple[str, str, Marker]:
    """(manifest, output, marker of the shard damaged): a copy of the module's output whose first shard's results
    part holds random bytes of its published size."""
    manifest, original = done
    output = str(tmp_path / "out")
    shutil.copytree(original, output)
    marker = Marker.from_json(sorted(Path(output).glob(MARKERS))[0].read_bytes())
    path = Path(output, marker.parts[0].results)
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))
    assert path.stat().st_size == size == marker.parts[0].results_size
    return manifest, output, marker


def rerun(capsys: pytest.CaptureFixture, manifest: str, output: str, models: str, *flags: str):  # noqa: ANN201
    return in_process(capsys, "render", "--manifest", manifest, "--output", output, "--models", models,
                      "--runner", "local", "--progress", "off", *flags)  # fmt: skip


def test_a_plain_rerun_warns_naming_the_damaged_file_reads_no_footer_and_exits_0(
    done: tuple[str, str], tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """It exited 2 with pyarrow's "Parquet magic bytes not found", naming no file, and never rendered the shard."""
    manifest, output, marker = damaged_copy(done, tmp_path)

    def no_footer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a footer was read without verification")

    monkeypatch.setattr(index_reader, "results_footer_problem", no_footer)  # the default path stays O(new shards)
    result = rerun(capsys, manifest, output, tiny_models)
    assert result.code == 0, result.err
    key = marker.parts[0].results
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and key in r.getMessage()]
    assert len(warned) == 1 and "gallery" in warned[0] and "ArrowInvalid" in warned[0], warned
    assert "error:" not in result.err
    assert Path(output, "index.html").exists() and Path(output, "_SUCCESS").exists()
    assert summary(output)["num_shards_damaged"] == 0  # unverified: the listing agrees, as before


def test_status_verify_names_the_damaged_shard_and_file(
    done: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, output, marker = damaged_copy(done, tmp_path)
    result = in_process(capsys, "status", output, "--verify")
    assert result.code == 0, result.err
    key = marker.parts[0].results
    assert f"{marker.shard}: {key} is not the Parquet file published" in result.out, result.out
    assert "damaged shards: 1" in result.out and "agrees" not in result.out
    found = summary(output, verify=True)
    assert found["num_shards_damaged"] == 1 and found["num_images"] == 2 and key in found["damaged"][marker.shard]


def test_verify_parts_renders_the_damaged_shard_again_leaving_one_ok_row_per_image(
    done: tuple[str, str], tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    manifest, output, marker = damaged_copy(done, tmp_path)
    result = rerun(capsys, manifest, output, tiny_models, "--verify-parts")
    assert result.code == 0, result.err
    rows = ds.dataset(str(Path(output, "results")), format="parquet").to_table(columns=["id", "status"]).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(IDS) and {row["status"] for row in rows} == {"ok"}
    found = summary(output, verify=True)
    assert found["num_shards_damaged"] == 0 and found["num_images"] == 3 and found["log"]["checkpoint_agrees"] is True
    again = rerun(capsys, manifest, output, tiny_models, "--verify-parts")  # nothing left to render
    assert again.code == 0 and "rendered 0 image(s)" in again.out, again.out + again.err


def test_a_footer_that_reads_but_counts_other_rows_is_damaged(done: tuple[str, str]) -> None:
    """A valid Parquet file with another row count than its marker published (a part copied over another one)."""
    _, output = done
    storage = Storage(output)
    part = Marker.from_json(sorted(Path(output).glob(MARKERS))[0].read_bytes()).parts[0]
    size = Path(output, part.results).stat().st_size
    assert results_footer_problem(storage, part, size=size) is None
    problem = results_footer_problem(storage, dataclasses.replace(part, num_images=part.num_images + 1), size=size)
    assert problem == f"{part.results} holds {part.num_images} results rows, {part.num_images + 1} were published"
    assert "is empty" in (results_footer_problem(storage, part, size=0) or "")
    assert output_index.REQUIRED_RESULT_COLUMNS == ("id", "image_index", "status")


def test_on_an_object_store_verification_reads_the_footers_and_finds_the_damaged_part(
    tmp_path: Path, tiny_models: str, s3_options: dict
) -> None:
    """The footers are read through fsspec (ranged reads, concurrently): the same finding as on a local folder."""
    import s3fs

    from jobs.job import run_job

    bucket, options = s3_options["bucket"], s3_options["options"]
    output = f"s3://{bucket}/out"
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(3))
    run_job(config_for(manifest, output, tiny_models, runner="local", shard_rows=1, storage_options=options))
    fs = s3fs.S3FileSystem(**options)
    marker = Marker.from_json(fs.cat_file(sorted(fs.glob(f"{bucket}/out/{MARKERS}"))[0]))
    key = f"{bucket}/out/{marker.parts[0].results}"
    fs.pipe_file(key, os.urandom(fs.size(key)))
    assert summary(output, storage_options=options)["num_shards_damaged"] == 0  # a listing cannot tell
    found = summary(output, storage_options=options, verify=True)
    assert found["num_shards_damaged"] == 1 and found["num_images"] == 2
    assert found["damaged"][marker.shard].startswith(f"{marker.parts[0].results} is not the Parquet file published")


def test_a_deleted_png_of_the_files_format_is_found_by_verification_and_rendered_again(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture
) -> None:
    from jobs.job import run_job

    manifest = write_manifest(tmp_path / "m.parquet", rows_of(3))
    output = str(tmp_path / "out")
    run_job(config_for(manifest, output, tiny_models, runner="local", shard_rows=1, output_format="files"))
    png = sorted(Path(output, "images").glob("*/*.png"))[0]
    png.unlink()
    found = summary(output, verify=True)
    assert found["num_shards_damaged"] == 1, found
    assert "holds 0 PNG(s), 1 were published" in next(iter(found["damaged"].values()))
    assert rerun(capsys, manifest, output, tiny_models, "--verify-parts").code == 0
    assert png.exists() and summary(output, verify=True)["num_shards_damaged"] == 0
    rows = ds.dataset(Path(output, "results")).to_table().to_pylist()
    assert sorted(row["id"] for row in rows if row["status"] == "ok") == sorted(IDS)
