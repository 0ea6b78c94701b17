"""Manifest rows, job configs and result checks shared by the tests (tests never import each other)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.reporting.results import read_results
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.resources import StageResources
from schemas.shards import SHARDS_DIR

# One CLIP and one decoder actor unless a test asks for more: each model actor imports torch and diffusers
# (~7 CPU-seconds here), and 2 cores start 4 of them in ~15 s. Tests of the defaults and of actor counts
# build their configs themselves.
# Every marker of an output the job wrote: one folder per segment of the completion log (schemas.shards.marker_key).
MARKERS = f"{SHARDS_DIR}/*/*.json"
FEW_ACTORS = {"prior": StageResources(num_actors=1), "decoder": StageResources(num_actors=1)}


def write_manifest(path: Path | str, rows: list[dict], schema: pa.Schema | None = None) -> str:
    """Write ``rows`` as a Parquet manifest; returns the path as a string."""
    if schema is None:  # from_pylist would take the columns of the first row only
        names = list(dict.fromkeys(name for row in rows for name in row))
        rows = [{name: row.get(name) for name in names} for row in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return str(path)


STEPS = {"num_inference_steps": 3, "prior_num_inference_steps": 2, "height": 64, "width": 64}


def rows_of(n: int, prefix: str = "r", **extra: object) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"picture number {i}", "seed": i, **STEPS, **extra} for i in range(n)]


def config_for(manifest: str, output: str, models: str, **kwargs: object) -> JobConfig:
    """A job over ``manifest`` into ``output`` with the tiny ``models``: one model actor per group, kept for the next
    render on the shared Ray (``--keep-actors``: a kept actor renders as a fresh one; the tests' renders mostly ask
    for the same stages), unless ``kwargs`` say otherwise."""
    kwargs = {**FEW_ACTORS, "keep_actors": True, **kwargs}
    return JobConfig(manifest=manifest, output=output, models=ModelPaths.resolve(models_dir=models), **kwargs)


def raw_results(output: str, **options: object) -> list[dict]:
    return read_results(Storage(output, storage_options=options or None)).to_pylist()


def assert_exactly_one_ok(results: list[dict], expected: set[tuple[str, int]]) -> None:
    ok = [(r["id"], r["image_index"]) for r in results if r["status"] == "ok"]
    assert len(ok) == len(set(ok)), "duplicate ok results"
    assert set(ok) == expected
