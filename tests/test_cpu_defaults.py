"""What a CPU run chooses by itself keeps README's promise: every image within 1 level of diffusers' own."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actors.storage import Storage
from jobs.reporting.results import read_results
from schemas.results import final_results
from tests.helpers.cli import run
from tests.helpers.reference import load_png, max_level_difference, mode_reference
from tests.helpers.rows import write_manifest


def test_a_cpu_run_with_no_flag_but_the_models_matches_diffusers(tmp_path: Path, tiny_models: str) -> None:
    """``render --manifest M --output O --models DIR`` on this CPU-only machine (its own private Ray): the job
    picks its layout, threads and memory format itself. Rows leave every column at its default but the size and
    the decoder steps (README's 512 x 512 and 100 steps take minutes with the tiny models' 2x MoVQ on CPU). With
    channels-last chosen by default, the second image of the ControlNet row was 4-5 levels off.

    Calls of one image each (``--batch-size 1 --prior-batch-size 1``: the composition diffusers' single-row
    references have), so every image must equal its reference bit for bit at one torch thread, whatever the CPU
    (batched calls move float noise differently on Intel and AMD cores)."""
    depth = np.random.default_rng(3).integers(0, 255, (128, 128), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(depth).save(buffer, format="PNG")
    (tmp_path / "depth.png").write_bytes(buffer.getvalue())
    rows = [
        {"id": "t2i", "prompt": "a red fox in the snow", "seed": 11, "height": 64, "width": 64,
         "num_inference_steps": 4},
        {"id": "cn", "mode": "controlnet", "prompt": "a robot", "hint": "depth.png", "seed": 5, "num_images": 2,
         "height": 128, "width": 128, "num_inference_steps": 6},
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    proc = run("--manifest", manifest, "--output", str(output), "--models", tiny_models, "--progress", "off",
               "--batch-size", "1", "--prior-batch-size", "1", module="jobs.render", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["defaults"]["machine"]["gpus"] == 0, stats["defaults"]  # the CPU defaults were the ones chosen
    results = final_results(read_results(Storage(str(output)))).to_pylist()
    assert [r["status"] for r in results] == ["ok"] * 3
    by_id = {row["id"]: {**row, "hint": str(tmp_path / "depth.png")} if "hint" in row else row for row in rows}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job's decoders run one torch thread each (one CPU reserved per actor)
    try:
        for result in results:
            expected = mode_reference(tiny_models, by_id[result["id"]], result["seed"])
            levels = max_level_difference(load_png(result["uri"]), expected)
            assert levels == 0, (result["id"], result["image_index"], levels)
    finally:
        torch.set_num_threads(threads)
