"""``benchmark gpu``'s equality phase: our prior and decoder against diffusers' Combined pipeline, one row per call on
both sides (equal batch composition), in float32 with TF32 off (target: within 1 level) and in the timed dtype."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from jobs.benchmarks.common import write_manifest
from jobs.benchmarks.gpu_checks import pixels_of, release
from jobs.dev.reference import combined_pipeline


def equality_check(args: argparse.Namespace, *, models: str, device: str, work_dir: Path) -> dict[str, Any]:
    """Render ``--check-rows`` rows at ``--check-steps``: ours vs Combined at equal batch composition.

    Combined renders one row per call, so our prior and decoder do too (``max_batch_size=1``): in
    float32 (TF32 off) the two must agree within 1 level; in ``--dtype`` the figure is the drift.
    """
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.planning.run_plan import manifest_work
    from schemas.accel import AccelOptions
    from schemas.config import JobConfig
    from schemas.models import ModelPaths

    steps = args.check_steps
    manifest = write_manifest(work_dir / "check.parquet", num_rows=args.check_rows, size=args.size, steps=steps)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 on both sides
    try:
        pipe = combined_pipeline(models, dtype=torch.float32, device=device)
        paths = ModelPaths.resolve(models_dir=models)
        config = JobConfig(manifest=manifest, output=str(work_dir / "check"), models=paths, batch_size=1)
        work = manifest_work(config).batches.work
        reference = {}
        for row in work.to_pylist():
            generator = torch.Generator("cpu").manual_seed(row["seed"])
            sizes = {"height": args.size, "width": args.size}
            image = pipe(
                prompt=row["prompt"],
                generator=generator,
                num_inference_steps=steps,
                prior_num_inference_steps=steps,
                **sizes,
            ).images[0]
            reference[row["id"]] = np.asarray(image, dtype=np.int16)
        del pipe
        release(device)
        figures = {}
        for dtype_name in dict.fromkeys(("float32", args.dtype)):
            accel = AccelOptions(channels_last=False)
            stage = {"dtype": dtype_name, "device": device, "accel": accel, "max_batch_size": 1}
            embeds = PriorActor(f"{models}/prior", **stage)(work)
            results = DecoderActor({"text2img": f"{models}/decoder"}, **stage)(embeds).to_pylist()
            release(device)
            figures[dtype_name] = _differences(results, reference)
            print(
                f"vs Combined float32, one row per call ({len(results)} rows, {steps} steps): "
                f"ours {dtype_name} {figures[dtype_name]}"
            )
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"check_rows": args.check_rows, "check_steps": steps, "vs_combined_float32": figures}


def _differences(results: list[dict], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    diffs = []
    for result in results:
        if result["error"] is not None:
            return {"error": result["error"]}
        diffs.append(np.abs(pixels_of(result).astype(np.int16) - reference[result["id"]]))
    stacked = np.stack(diffs)
    return {
        "max_level_difference": int(stacked.max()),
        "mean_level_difference": round(float(stacked.mean()), 4),
        "share_over_1_level": round(float((stacked > 1).mean()), 6),
    }
