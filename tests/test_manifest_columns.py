"""Manifest columns as people write them: pandas' float64 integer columns with gaps render, a fraction in an integer
column refuses only its row naming it, and a column the contract does not know is named once with a guess."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from jobs.job import run_job
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from schemas.manifest import RenderDefaults
from schemas.models import ModelPaths
from tests.helpers.rows import config_for, raw_results

# Small defaults: the rows' gaps take them.
SMALL = RenderDefaults(num_inference_steps=2, prior_num_inference_steps=2, height=64, width=64)


def planned(tmp_path: Path, frame: pd.DataFrame, name: str = "m.parquet") -> dict[str, str | None]:
    """id -> why planning refuses the row (None: it renders), for a manifest pandas wrote."""
    frame.to_parquet(tmp_path / name)
    config = JobConfig(
        manifest=str(tmp_path / name),
        output=str(tmp_path / "out"),
        models=ModelPaths.resolve(models_dir="/none"),
        defaults=SMALL,
    )
    work = manifest_work(config, movq_scales={"decoder": 8})
    refused = {row["id"]: row["error"] for row in work.refused.to_pylist()}
    return {row_id: refused.get(row_id) for row_id in frame["id"]}


def test_a_pandas_manifest_with_gaps_in_integer_columns_renders(tiny_models: str, tmp_path: Path) -> None:
    """pandas stores an integer column with a missing value as float64 (NaN): before, the whole manifest was refused
    ("column 'seed' has type double, expected integer"); now each integer is taken as it is and NaN is null, so the
    row takes the default (a derived seed, the --height default)."""
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "prompt": ["a red fox", "a blue fox", "a green fox"],
            "seed": [7, None, 9],
            "height": [64, 64, None],
            "num_inference_steps": [2, None, 3],
        }
    )
    frame.to_parquet(tmp_path / "m.parquet")
    stored = pq.read_schema(tmp_path / "m.parquet")
    assert {str(stored.field(name).type) for name in ("seed", "height", "num_inference_steps")} == {"double"}

    output = str(tmp_path / "out")
    run_job(config_for(str(tmp_path / "m.parquet"), output, tiny_models, runner="local", defaults=SMALL))
    rows = {row["id"]: row for row in raw_results(output)}
    assert {row_id: row["status"] for row_id, row in rows.items()} == {"a": "ok", "b": "ok", "c": "ok"}
    assert (rows["a"]["seed"], rows["c"]["seed"]) == (7, 9)
    assert rows["b"]["seed"] not in (None, 7, 9)  # derived from the job seed and the id, as for a null seed
    assert (rows["b"]["num_inference_steps"], rows["c"]["num_inference_steps"]) == (SMALL.num_inference_steps, 3)
    assert rows["c"]["height"] == SMALL.height


def test_a_value_that_is_no_exact_integer_refuses_only_its_row_naming_it(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["ok", "fraction", "huge-seed", "infinite", "gap"],
            "prompt": ["x"] * 5,
            "height": [64.0, 64.5, 64.0, np.inf, np.nan],
            "seed": [1.0, 2.0, 2.0**53 + 2, 4.0, 5.0],
        }
    )
    problems = planned(tmp_path, frame)
    assert problems["ok"] is None and problems["gap"] is None
    assert problems["fraction"].startswith("height=64.5 is not an integer")
    assert 'df["height"].astype("Int64")' in problems["fraction"]
    assert problems["huge-seed"].startswith("seed=9007199254740994.0 is beyond 2**53")
    assert problems["infinite"].startswith("height=inf is not an integer")


def test_a_misspelled_column_is_named_once_with_what_it_likely_means(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``steps`` for ``num_inference_steps`` was ignored without a word (the rows rendered at the 100-step default)."""
    for name in ("a.parquet", "b.parquet"):
        frame = pd.DataFrame({"id": [name], "prompt": ["x"], "steps": [4], "notes": ["mine"], "Height": [64]})
        frame.index = [10]  # a non-default index: pandas stores it as __index_level_0__, not the user's column
        frame.to_parquet(tmp_path / name)
    caplog.set_level(logging.WARNING)
    config = JobConfig(manifest=str(tmp_path), output=str(tmp_path / "out"), models=ModelPaths.resolve(models_dir="/"))
    manifest_work(config, movq_scales={"decoder": 8})
    warnings = [record.getMessage() for record in caplog.records if "not in the contract" in record.getMessage()]
    assert len(warnings) == 1, caplog.text
    (warning,) = warnings
    assert "'steps' (did you mean 'num_inference_steps'?)" in warning
    assert "'Height' (did you mean 'height'?)" in warning and "'notes'," in warning and "in 2 file(s)" in warning
    assert "__index_level_0__" not in warning


def test_sizes_the_models_render_but_the_public_checkpoints_refuse_are_warned_about(
    tiny_models: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny models' MoVQ scales by 2, so ``height 100`` rendered "ok" with them and is refused with the real
    models (scale 8): the plan keeps the models' own check (what they render) and says so before anything starts."""
    from actors.storage import Storage
    from jobs.planning.availability import check_models
    from jobs.planning.run_plan import plan_run
    from tests.helpers.rows import write_manifest

    rows = [{"id": f"r{i}", "prompt": "x", "height": height, "width": 64} for i, height in enumerate((100, 100, 64))]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = config_for(manifest, str(tmp_path / "out"), tiny_models, batch_size=2)
    caplog.set_level(logging.WARNING, logger="kandinsky_render.jobs.planning.availability")
    plan = plan_run(config, Storage(config.output))
    check_models(plan, plan.scan())
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("2 image(s) ask for sizes that these models render (MoVQ scale: decoder 2)")
    assert "public Kandinsky 2.2 checkpoints (MoVQ scale 8) refuse as unsupported_size: text2img 100x64" in warning
    assert "--movq-scale-factor 8" in warning
    refused = {row["id"]: row["error_kind"] for shard in plan.works() for row in shard.work.refused.to_pylist()}
    assert refused == {}  # these models render them
