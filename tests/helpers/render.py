"""One in-process render: rows -> a manifest -> `run_job` -> the final results, keyed by image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from jobs.job import JobSummary, run_job
from jobs.reporting.results import read_results
from schemas.results import final_results
from tests.helpers.rows import config_for, write_manifest


@dataclass(frozen=True)
class Rendered:
    """A finished render: the job's summary, its final results by (id, image_index), where it wrote."""

    summary: JobSummary
    results: dict[tuple[str, int], dict[str, Any]]
    manifest: str
    output: str


def render(folder: Path, models: str, rows: list[dict], *, schema: pa.Schema | None = None, **config: Any) -> Rendered:
    """Render ``rows`` into ``folder/out`` in this process (`config_for`: on the shared Ray unless ``runner``
    says local, model actors kept for the next render); checks every image (``num_images`` per row, 1 when
    null) has exactly one final row, ok or error."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(folder / "manifest.parquet", rows, schema=schema)
    output = str(folder / "out")
    summary = run_job(config_for(manifest, output, models, **config))
    final = final_results(read_results(Storage(output, storage_options=config.get("storage_options"))))
    results = {(row["id"], row["image_index"]): row for row in final.to_pylist()}
    expected = {(row["id"], k) for row in rows for k in range(row.get("num_images") or 1)}
    assert set(results) == expected, f"final rows {sorted(set(results) ^ expected)} differ from the manifest's images"
    return Rendered(summary=summary, results=results, manifest=manifest, output=output)
