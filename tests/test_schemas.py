"""Contracts: dataclasses agree with their Arrow schemas; manifests are refused with useful messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.planning.manifests import list_manifest_paths, read_footer, read_whole
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from schemas.keys import image_seed
from schemas.manifest import MANIFEST_COLUMNS, VALUE_PROBLEM, ManifestError, RenderDefaults
from schemas.models import ModelPaths
from schemas.results import RESULTS_SCHEMA, ResultRow
from schemas.shards import image_key, shard_name
from tests.helpers.rows import write_manifest


def test_result_row_matches_results_schema() -> None:
    assert [f.name for f in dataclasses.fields(ResultRow)] == RESULTS_SCHEMA.names


def test_defaults_are_diffusers_defaults() -> None:
    import inspect

    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    decoder = inspect.signature(KandinskyV22Pipeline.__call__).parameters
    prior = inspect.signature(KandinskyV22PriorPipeline.__call__).parameters
    defaults = RenderDefaults()
    assert defaults.height == decoder["height"].default and defaults.width == decoder["width"].default
    assert defaults.num_inference_steps == decoder["num_inference_steps"].default
    assert defaults.guidance_scale == decoder["guidance_scale"].default
    assert defaults.prior_num_inference_steps == prior["num_inference_steps"].default
    assert defaults.prior_guidance_scale == prior["guidance_scale"].default


def _config(tmp_path: Path, manifest: str) -> JobConfig:
    return JobConfig(manifest=manifest, output=str(tmp_path / "out"), models=ModelPaths.resolve(models_dir="/none"))


def _refusal(tmp_path: Path, rows: list[dict] | None = None, table: pa.Table | None = None) -> str:
    path = tmp_path / "bad.parquet"
    if table is not None:
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        write_manifest(path, rows or [])
    with pytest.raises(ManifestError) as info:
        manifest_work(_config(tmp_path, str(path)))
    message = str(info.value)
    assert str(path) in message
    return message


def test_refuses_missing_id(tmp_path: Path) -> None:
    assert "'id' is missing" in _refusal(tmp_path, [{"prompt": "x"}])


def test_refuses_wrong_type_naming_column(tmp_path: Path) -> None:
    message = _refusal(tmp_path, [{"id": "a", "prompt": "x", "height": "tall"}])
    assert "'height'" in message and "string" in message and "integer" in message


def test_refuses_non_string_ids(tmp_path: Path) -> None:
    assert "'id'" in _refusal(tmp_path, [{"id": 1, "prompt": "x"}])


def test_refuses_duplicate_ids_naming_them(tmp_path: Path) -> None:
    message = _refusal(
        tmp_path, [{"id": "a", "prompt": "x"}, {"id": "dup", "prompt": "y"}, {"id": "dup", "prompt": "z"}]
    )
    assert "duplicate" in message and "'dup'" in message


def test_refuses_unknown_mode_naming_row_and_value(tmp_path: Path) -> None:
    message = _refusal(tmp_path, [{"id": "a", "prompt": "x"}, {"id": "row-7", "prompt": "y", "mode": "txt2img"}])
    assert "'mode'" in message and "row-7" in message and "txt2img" in message


def test_refuses_null_id(tmp_path: Path) -> None:
    table = pa.table({"id": pa.array(["a", None]), "prompt": ["x", "y"]})
    assert "null or empty" in _refusal(tmp_path, table=table)


def test_refuses_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="cannot read as Parquet") as info:
        read_footer(str(path), "broken.parquet")
    assert str(path) in str(info.value)


def test_refuses_ids_repeated_across_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_manifest(tmp_path / "in" / "a.parquet", [{"id": "same", "prompt": "x"}])
    write_manifest(tmp_path / "in" / "b.parquet", [{"id": "same", "prompt": "y"}])
    with pytest.raises(ManifestError, match="'same' appears in both"):
        manifest_work(_config(tmp_path, str(tmp_path / "in")))


def test_manifest_uri_forms(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "day=2").mkdir(parents=True)
    write_manifest(folder / "a.parquet", [{"id": "a", "prompt": "x"}])
    write_manifest(folder / "day=2" / "b.parquet", [{"id": "b", "prompt": "x"}])
    (folder / "_SUCCESS").write_text("")
    (folder / "notes.txt").write_text("not a manifest")
    assert [rel for _, rel in list_manifest_paths(str(folder))] == ["a.parquet", "day=2/b.parquet"]
    assert [rel for _, rel in list_manifest_paths(str(folder / "*.parquet"))] == ["a.parquet"]
    assert [Path(uri).name for uri, _ in list_manifest_paths(f"file://{folder}/a.parquet")] == ["a.parquet"]
    with pytest.raises(ManifestError, match="no such manifest"):
        list_manifest_paths(str(tmp_path / "missing"))


def test_bad_values_become_error_rows_not_refusals(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "prompt": "fine"},
        {"id": "no-prompt", "prompt": None},
        {"id": "huge", "prompt": "x", "height": 100_000},
        {"id": "zero-images", "prompt": "x", "num_images": 0},
        {"id": "neg-seed", "prompt": "x", "seed": -5},
        {"id": "steps", "prompt": "x", "num_inference_steps": 0},
        {"id": "later-mode", "prompt": "x", "mode": "img2img", "image": "s3://b/i.png"},
        {"id": "ftp-image", "prompt": "x", "mode": "inpaint", "image": "ftp://host/i.png", "mask": "s3://b/m.png"},
        {"id": "stray-image", "prompt": "x", "image": "s3://b/i.png"},
        {"id": "nan-guidance", "prompt": "x", "guidance_scale": float("nan")},
    ]
    path = write_manifest(tmp_path / "m.parquet", rows)
    plan = manifest_work(_config(tmp_path, path))
    assert plan.num_to_render == 2  # "ok" and "later-mode"
    errors = {row["id"]: row["error"] for row in plan.refused.to_pylist()}
    assert errors["no-prompt"].startswith("prompt is null or empty")
    assert "height=100000" in errors["huge"]
    assert "num_images=0" in errors["zero-images"]
    assert "seed=-5" in errors["neg-seed"]
    assert "num_inference_steps=0" in errors["steps"]
    assert "later-mode" not in errors
    assert "'image' is set but mode text2img" in errors["stray-image"]
    assert "guidance_scale=nan" in errors["nan-guidance"]
    assert "protocol 'ftp', which is not allowed" in errors["ftp-image"]
    assert all(kind == "invalid_row" for kind in plan.refused.column("error_kind").to_pylist())


def test_every_documented_column_is_accepted(tmp_path: Path) -> None:
    names = [column.name for column in MANIFEST_COLUMNS]
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x"}])
    table = read_whole(read_footer(path, "m.parquet"))
    assert table.column_names == [*names, VALUE_PROBLEM]


@pytest.mark.parametrize(
    "row_id",
    [
        "../../etc/passwd",
        "/abs/path",
        "a\x00b",
        "tab\tnew\nline",
        "x" * 5000,
        "..",
        ".",
        "",
        "ünïcødé/表",
        "a/b",
        "a_b",
    ],
)
def test_image_keys_stay_inside_images(row_id: str) -> None:
    key = image_key(shard_name("../m.parquet", 0, 10), row_id, 3)
    parts = key.split("/")
    assert parts[0] == "images" and len(parts) == 3
    assert all(part not in ("", ".", "..") for part in parts)
    assert all(ch.isalnum() or ch in "._-" for ch in parts[2]) and len(parts[2]) < 100
    assert parts[2].endswith("-3.png")


def test_image_keys_do_not_collide() -> None:
    ids = ["a/b", "a_b", "a b", "a\x00b", "A/B", "a" * 200, "a" * 201]
    assert len({image_key("p", i, 0) for i in ids}) == len(ids)
    assert image_key("p", "x", 0) != image_key("p", "x", 1)


def test_seeds() -> None:
    assert image_seed(10, job_seed=0, row_id="a", image_index=2) == 12
    unseeded = image_seed(None, job_seed=0, row_id="a", image_index=0)
    assert unseeded == image_seed(None, job_seed=0, row_id="a", image_index=0)
    assert unseeded != image_seed(None, job_seed=1, row_id="a", image_index=0)
    assert unseeded != image_seed(None, job_seed=0, row_id="b", image_index=0)
    assert 0 <= unseeded < 2**62
