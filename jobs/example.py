"""The bundled example manifest (jobs/examples/manifest.parquet) and the code that writes it."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

EXAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")

# Small sizes and few steps: the example renders in seconds on two CPU cores with tiny models.
_COMMON = {"height": 64, "width": 64, "num_inference_steps": 10, "prior_num_inference_steps": 10}
EXAMPLE_ROWS: list[dict] = [
    {"id": "red-fox", "prompt": "a red fox in the snow, watercolor", "seed": 1},
    {"id": "lighthouse", "prompt": "a lighthouse at dusk", "negative_prompt": "blurry, low quality", "seed": 2},
    {"id": "cat-portraits", "prompt": "portrait of a cat wearing a hat", "num_images": 3, "seed": 3},
    {"id": "city-wide", "prompt": "a futuristic city skyline", "width": 128, "guidance_scale": 6.0, "seed": 4},
    {"id": "forest-unseeded", "prompt": "a misty forest, oil painting"},
    {
        "id": "mountain-tall",
        "prompt": "snowy mountains under the northern lights",
        "height": 128,
        "prior_guidance_scale": 1.0,
        "seed": 6,
    },
]

EXAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("mode", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("num_images", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("num_inference_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("prior_num_inference_steps", pa.int64()),
        ("prior_guidance_scale", pa.float64()),
    ]
)


def example_table() -> pa.Table:
    """The example manifest as a table."""
    rows = [{**_COMMON, "mode": "text2img", **row} for row in EXAMPLE_ROWS]
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def example_manifest_path() -> str:
    """Path of the bundled example manifest."""
    return os.path.join(EXAMPLE_DIR, "manifest.parquet")


def write_example_manifest(path: str | None = None) -> str:
    """(Re)write the example manifest; `tests/test_example.py` checks the bundled file matches."""
    path = path or example_manifest_path()
    pq.write_table(example_table(), path)
    return path


if __name__ == "__main__":
    print(write_example_manifest())
