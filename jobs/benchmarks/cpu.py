"""Mode ``cpu``: the whole render job vs a per-row diffusers loop, tiny models, both as fresh processes."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.benchmarks.common import Mode, machine, timed, write_manifest
from jobs.dev.reference import combined_pipeline


def diffusers_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The plain baseline: one `KandinskyV22CombinedPipeline` call per manifest row, PNG saved per row."""
    import torch

    pipe = combined_pipeline(args.models, dtype=torch.float32, device="cpu")
    os.makedirs(args.output, exist_ok=True)
    rows = pq.read_table(args.manifest).to_pylist()
    for row in rows:
        image = pipe(
            prompt=row["prompt"],
            height=row["height"],
            width=row["width"],
            num_inference_steps=row["num_inference_steps"],
            prior_num_inference_steps=row["prior_num_inference_steps"],
            generator=torch.Generator("cpu").manual_seed(row["seed"]),
        ).images[0]
        image.save(os.path.join(args.output, f"{row['id']}.png"))
    return {"rows": len(rows)}


# Two one-thread decoder actors and a prior that reserves no CPU. One two-thread decoder was as fast
# on a quiet machine but 7x slower when another process took a core (OpenMP threads wait for each
# other); see BENCHMARKS.md.
CPU_RENDER_ARGS = (
    "--batch-size 16 --prior-batch-size 32 --num-decoder-actors 2 --decoder-cpus 1 --prior-cpus 0 "
    "--channels-last --log-level WARNING"
)


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``cpu``: the whole render job vs a per-row diffusers loop, both as fresh processes."""
    from PIL import Image

    from jobs.dev.tiny_models import build_tiny_models

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    models = str(work_dir / "models")
    build_tiny_models(models)
    manifest = write_manifest(work_dir / "manifest.parquet", num_rows=args.rows, size=args.size, steps=args.steps)
    ours_out, loop_out = work_dir / "ours", work_dir / "loop"
    ours_cmd = [sys.executable, "-m", "jobs.cli", "render", "--manifest", manifest, "--output", str(ours_out)]
    ours_cmd += ["--models", models, "--overwrite", *args.render_args.split()]
    loop_cmd = [sys.executable, "-m", "jobs.cli", "benchmark", "diffusers-loop", "--manifest", manifest]
    loop_cmd += ["--models", models, "--output", str(loop_out)]
    ours, loop = [], []
    for repeat in range(args.repeats):
        ours.append(timed(ours_cmd, log=work_dir / f"ours-{repeat}.log"))
        print(f"kandinsky-render render: {ours[-1]:.2f} s (process start to exit)", flush=True)
        loop.append(timed(loop_cmd, log=work_dir / f"loop-{repeat}.log"))
        print(f"diffusers per-row loop:  {loop[-1]:.2f} s (process start to exit)", flush=True)
    from actors.storage import Storage
    from jobs.output.results import final_results, read_results

    final = final_results(read_results(Storage(str(ours_out)))).to_pylist()
    diffs = []
    for row in final:
        if row["status"] != "ok":
            raise RuntimeError(f"render produced an error row: {row['error']}")
        with Image.open(row["uri"]) as a, Image.open(loop_out / f"{row['id']}.png") as b:
            diffs.append(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)))
    levels = np.stack(diffs)
    worst = int(levels.max())
    ours_s, loop_s = float(np.median(ours)), float(np.median(loop))
    print(
        f"ratio {ours_s / loop_s:.3f} (target <= 0.85); pixels vs the loop: largest difference {worst} level(s), "
        f"{(levels > 1).mean():.2%} of values differ by more than 1"
    )
    return {
        "mode": "cpu",
        "machine": machine(),
        "rows": args.rows,
        "size": args.size,
        "steps": args.steps,
        "render_args": args.render_args,
        "ours_seconds": round(ours_s, 3),
        "diffusers_loop_seconds": round(loop_s, 3),
        "ratio": round(ours_s / loop_s, 4),
        "ours_runs": [round(s, 3) for s in ours],
        "loop_runs": [round(s, 3) for s in loop],
        "max_level_difference": worst,
        "mean_level_difference": round(float(levels.mean()), 4),
        "share_over_1_level": round(float((levels > 1).mean()), 6),
    }


def add_arguments(cpu: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark cpu``."""
    cpu.add_argument("--rows", type=int, default=128, help="text2img rows")
    cpu.add_argument("--size", type=int, default=64, help="height and width")
    cpu.add_argument("--steps", type=int, default=10, help="prior and decoder steps")
    cpu.add_argument("--render-args", default=CPU_RENDER_ARGS, help="extra flags of the timed render command")
    cpu.add_argument("--repeats", type=int, default=1, help="alternate both commands this many times (medians)")
    cpu.add_argument("--work-dir", help="where models, manifests and outputs go (default: a new temp dir)")


def add_loop_arguments(loop: argparse.ArgumentParser) -> None:
    """Flags of the hidden ``benchmark diffusers-loop`` (the baseline process ``cpu`` times)."""
    loop.add_argument("--manifest", required=True)
    loop.add_argument("--models", required=True)
    loop.add_argument("--output", required=True)


MODES = (
    Mode(
        name="cpu",
        help="whole job vs a per-row diffusers loop, tiny models",
        add_arguments=add_arguments,
        run=run_cpu,
        quiet_libraries=True,
    ),
    Mode(name="diffusers-loop", help=None, add_arguments=add_loop_arguments, run=diffusers_loop, quiet_libraries=True),
)
