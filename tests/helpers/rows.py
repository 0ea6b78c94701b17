"""Manifest rows, job configs and result checks shared by the tests (tests never import each other)."""

from __future__ import annotations

from actors.storage import Storage
from jobs.reporting.results import read_results
from schemas.config import JobConfig
from schemas.models import ModelPaths
from tests.conftest import FEW_ACTORS

STEPS = {"num_inference_steps": 3, "prior_num_inference_steps": 2, "height": 64, "width": 64}


def rows_of(n: int, prefix: str = "r", **extra: object) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"picture number {i}", "seed": i, **STEPS, **extra} for i in range(n)]


def config_for(manifest: str, output: str, models: str, **kwargs: object) -> JobConfig:
    kwargs = {**FEW_ACTORS, **kwargs}
    return JobConfig(manifest=manifest, output=output, models=ModelPaths.resolve(models_dir=models), **kwargs)


def raw_results(output: str, **options: object) -> list[dict]:
    return read_results(Storage(output, storage_options=options or None)).to_pylist()


def assert_exactly_one_ok(results: list[dict], expected: set[tuple[str, int]]) -> None:
    ok = [(r["id"], r["image_index"]) for r in results if r["status"] == "ok"]
    assert len(ok) == len(set(ok)), "duplicate ok results"
    assert set(ok) == expected
