"""``--keep-actors``: a run's model actors serve the next run in the process that asks for the same stages, and a
kept actor renders what a fresh one renders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jobs.execution import pool
from jobs.job import run_job
from tests.helpers.rows import config_for, raw_results, rows_of, write_manifest


def _workers(output: str) -> set[str]:
    return {row["decoder_worker"].split(" ")[0] for row in raw_results(output)}


def _pngs(output: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(output.glob("images/*/*.png"))}


@pytest.mark.usefixtures("ray_two_gpus")
def test_kept_actors_serve_the_next_run_as_fresh_ones_would(tmp_path: Path, tiny_models: str) -> None:
    pool.release_kept()  # whatever earlier tests kept: this test counts its own
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(3))
    config = config_for(manifest, str(tmp_path / "first"), tiny_models, keep_actors=True, batch_size=2)
    run_job(config)
    kept = sum(len(handles) for handles in pool._KEPT.values())
    assert kept >= 1  # the model actors (writers are never kept)
    run_job(dataclasses.replace(config, output=str(tmp_path / "second")))
    assert _workers(str(tmp_path / "second")) == _workers(str(tmp_path / "first"))  # the same process served
    pool.release_kept()
    run_job(dataclasses.replace(config, output=str(tmp_path / "fresh"), keep_actors=False))
    assert _workers(str(tmp_path / "fresh")).isdisjoint(_workers(str(tmp_path / "first")))
    assert _pngs(tmp_path / "second") == _pngs(tmp_path / "fresh") == _pngs(tmp_path / "first")
    assert not pool._KEPT


@pytest.mark.usefixtures("ray_two_gpus")
def test_a_run_with_other_stages_frees_what_earlier_runs_kept(tmp_path: Path, tiny_models: str) -> None:
    pool.release_kept()
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    config = config_for(manifest, str(tmp_path / "a"), tiny_models, keep_actors=True)
    run_job(config)
    first = _workers(str(tmp_path / "a"))
    other = dataclasses.replace(config, output=str(tmp_path / "b"), batch_size=1, keep_actors=False)  # another spec
    run_job(other)
    assert _workers(str(tmp_path / "b")).isdisjoint(first)
    assert not pool._KEPT  # the other spec's run killed what it could not use, and kept nothing itself
