"""Embeddings and scores in one pass: rendering from given embeddings, --save-embeddings, reuse, --score clip."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from actors.storage import Storage
from jobs.job import run_job
from jobs.reporting.results import read_results
from jobs.reporting.reuse import reuse_embeddings
from schemas.config import JobConfig
from schemas.manifest import RenderDefaults
from schemas.models import ModelPaths
from schemas.results import final_results
from tests.helpers.reference import load_result, max_level_difference, pipeline, reference_cosines
from tests.helpers.render import render

SIZE = {"height": 64, "width": 64, "num_inference_steps": 3, "prior_num_inference_steps": 2}
EMBEDS = pa.list_(pa.float32())


def decoder_reference(models: str, positive: np.ndarray, negative: np.ndarray, seed: int) -> np.ndarray:
    """diffusers' decoder pipeline called with the embeddings and Generator("cpu").manual_seed(seed)."""
    decoder = pipeline(models, "decoder", "KandinskyV22Pipeline")
    image = decoder(
        image_embeds=torch.from_numpy(positive[None]),
        negative_image_embeds=torch.from_numpy(negative[None]),
        generator=torch.Generator("cpu").manual_seed(seed),
        height=SIZE["height"],
        width=SIZE["width"],
        num_inference_steps=SIZE["num_inference_steps"],
    ).images[0]
    return np.asarray(image)


def zero_embed(models: str) -> np.ndarray:
    prior = pipeline(models, "prior", "KandinskyV22PriorPipeline")
    with torch.no_grad():
        return prior.get_zero_embed(1).float().numpy()[0]


def test_rows_given_embeddings_skip_the_prior_and_equal_the_decoder_pipeline(tmp_path: Path, tiny_models: str) -> None:
    rng = np.random.default_rng(0)
    positive, negative = rng.standard_normal((2, 32)).astype(np.float32)
    good = [
        {"id": "given-both", "prompt": "a fox", "image_embeds": positive.tolist(), "negative_image_embeds":
         negative.tolist(), "seed": 5, **SIZE},
        {"id": "given-positive", "image_embeds": positive.tolist(), "seed": 6, "num_images": 2, **SIZE},
    ]  # fmt: skip
    bad = {
        "short": ({"image_embeds": positive[:31].tolist()}, "image_embeds has 31 values; the prior checkpoint's "),
        "nan": ({"image_embeds": [float("nan")] + positive[1:].tolist()}, "image_embeds holds NaN"),
        "hole": ({"image_embeds": [None] + positive[1:].tolist()}, "image_embeds has 1 missing value"),
        "lonely-negative": ({"prompt": "x", "negative_image_embeds": negative.tolist()}, "without 'image_embeds'"),
        "with-prior-image": (
            {"image_embeds": positive.tolist(), "prior_image": "x.png", "prior_num_inference_steps": 10},
            "replaces the prior",
        ),
    }
    rows = good + [{"id": key, "seed": 1, **SIZE, **row} for key, (row, _) in bad.items()]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image_embeds", EMBEDS),
                        ("negative_image_embeds", EMBEDS), ("prior_image", pa.string()), ("seed", pa.int64()),
                        ("num_images", pa.int64()), *((k, pa.int64()) for k in SIZE)])  # fmt: skip
    rows = [{name: row.get(name) for name in schema.names} for row in rows]
    found = render(tmp_path, tiny_models, rows, schema=schema, runner="local")
    results = found.results
    expected = {
        ("given-both", 0): decoder_reference(tiny_models, positive, negative, 5),
        ("given-positive", 0): decoder_reference(tiny_models, positive, zero_embed(tiny_models), 6),
        ("given-positive", 1): decoder_reference(tiny_models, positive, zero_embed(tiny_models), 7),
    }
    for key, image in expected.items():
        assert results[key]["status"] == "ok", results[key]
        assert max_level_difference(load_result(results[key]), image) <= 1, key
        assert results[key]["prior_seconds"] == 0.0  # no prior call
    for key, (_, phrase) in bad.items():
        assert results[(key, 0)]["status"] == "error" and phrase in results[(key, 0)]["error"], results[(key, 0)]
    assert found.summary.stats["stages"]["stages"].keys() >= {"prior", "decoder", "writer"}


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_saved_embeddings_travel_with_the_images_and_render_again(
    tmp_path: Path, tiny_models: str, output_format: str
) -> None:
    rows = [{"id": f"r{i}", "prompt": f"picture {i}", "seed": i, **SIZE} for i in range(3)]
    first = render(tmp_path / "first", tiny_models, rows, runner="local", save_embeddings="float16",
                   output_format=output_format)  # fmt: skip
    results = first.results
    table = pq.read_table(next(Path(first.output, "results").glob("*.parquet")))
    assert table.schema.field("image_embeds").type == pa.list_(pa.float16(), 32)
    saved = {(r["id"], r["image_index"]): r for r in table.to_pylist()}
    data = next(Path(first.output, "data").iterdir())
    if output_format == "webdataset":
        with tarfile.open(data) as tar:
            for key, result in results.items():
                stacked = np.load(io.BytesIO(tar.extractfile(result["member"].replace(".png", ".npy")).read()))
                assert stacked.shape == (2, 32) and stacked.dtype == np.float16
                np.testing.assert_array_equal(stacked[0], np.asarray(saved[key]["image_embeds"], np.float16))
    else:
        frame = pq.read_table(data).to_pylist()
        assert all(len(row["image_embeds"]) == 32 and len(row["negative_image_embeds"]) == 32 for row in frame)

    manifest = str(tmp_path / "again-manifest")
    assert reuse_embeddings(first.output, manifest) == 3
    models = ModelPaths.resolve(models_dir=tiny_models)  # the saved rows carry no size: the flags decide
    again = JobConfig(manifest=manifest, output=str(tmp_path / "again"), models=models, runner="local",
                      defaults=RenderDefaults(**SIZE))  # fmt: skip
    run_job(again)
    rerendered = {r["id"]: r for r in final_results(read_results(Storage(again.output))).to_pylist()}
    for (row_id, index), row in saved.items():
        result = rerendered[f"{row_id}/{index}"]
        assert result["status"] == "ok" and result["seed"] == row["seed"]
        positive = np.asarray(row["image_embeds"], np.float32)
        negative = np.asarray(row["negative_image_embeds"], np.float32)
        reference = decoder_reference(tiny_models, positive, negative, row["seed"])
        assert max_level_difference(load_result(result), reference) <= 1


@pytest.mark.usefixtures("ray_two_gpus")
def test_clip_scores_on_ray_equal_transformers_and_filter_and_report(tmp_path: Path, tiny_models: str) -> None:
    rows = [
        {"id": f"s{i}", "prompt": p, "seed": i, **SIZE}
        for i, p in enumerate(["a red fox", "a lighthouse at dusk", "a cat wearing a hat", "mountains", "a blue boat"])
    ]
    rows.append({"id": "interp", "interpolate": [{"prompt": "a red fox", "image": None, "weight": 1.0}], **SIZE})
    found = render(tmp_path, tiny_models, rows, score="clip", min_clip_score=0.5, batch_size=2, shard_rows=3)
    results = found.results
    decoded = []
    for row in rows[:-1]:
        pixels = load_result(results[(row["id"], 0)])
        decoded.append({"id": row["id"], "prompt": row["prompt"], "pixels": pixels.tobytes(),
                        "pixel_height": 64, "pixel_width": 64})  # fmt: skip
    cosines = reference_cosines(f"{tiny_models}/prior", decoded)
    for row in rows[:-1]:
        result = results[(row["id"], 0)]
        expected = max(100 * cosines[row["id"]], 0.0)
        assert result["clip_score"] == pytest.approx(expected, abs=1e-3), row["id"]
        assert result["filtered"] is (expected < 0.5) and result["score_seconds"] > 0
    assert results[("interp", 0)]["clip_score"] is None and results[("interp", 0)]["status"] == "ok"
    stats = json.loads(Path(found.output, "stats.json").read_text())
    score = stats["clip_score"]
    assert score["count"] == 5 and sum(score["histogram"].values()) == 5
    assert score["num_filtered"] == sum(r["filtered"] for r in results.values() if r["filtered"] is not None)
    assert score["min"] == pytest.approx(min(r["clip_score"] for r in results.values() if r["clip_score"] is not None))
    stages = stats["stages"]["stages"]  # scoring runs in the CLIP actors, on the prior's own encoders
    assert stages["score"]["group"] == stages["prior"]["group"] == "clip" and stages["decoder"]["group"] == "decoder"
    assert stages["score"]["num_gpus"] + stages["decoder"]["num_gpus"] <= 1.0
    assert stats["suggested_stages"]["score_seconds_per_image"] > 0 and "--layout" in stats["suggested_stages"]["flags"]
    page = Path(found.output, "index.html").read_text()
    assert "lowest scores" in page and "highest scores" in page and "score_histogram.png" in page
    assert Image.open(Path(found.output, "score_histogram.png")).size == (640, 260)
