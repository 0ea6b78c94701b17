"""Shared by the elastic and autoscaling tests: a cluster folder short enough for Ray's socket paths, the images a
job decoded (when, by which decoder process), and the check that each image was rendered once."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers.clusters import Cluster
from tests.helpers.rows import assert_exactly_one_ok, raw_results


def new_cluster(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> tuple[Cluster, Path]:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    return Cluster(root, tmp_path_factory.mktemp(f"{prefix}logs")), root


def decoded(output: Path) -> list[tuple[float, int]]:
    """(finished_at as epoch seconds, decoder pid) of every image in the published results, in time order."""
    rows = []
    for part in (output / "results").glob("*.parquet") if (output / "results").exists() else []:
        table = pq.read_table(part, columns=["finished_at", "decoder_worker", "status"])
        for at, worker, status in zip(*(table.column(i).to_pylist() for i in range(3))):
            if status == "ok":
                rows.append(
                    (at.timestamp() if isinstance(at, datetime) else float(at), int(worker.split(":")[1].split()[0]))
                )
    return sorted(rows)


def check_once(output: Path, rows: list[dict]) -> None:
    results = raw_results(str(output))
    assert_exactly_one_ok(results, {(r["id"], 0) for r in rows})
    assert len(results) == len(rows)  # nothing lost, nothing twice
