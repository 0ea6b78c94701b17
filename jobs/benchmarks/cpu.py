"""Mode ``cpu``: the whole render job with default flags vs a per-row diffusers loop and a Ray Data script, tiny
models, each a fresh process."""

from __future__ import annotations

import argparse
import json
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


def ray_data_peer(args: argparse.Namespace) -> dict[str, Any]:
    """What a Ray user would write instead: Ray Data over the Combined pipeline, two one-CPU actors, batch 4.

    ``read_parquet`` -> ``map_batches`` with a callable class (an actor pool of ``--actors`` one-CPU
    actors); each call renders its batch in one pipeline call with a seeded CPU generator per row and
    saves one PNG per row.
    """
    import ray
    import torch

    # One logical CPU more than the machine has: with both cores held by the two actors, Ray Data's own small
    # tasks (listing files, reading, counting) would never be scheduled and the script would hang.
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, logging_level="ERROR")

    class Render:
        def __init__(self, models: str, output: str) -> None:
            from actors.common import quiet_libraries

            quiet_libraries()
            self.pipe = combined_pipeline(models, dtype=torch.float32, device="cpu")
            self.output = output

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            first = {key: batch[key][0].item() for key in ("height", "width", "num_inference_steps")}
            images = self.pipe(
                prompt=[str(text) for text in batch["prompt"]],
                height=first["height"],
                width=first["width"],
                num_inference_steps=first["num_inference_steps"],
                prior_num_inference_steps=int(batch["prior_num_inference_steps"][0]),
                generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in batch["seed"]],
            ).images
            for row_id, image in zip(batch["id"], images):
                image.save(os.path.join(self.output, f"{row_id}.png"))
            return {"id": batch["id"]}

    os.makedirs(args.output, exist_ok=True)
    rendered = (
        ray.data.read_parquet(args.manifest)
        .map_batches(
            Render,
            fn_constructor_kwargs={"models": args.models, "output": args.output},
            concurrency=args.actors,
            num_cpus=1,
            batch_size=args.batch_size,
        )
        .count()
    )
    ray.shutdown()
    return {"rows": rendered}


def _fixed_seconds(output: Path, wall: float) -> dict[str, Any]:
    """From a finished run's stats.json: its timeline and fixed cost (start to first model call, plus shutdown)."""
    import json

    timeline = json.loads((output / "stats.json").read_text())["timeline"]
    return {
        "timeline": timeline,
        "fixed_seconds": round(timeline["first_dispatch"] + wall - timeline["rendered"], 3),
    }


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``cpu``: the whole render job (default flags) vs a per-row diffusers loop and a Ray Data script."""
    from PIL import Image

    from jobs.dev.tiny_models import build_tiny_models

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    models = str(work_dir / f"models-movq{args.movq_scale_factor}")
    build_tiny_models(models, movq_scale_factor=args.movq_scale_factor)
    manifest = write_manifest(work_dir / "manifest.parquet", num_rows=args.rows, size=args.size, steps=args.steps)
    ours_out, loop_out, peer_out = work_dir / "ours", work_dir / "loop", work_dir / "peer"
    ours_cmd = [sys.executable, "-m", "jobs.cli", "render", "--manifest", manifest, "--output", str(ours_out)]
    ours_cmd += ["--models", models, "--overwrite", *args.render_args.split()]
    helper = [sys.executable, "-m", "jobs.cli", "benchmark"]
    loop_cmd = [*helper, "diffusers-loop", "--manifest", manifest, "--models", models, "--output", str(loop_out)]
    peer_cmd = [*helper, "ray-data-peer", "--manifest", manifest, "--models", models, "--output", str(peer_out)]
    runs: dict[str, list[float]] = {"ours": [], "loop": [], "peer": []}
    fixed = []
    for repeat in range(args.repeats):
        for name, command, label in (
            ("ours", ours_cmd, "kandinsky-render render"),
            ("loop", loop_cmd, "diffusers per-row loop "),
            ("peer", peer_cmd, "Ray Data peer script   "),
        ):
            if name == "peer" and not args.peer:
                continue
            runs[name].append(timed(command, log=work_dir / f"{name}-{repeat}.log"))
            print(f"{label}: {runs[name][-1]:.2f} s (process start to exit)", flush=True)
            if name == "ours":
                fixed.append(_fixed_seconds(ours_out, runs[name][-1]))
                marks = ", ".join(f"{mark} {at:.2f}" for mark, at in fixed[-1]["timeline"].items())
                print(f"  timeline (s after start): {marks}; fixed cost {fixed[-1]['fixed_seconds']:.2f} s", flush=True)
    from actors.storage import Storage
    from jobs.reporting.results import read_results
    from schemas.results import final_results

    final = final_results(read_results(Storage(str(ours_out)))).to_pylist()
    diffs = []
    for row in final:
        if row["status"] != "ok":
            raise RuntimeError(f"render produced an error row: {row['error']}")
        with Image.open(row["uri"]) as a, Image.open(loop_out / f"{row['id']}.png") as b:
            diffs.append(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)))
    levels = np.stack(diffs)
    worst = int(levels.max())
    ours_s, loop_s = float(np.median(runs["ours"])), float(np.median(runs["loop"]))
    peer_s = float(np.median(runs["peer"])) if runs["peer"] else None
    fixed_s = float(np.median([f["fixed_seconds"] for f in fixed]))
    print(
        f"ratio vs the loop {ours_s / loop_s:.3f} (target <= 0.85 at 128 rows, <= 0.70 at 512)"
        + (f"; vs the Ray Data peer {ours_s / peer_s:.3f} (target <= 0.85)" if peer_s else "")
        + f"; fixed cost {fixed_s:.2f} s (target <= 6); pixels vs the loop: largest difference {worst} level(s), "
        f"{(levels > 1).mean():.2%} of values differ by more than 1"
    )
    stats = json.loads((ours_out / "stats.json").read_text())
    return {
        "mode": "cpu",
        "machine": machine(),
        "rows": args.rows,
        "size": args.size,
        "steps": args.steps,
        "movq_scale_factor": args.movq_scale_factor,
        "render_args": args.render_args,
        "defaults_chosen": stats["defaults"]["chosen"],
        "ours_seconds": round(ours_s, 3),
        "diffusers_loop_seconds": round(loop_s, 3),
        "ray_data_peer_seconds": None if peer_s is None else round(peer_s, 3),
        "ratio": round(ours_s / loop_s, 4),
        "ratio_vs_peer": None if peer_s is None else round(ours_s / peer_s, 4),
        "fixed_seconds": round(fixed_s, 3),
        "timeline": fixed[-1]["timeline"],
        "runs": {name: [round(s, 3) for s in seconds] for name, seconds in runs.items()},
        "max_level_difference": worst,
        "mean_level_difference": round(float(levels.mean()), 4),
        "share_over_1_level": round(float((levels > 1).mean()), 6),
    }


def add_arguments(cpu: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark cpu``."""
    cpu.add_argument("--rows", type=int, default=128, help="text2img rows")
    cpu.add_argument("--size", type=int, default=128, help="height and width")
    cpu.add_argument("--steps", type=int, default=10, help="prior and decoder steps")
    cpu.add_argument(
        "--movq-scale-factor",
        type=int,
        default=8,
        choices=(2, 8),
        help="the tiny decoders' MoVQ downsampling: 8 as in the real models (128x128 images, 16x16 latents); "
        "2 makes the latents 16x larger and the UNet's attention the whole cost",
    )
    cpu.add_argument("--render-args", default="", help="extra flags of the timed render command (default: none)")
    cpu.add_argument("--repeats", type=int, default=1, help="alternate the commands this many times (medians)")
    cpu.add_argument("--no-peer", dest="peer", action="store_false", help="leave out the Ray Data peer script")
    cpu.add_argument("--work-dir", help="where models, manifests and outputs go (default: a new temp dir)")


def add_loop_arguments(loop: argparse.ArgumentParser) -> None:
    """Flags of the hidden ``benchmark diffusers-loop`` and ``ray-data-peer`` (processes that ``cpu`` times)."""
    loop.add_argument("--manifest", required=True)
    loop.add_argument("--models", required=True)
    loop.add_argument("--output", required=True)


def add_peer_arguments(peer: argparse.ArgumentParser) -> None:
    """Flags of the hidden ``benchmark ray-data-peer``."""
    add_loop_arguments(peer)
    peer.add_argument("--actors", type=int, default=2, help="one-CPU actors in the pool")
    peer.add_argument("--batch-size", type=int, default=4, help="rows per map_batches call")


MODES = (
    Mode(
        name="cpu",
        help="whole job (default flags) vs a per-row diffusers loop and a Ray Data script, tiny models",
        add_arguments=add_arguments,
        run=run_cpu,
        quiet_libraries=True,
    ),
    Mode(name="diffusers-loop", help=None, add_arguments=add_loop_arguments, run=diffusers_loop, quiet_libraries=True),
    Mode(name="ray-data-peer", help=None, add_arguments=add_peer_arguments, run=ray_data_peer, quiet_libraries=True),
)
