"""Every mode and prior input from one shuffled manifest equals diffusers' single-process reference."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.storage import Storage
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.shards import OUTPUT_FORMATS
from tests.helpers.reference import (
    assert_close_to_reference,
    load_png,
    load_result,
    max_level_difference,
    mode_reference,
)
from tests.helpers.render import render
from tests.helpers.rows import write_manifest

STEPS = {"num_inference_steps": 4, "prior_num_inference_steps": 3}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_inputs(folder: Path) -> dict[str, bytes]:
    """Input images (PNG bytes) written into ``folder`` as well."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    images = {
        "photo.png": np.asarray(Image.fromarray(smooth).resize((64, 64), Image.BICUBIC)),
        "photo-large.png": np.asarray(Image.fromarray(smooth).resize((96, 80), Image.BICUBIC)),
        "mask.png": np.pad(np.full((32, 32), 255, np.uint8), 16),
        "mask-left.png": np.pad(np.full((64, 24), 255, np.uint8), ((0, 0), (0, 40))),
        "mask-large.png": np.pad(np.full((40, 48), 255, np.uint8), ((20, 20), (24, 24))),
        "depth.png": np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None], (1, 64)),
        "depth-tall.png": np.tile(np.linspace(255, 0, 128, dtype=np.uint8)[:, None], (1, 64)),
        "depth-small.png": np.zeros((32, 32), np.uint8),
    }
    encoded = {name: _png(pixels) for name, pixels in images.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in encoded.items():
        (folder / name).write_bytes(data)
    (folder / "garbage.png").write_bytes(b"GIF89a this is not an image")
    return encoded


def good_rows() -> list[dict]:
    """One or more rows per mode and prior input; image columns hold file names (made absolute later)."""
    return [
        {"id": "t2i", "prompt": "a red fox", "height": 64, "width": 64, "seed": 1},
        {"id": "i2i", "mode": "img2img", "prompt": "a sunset", "negative_prompt": "blur", "image": "photo.png",
         "strength": 0.6, "height": 64, "width": 64, "seed": 2, "num_images": 2},
        {"id": "i2i-large-source", "mode": "img2img", "prompt": "a boat", "image": "photo-large.png",
         "strength": 0.75, "height": 64, "width": 64, "seed": 3},
        {"id": "inpaint-a", "mode": "inpaint", "prompt": "a flower", "image": "photo.png", "mask": "mask.png",
         "height": 64, "width": 64, "seed": 4, "num_images": 2},
        {"id": "inpaint-b", "mode": "inpaint", "prompt": "a flower", "image": "photo.png", "mask": "mask-left.png",
         "height": 64, "width": 64, "seed": 5},
        {"id": "inpaint-resized", "mode": "inpaint", "prompt": "a stone", "image": "photo-large.png",
         "mask": "mask-large.png", "height": 64, "width": 64, "seed": 6},
        {"id": "cn", "mode": "controlnet", "prompt": "a robot", "hint": "depth.png", "height": 64, "width": 64,
         "seed": 7, "negative_prompt": "low quality"},
        {"id": "cn-tall", "mode": "controlnet", "prompt": "a tower", "hint": "depth-tall.png", "height": 128,
         "width": 64, "seed": 8},
        {"id": "cn-estimated", "mode": "controlnet", "prompt": "a statue", "image": "photo.png", "height": 64,
         "width": 64, "seed": 9},
        {"id": "cn-i2i", "mode": "controlnet_img2img", "prompt": "bronze", "image": "photo.png", "hint": "depth.png",
         "strength": 0.5, "height": 64, "width": 64, "seed": 10, "num_images": 2},
        {"id": "prior-image", "prompt": "a cat like this", "prior_image": "photo.png", "prior_strength": 0.5,
         "height": 64, "width": 64, "seed": 11},
        {"id": "prior-image-i2i", "mode": "img2img", "prompt": "a dog like this", "prior_image": "photo-large.png",
         "prior_strength": 0.7, "negative_prompt": "ugly", "image": "photo.png", "strength": 0.5, "height": 64,
         "width": 64, "seed": 12},
        {"id": "interp", "interpolate": [{"prompt": "a red fox", "weight": 0.7}, {"image": "photo.png", "weight": 0.3}],
         "height": 64, "width": 64, "seed": 13},
        {"id": "interp-negative", "negative_prompt": "dark", "interpolate": [{"prompt": "a castle", "weight": 0.5},
         {"prompt": "a lake", "weight": 0.5}], "height": 64, "width": 64, "seed": 14},
    ]  # fmt: skip


def bad_rows() -> list[dict]:
    """Rows that must become error rows, each with the phrase its message must contain."""
    return [
        ({"id": "mask-size", "mode": "inpaint", "prompt": "x", "image": "photo.png", "mask": "mask-large.png",
          "height": 64, "width": 64}, "differs from its image"),
        ({"id": "hint-size", "mode": "controlnet", "prompt": "x", "hint": "depth-small.png", "height": 64,
          "width": 64}, "a hint must have the output size"),
        ({"id": "inpaint-odd-size", "mode": "inpaint", "prompt": "x", "image": "photo.png", "mask": "mask.png",
          "height": 66, "width": 64}, "height=66 is not a multiple of 4"),
        ({"id": "cn-odd-size", "mode": "controlnet", "prompt": "x", "hint": "depth.png", "height": 96,
          "width": 64}, "height=96 is not a multiple of 64"),
        ({"id": "no-steps", "mode": "img2img", "prompt": "x", "image": "photo.png", "strength": 0.1,
          "num_inference_steps": 4}, "num_inference_steps * strength < 1"),
        ({"id": "missing-file", "mode": "img2img", "prompt": "x", "image": "nope.png"}, "does not exist"),
        ({"id": "not-an-image", "mode": "img2img", "prompt": "x", "image": "garbage.png"}, "not a decodable image"),
        ({"id": "http", "mode": "img2img", "prompt": "x", "image": "http://example.com/a.png"}, "not allowed"),
        ({"id": "no-mask", "mode": "inpaint", "prompt": "x", "image": "photo.png"}, "needs a 'mask'"),
        ({"id": "prompt-and-interp", "prompt": "x", "interpolate": [{"prompt": "y", "weight": 1.0}]},
         "either 'prompt' or 'interpolate'"),
        ({"id": "interp-both", "interpolate": [{"prompt": "y", "image": "photo.png", "weight": 1.0}]},
         "exactly one of 'prompt' or 'image'"),
        ({"id": "stray-mask", "mode": "img2img", "prompt": "x", "image": "photo.png", "mask": "mask.png"},
         "'mask' is set but mode img2img does not use it"),
    ]  # fmt: skip


def absolute(rows: list[dict], folder: Path) -> list[dict]:
    """Replace file names with absolute paths (bytes stay bytes)."""

    def fix(value: object) -> object:
        is_name = isinstance(value, str) and value.endswith(".png") and "://" not in value
        return str(folder / value) if is_name else value

    out = []
    for row in rows:
        row = {k: fix(v) for k, v in row.items()}
        if row.get("interpolate"):
            row["interpolate"] = [{**{"prompt": None, "image": None}, **item, "image": fix(item.get("image"))}
                                  for item in row["interpolate"]]  # fmt: skip
        out.append({**STEPS, **row} if "num_inference_steps" not in row else {**row, "prior_num_inference_steps": 3})
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    make_inputs(folder)
    return folder


@pytest.fixture(scope="module", params=OUTPUT_FORMATS)
def mixed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_models: str, inputs: Path,
    ray_two_gpus: None,
) -> dict:  # fmt: skip
    """The shuffled good and bad rows rendered on Ray in each output format (small shards: several per run)."""
    rows = absolute(good_rows() + [row for row, _ in bad_rows()], inputs)
    random.Random(7).shuffle(rows)
    return render(tmp_path_factory.mktemp("mixed"), tiny_models, rows, runner="ray", batch_size=3, shard_rows=10,
                  output_format=request.param).results  # fmt: skip


def estimated_hint(models: str, image_path: str, height: int, width: int) -> bytes:
    from transformers import pipeline as hf_pipeline

    from tests.helpers.reference import load_rgb

    estimator = hf_pipeline("depth-estimation", model=f"{models}/depth")
    depth = estimator(load_rgb(image_path).resize((width, height), Image.BICUBIC))["depth"]
    buffer = io.BytesIO()
    depth.convert("L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_mode_matches_its_diffusers_reference(mixed: dict, tiny_models: str, inputs: Path) -> None:
    for row in absolute(good_rows(), inputs):
        for index in range(row.get("num_images", 1)):
            result = mixed[(row["id"], index)]
            assert result["status"] == "ok", result
            assert result["seed"] == row["seed"] + index
            hint = None
            if row.get("mode") == "controlnet" and not row.get("hint"):
                hint = estimated_hint(tiny_models, row["image"], row["height"], row["width"])
            expected = mode_reference(tiny_models, row, result["seed"], hint=hint)
            got = load_result(result)
            assert got.shape == expected.shape == (result["height"], result["width"], 3), row["id"]
            assert_close_to_reference(got, expected, what=(row["id"], index))


def test_bad_rows_are_error_rows_naming_the_problem(mixed: dict) -> None:
    for row, phrase in bad_rows():
        result = mixed[(row["id"], 0)]
        assert result["status"] == "error" and result["uri"] is None, result
        assert phrase in result["error"], (row["id"], result["error"])


def test_inpaint_rows_with_different_masks_never_share_a_call(tmp_path: Path, tiny_models: str, inputs: Path) -> None:
    # diffusers blends image[:1]/mask[:1] into every row of a call; sharing would corrupt later rows.
    from jobs.planning.run_plan import manifest_work

    rows = absolute([r for r in good_rows() if r.get("mode") == "inpaint"], inputs)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(
        manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=tiny_models), batch_size=8
    )
    plan = manifest_work(config)
    calls = [sorted(set(batch.column("id").to_pylist())) for batch in plan.batches]
    assert sorted(calls) == [["inpaint-a"], ["inpaint-b"], ["inpaint-resized"]]  # inpaint-a's 2 images share one


def test_only_needed_decoders_load(tmp_path: Path, tiny_models: str) -> None:
    from jobs.execution.chain import build_chain
    from jobs.planning.run_plan import plan_run

    rows = absolute([good_rows()[0], good_rows()[3]], tmp_path)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    models = ModelPaths.resolve(models_dir=tiny_models)
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=models, layout="one-process")
    scan = plan_run(config, Storage(config.output)).scan()
    assert (scan.modes, scan.needs_depth, scan.num_images) == (["inpaint", "text2img"], False, 3)
    stages, sink = build_chain(config, modes=scan.modes, needs_depth=scan.needs_depth, movq_scales={},
                               output_format="files", run_id="r", cluster_gpus=0)  # fmt: skip
    assert [s.name for s in stages] == ["prior", "decoder"] and sink.name == "writer"
    assert stages[1].kwargs["models"] == {
        "text2img": f"{tiny_models}/decoder",
        "inpaint": f"{tiny_models}/decoder-inpaint",
    }


def test_inputs_from_s3_local_paths_and_bytes_give_the_same_images(
    tmp_path: Path, tiny_models: str, inputs: Path, s3_options: dict
) -> None:
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(**options)
    for path in inputs.iterdir():
        fs.put(str(path), f"{bucket}/inputs/{path.name}")
    chosen = [r for r in good_rows() if r["id"] in ("i2i", "inpaint-a", "cn", "prior-image", "interp")]

    def variant(kind: str) -> list[dict]:
        def ref(name: object) -> object:
            if not (isinstance(name, str) and name.endswith(".png")):
                return name
            return {"local": str(inputs / name), "s3": f"s3://{bucket}/inputs/{name}"}.get(kind) or (
                inputs / name
            ).read_bytes()

        rows = []
        for row in chosen:
            row = {k: ref(v) for k, v in row.items()}
            if row.get("interpolate"):
                row["interpolate"] = [{"prompt": i.get("prompt"), "image": ref(i.get("image")), "weight": i["weight"]}
                                      for i in row["interpolate"]]  # fmt: skip
            rows.append({**STEPS, **row})
        return rows

    outputs = {
        kind: render(tmp_path / kind, tiny_models, variant(kind), runner="local", storage_options=options).results
        for kind in ("local", "bytes", "s3")
    }
    assert all(r["status"] == "ok" for r in outputs["s3"].values()), outputs["s3"]
    for key, result in outputs["local"].items():
        for kind in ("bytes", "s3"):
            assert max_level_difference(load_png(result["uri"]), load_png(outputs[kind][key]["uri"])) <= 1
