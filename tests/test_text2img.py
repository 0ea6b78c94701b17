"""text2img rows rendered by the job equal diffusers' KandinskyV22CombinedPipeline, row by row."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors.storage import Storage
from schemas.resources import StageResources
from tests.helpers.reference import assert_close_to_reference, load_png, max_level_difference, text2img_reference
from tests.helpers.render import render

STEPS = {"num_inference_steps": 4, "prior_num_inference_steps": 3}
ROWS = [
    {"id": "plain", "prompt": "a red fox in the snow", "height": 64, "width": 64, "seed": 11, **STEPS},
    {
        "id": "negative",
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry, low quality",
        "height": 64,
        "width": 128,
        "guidance_scale": 6.0,
        "prior_guidance_scale": 2.0,
        "num_images": 2,
        "seed": 12,
        **STEPS,
    },
    {"id": "unseeded-three", "prompt": "a cat wearing a hat", "height": 96, "width": 64, "num_images": 3, **STEPS},
    {
        "id": "empty-negative",
        "prompt": "mountains under the northern lights",
        "negative_prompt": "",
        "height": 64,
        "width": 64,
        "prior_guidance_scale": 1.0,
        "seed": 14,
        "num_inference_steps": 6,
        "prior_num_inference_steps": 5,
    },
    {
        "id": "no-guidance",
        "prompt": "a misty forest",
        "height": 64,
        "width": 64,
        "guidance_scale": 1.0,
        "prior_guidance_scale": 0.5,
        "num_images": 2,
        "seed": 15,
        **STEPS,
    },
    {"id": "same-prompt-other-seed", "prompt": "a red fox in the snow", "height": 64, "width": 64, "seed": 99, **STEPS},
]


@pytest.fixture(scope="module")
def local_results(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> dict:
    return render(tmp_path_factory.mktemp("local"), tiny_models, ROWS, runner="local", batch_size=4).results


def test_every_image_matches_combined_pipeline(local_results: dict, tiny_models: str) -> None:
    rows = {row["id"]: row for row in ROWS}
    for (row_id, index), result in local_results.items():
        assert result["status"] == "ok", result
        row = rows[row_id]
        if row.get("seed") is not None:
            assert result["seed"] == row["seed"] + index
        expected = text2img_reference(tiny_models, row, result["seed"])
        got = load_png(result["uri"])
        assert got.shape == (row["height"], row["width"], 3)
        assert (result["height"], result["width"]) == (row["height"], row["width"])
        assert_close_to_reference(got, expected, what=(row_id, index))


def test_null_seeds_are_stable_and_distinct(local_results: dict) -> None:
    seeds = [local_results[("unseeded-three", i)]["seed"] for i in range(3)]
    assert seeds[1] == seeds[0] + 1 and seeds[2] == seeds[0] + 2
    images = [load_png(local_results[("unseeded-three", i)]["uri"]) for i in range(3)]
    assert max_level_difference(images[0], images[1]) > 1


def test_other_checkpoints_any_valid_directory(tmp_path: Path) -> None:
    """A different valid checkpoint (other weights, the real MoVQ scale factor 8) matches too."""
    from jobs.dev.tiny_models import build_tiny_models

    models = str(tmp_path / "models-sf8")
    build_tiny_models(models, seed=7, movq_scale_factor=8)
    rows = [
        {"id": "a", "prompt": "a blue boat", "height": 64, "width": 128, "seed": 3, "num_images": 2, **STEPS},
        {"id": "b", "prompt": "a tree", "negative_prompt": "ugly", "height": 128, "width": 64, "seed": 4, **STEPS},
        {"id": "bad-size", "prompt": "a tree", "height": 96, "width": 64, "seed": 5, **STEPS},
    ]
    results = render(tmp_path, models, rows, runner="local", batch_size=3).results
    for row in rows[:2]:
        for index in range(row.get("num_images", 1)):
            result = results[(row["id"], index)]
            expected = text2img_reference(models, row, result["seed"])
            assert_close_to_reference(load_png(result["uri"]), expected, what=(row["id"], index))
    bad = results[("bad-size", 0)]
    assert bad["status"] == "error" and bad["error_kind"] == "unsupported_size"
    assert "height=96 is not a multiple of 64" in bad["error"] and "128" in bad["error"]


@pytest.fixture(scope="module")
def ray_results(tmp_path_factory: pytest.TempPathFactory, tiny_models: str, ray_two_gpus: None) -> tuple[Path, dict]:
    """The rows rendered on Ray (2 logical GPUs): the output folder and the results."""
    tmp = tmp_path_factory.mktemp("ray")
    # dedicated: the prior's GPU apart from the decoders' (the layout a large cluster gets; small ones co-locate)
    return tmp, render(tmp, tiny_models, ROWS, runner="ray", batch_size=4, layout="dedicated").results


def test_ray_two_gpus_pins_stages_and_equals_in_process(ray_results: tuple[Path, dict], local_results: dict) -> None:
    tmp_path, results = ray_results
    prior_gpus = {r["prior_worker"].split("gpus=")[1].split()[0] for r in results.values()}
    decoder_gpus = {r["decoder_worker"].split("gpus=")[1].split()[0] for r in results.values()}
    assert len(prior_gpus) == 1 and len(decoder_gpus) == 1, (prior_gpus, decoder_gpus)
    assert prior_gpus.isdisjoint(decoder_gpus) and "-" not in prior_gpus | decoder_gpus
    stats = Storage(str(tmp_path / "out")).read_bytes("stats.json")
    assert b'"cluster_gpus": 2.0' in stats
    for key, result in results.items():
        assert result["status"] == "ok"
        assert result["seed"] == local_results[key]["seed"]
        assert_close_to_reference(load_png(result["uri"]), load_png(local_results[key]["uri"]), what=key)


def test_order_batch_size_and_actor_count_do_not_change_images(
    tmp_path: Path, tiny_models: str, local_results: dict, ray_two_gpus: None
) -> None:
    shuffled = list(reversed(ROWS))
    results = render(
        tmp_path,
        tiny_models,
        shuffled,
        runner="ray",
        batch_size=3,
        decoder=StageResources(num_actors=2, num_gpus=0.5),
    ).results
    workers = {r["decoder_worker"] for r in results.values()}
    assert len(workers) == 2, workers
    for key, result in results.items():
        assert_close_to_reference(load_png(result["uri"]), load_png(local_results[key]["uri"]), what=key)


def test_two_runs_give_byte_identical_pngs(tmp_path: Path, tiny_models: str, ray_results: tuple[Path, dict]) -> None:
    first = ray_results[1]
    second = render(tmp_path, tiny_models, ROWS, runner="ray", batch_size=4).results
    for key, result in first.items():
        assert Path(result["uri"]).read_bytes() == Path(second[key]["uri"]).read_bytes(), key


def test_results_point_at_existing_pngs_of_reported_size(local_results: dict) -> None:
    from PIL import Image

    for result in local_results.values():
        with Image.open(result["uri"]) as image:
            assert image.size == (result["width"], result["height"])
            assert image.format == "PNG"


def test_results_parquet_schema(tmp_path: Path, local_results: dict) -> None:
    from schemas.results import RESULTS_SCHEMA

    uri = next(iter(local_results.values()))["uri"]
    results_dir = Path(uri).parents[2] / "results"
    for part in results_dir.glob("*.parquet"):
        assert pq.read_schema(part).remove_metadata() == RESULTS_SCHEMA.remove_metadata()
