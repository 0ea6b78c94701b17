"""Each output format end to end on Ray and loopback S3, read back by its real clients; objects per shard."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.storage import Storage
from jobs.job import run_job
from jobs.reporting.results import read_results
from schemas.config import JobConfig
from schemas.keys import sample_key
from schemas.models import ModelPaths
from schemas.results import final_results
from tests.helpers.reference import result_png
from tests.helpers.rows import FEW_ACTORS, MARKERS, write_manifest

STEPS = {"num_inference_steps": 3, "prior_num_inference_steps": 2, "height": 64, "width": 64}
ROWS = [{"id": f"row-{i}", "prompt": f"a picture of thing {i}", "seed": i, "num_images": 1 + i % 2, **STEPS}
        for i in range(7)] + [{"id": "no-prompt", "prompt": None, "seed": 1, **STEPS}]  # fmt: skip
IMAGES = {(r["id"], k) for r in ROWS if r["prompt"] for k in range(r.get("num_images", 1))}


@pytest.fixture(scope="module")
def outputs(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: str, s3_endpoint: str, ray_two_gpus: None
) -> dict[str, dict]:
    """The same manifest rendered into each format on S3 (3 rows per shard: 3 shards), and copied locally."""
    import s3fs

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("formats")
    local = tmp_path_factory.mktemp("formats")
    fs.put(write_manifest(local / "m.parquet", ROWS), "formats/in/m.parquet")
    found = {}
    for output_format in ("files", "webdataset", "parquet"):
        output = f"s3://formats/{output_format}"
        models = ModelPaths.resolve(models_dir=tiny_models)
        config = JobConfig(manifest="s3://formats/in/", output=output, models=models, storage_options=options,
                           output_format=output_format, shard_rows=3, batch_size=2, keep_actors=True,
                           **FEW_ACTORS)  # fmt: skip
        summary = run_job(config)
        fs.invalidate_cache()
        fs.get(f"formats/{output_format}", str(local / output_format), recursive=True)
        results = final_results(read_results(Storage(output, storage_options=options))).to_pylist()
        found[output_format] = {"summary": summary, "dir": local / output_format, "results": results, "opts": options}
    return found


def pngs(found: dict) -> dict[tuple[str, int], bytes]:
    return {
        (r["id"], r["image_index"]): result_png(r, storage_options=found["opts"])
        for r in found["results"]
        if r["status"] == "ok"
    }


def test_every_format_holds_the_same_images_and_results(outputs: dict) -> None:
    files = pngs(outputs["files"])
    assert set(files) == IMAGES
    for output_format, found in outputs.items():
        assert pngs(found) == files, output_format  # the same pixels, the same PNG bytes, in every format
        errors = [r for r in found["results"] if r["status"] != "ok"]
        assert [(r["id"], r["error_kind"]) for r in errors] == [("no-prompt", "invalid_row")]
        assert found["summary"].stats["output"]["by_status"] == {"ok": len(IMAGES), "error": 1}


def test_webdataset_shards_read_with_webdataset_and_tarfile(outputs: dict) -> None:
    import webdataset as wds

    folder = outputs["webdataset"]["dir"]
    tars = sorted(str(p) for p in (folder / "data").glob("*.tar"))
    assert len(tars) == 3 and not (folder / "images").exists()
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == len(IMAGES)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["key"] == sample_key(meta["id"], meta["image_index"])
        assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
    for path in tars:
        with tarfile.open(path) as tar:
            keys = [name.split(".", 1)[0] for name in tar.getnames()]
            assert keys == sorted(keys) and all(m.mtime == 0 for m in tar.getmembers())  # samples in key order
    results = {(r["id"], r["image_index"]): r for r in outputs["webdataset"]["results"] if r["status"] == "ok"}
    for key, result in results.items():
        assert result["uri"].endswith(".tar") and result["member"] == f"{sample_key(*key)}.png"


def test_parquet_shards_read_with_pandas_and_datasets(outputs: dict) -> None:
    import datasets

    folder = outputs["parquet"]["dir"]
    files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
    frame = pd.concat([pd.read_parquet(path) for path in files])
    assert len(frame) == len(IMAGES) and set(zip(frame["id"], frame["image_index"])) == IMAGES
    for png in frame["png"]:
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    assert loaded.num_rows == len(IMAGES) and {"key", "png", "prompt", "seed"} <= set(loaded.column_names)
    first = loaded[0]
    assert np.asarray(Image.open(io.BytesIO(first["png"]))).shape == (64, 64, 3)
    # results are readable as one table with pandas, as the README says
    results = pd.read_parquet(folder / "results")
    assert len(results) == len(IMAGES) + 1 and set(results["shard"]) == {p.stem for p in folder.glob(MARKERS)}


def test_at_most_three_objects_per_shard_and_markers_describe_them(outputs: dict) -> None:
    for output_format in ("webdataset", "parquet"):
        folder: Path = outputs[output_format]["dir"]
        markers = sorted(folder.glob(MARKERS))
        assert len(markers) == 3
        for path in markers:
            marker = json.loads(path.read_text())
            (part,) = marker["parts"]
            shard_objects = [p for p in folder.rglob("*") if p.is_file() and marker["shard"] in p.name]
            assert sorted(p.relative_to(folder).as_posix() for p in shard_objects) == sorted(
                [part["data"], part["results"], path.relative_to(folder).as_posix()]
            )
            assert pq.read_table(folder / part["results"]).num_rows == marker["num_images"]
            assert marker["fingerprint"]["size"] > 0 and marker["run_id"] == outputs[output_format]["summary"].run_id
    files = outputs["files"]["dir"]
    assert len(list((files / "images").rglob("*.png"))) == len(IMAGES) and not (files / "data").exists()


def test_a_changed_manifest_file_is_refused_naming_it(outputs: dict, tiny_models: str, tmp_path: Path) -> None:
    import s3fs

    from schemas.manifest import ManifestError

    options = outputs["files"]["opts"]
    fs = s3fs.S3FileSystem(**options)
    fs.put(write_manifest(tmp_path / "m.parquet", ROWS[:3]), "formats/in-changed/m.parquet")
    models = ModelPaths.resolve(models_dir=tiny_models)
    config = JobConfig(manifest="s3://formats/in-changed/", output="s3://formats/changed", models=models,
                       storage_options=options, runner="local")  # fmt: skip
    run_job(config)
    fs.put(write_manifest(tmp_path / "m2.parquet", ROWS[:4]), "formats/in-changed/m.parquet")  # rows added in place
    with pytest.raises(ManifestError, match=r"in-changed/m\.parquet: changed since its shards were rendered"):
        run_job(config)
    with pytest.raises(ValueError, match="other settings.*output_format"):
        run_job(JobConfig(**{**config.__dict__, "output_format": "parquet"}))
