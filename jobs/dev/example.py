"""The bundled example: jobs/dev/examples/manifest.parquet plus its input images, and the code that writes them."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
SIDE = 64  # the tiny ControlNet checkpoint (real MoVQ scale 8) renders multiples of 64


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def example_images() -> dict[str, bytes]:
    """Deterministic input images: a source picture, an inpaint mask and a depth hint (PNG bytes)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / (SIDE - 1)
    source = np.stack([x, y, 1 - (x + y) / 2], axis=-1)
    disc = ((x - 0.5) ** 2 + (y - 0.55) ** 2) < 0.09
    source[disc] = [0.9, 0.2, 0.1]
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[SIDE // 4 : 3 * SIDE // 4, SIDE // 4 : 3 * SIDE // 4] = 255  # white = repaint
    depth = (255 * np.clip(1.0 - y * 0.8 + disc * 0.3, 0, 1)).astype(np.uint8)
    return {
        "source.png": _png((source * 255).round().astype(np.uint8)),
        "mask.png": _png(mask),
        "depth.png": _png(depth),
    }


_COMMON = {"height": SIDE, "width": SIDE, "num_inference_steps": 10, "prior_num_inference_steps": 10}
# Relative URIs resolve against the manifest's folder (jobs/dev/examples/).
EXAMPLE_ROWS: list[dict] = [
    {"id": "red-fox", "prompt": "a red fox in the snow, watercolor", "seed": 1},
    {"id": "lighthouse", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry, low quality", "seed": 2},
    {"id": "cat-portraits", "prompt": "portrait of a cat wearing a hat", "num_images": 3, "seed": 3},
    {"id": "city-wide", "prompt": "a futuristic city skyline", "width": 128, "guidance_scale": 6.0, "seed": 4},
    {"id": "forest-unseeded", "prompt": "a misty forest, oil painting"},
    {"id": "sunset-variation", "mode": "img2img", "prompt": "a sunset over the sea", "image": "source.png",
     "strength": 0.6, "seed": 6},
    {"id": "patch-the-disc", "mode": "inpaint", "prompt": "a blue flower", "image": "source.png",
     "mask": "mask.png", "num_images": 2, "seed": 7},
    {"id": "depth-given", "mode": "controlnet", "prompt": "a robot in a corridor", "hint": "depth.png", "seed": 8},
    {"id": "depth-estimated", "mode": "controlnet", "prompt": "a stone statue", "image": "source.png", "seed": 9},
    {"id": "depth-img2img", "mode": "controlnet_img2img", "prompt": "a bronze sculpture", "image": "source.png",
     "hint": "depth.png", "strength": 0.5, "seed": 10},
    {"id": "guided-prior", "prompt": "a cat in the style of this picture", "prior_image": "source.png",
     "prior_strength": 0.5, "seed": 11},
    {"id": "fox-meets-city", "interpolate": [{"prompt": "a red fox", "weight": 0.6},
                                               {"image": "source.png", "weight": 0.4}], "seed": 12},
]  # fmt: skip

EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("mode", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("image", pa.string()),
        ("mask", pa.string()),
        ("hint", pa.string()),
        ("prior_image", pa.string()),
        ("prior_strength", pa.float64()),
        (
            "interpolate",
            pa.list_(pa.struct([("prompt", pa.string()), ("image", pa.string()), ("weight", pa.float64())])),
        ),
        ("seed", pa.int64()),
        ("num_images", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("prior_num_inference_steps", pa.int64()),
        ("prior_guidance_scale", pa.float64()),
        ("strength", pa.float64()),
    ]
)


def example_table() -> pa.Table:
    """The example manifest as a table."""
    rows = [{**_COMMON, "mode": "text2img", **row} for row in EXAMPLE_ROWS]
    for row in rows:
        for item in row.get("interpolate") or []:
            item.setdefault("prompt", None)
            item.setdefault("image", None)
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def example_manifest_path() -> str:
    """Path of the bundled example manifest."""
    return os.path.join(EXAMPLE_DIR, "manifest.parquet")


def write_example(directory: str | None = None) -> str:
    """(Re)write the example manifest and its images; `tests/test_cli.py` checks the bundled files match."""
    directory = directory or EXAMPLE_DIR
    os.makedirs(directory, exist_ok=True)
    for name, data in example_images().items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    path = os.path.join(directory, "manifest.parquet")
    pq.write_table(example_table(), path)
    return path


if __name__ == "__main__":
    print(write_example())
