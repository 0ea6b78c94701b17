"""Mode ``layout``: the layout the job chooses against every alternative, predicted and simulated on logical GPUs.

1. Predicted (`cluster.layout`): at 2, 4, 8, 16 and 64 GPUs, images/s per GPU of the chosen layout,
   of the best layout a sweep finds, and of the best the job could do before (whole GPUs only:
   prior GPUs, decoders on the rest), from the stage costs of the real models at 768x768 and 50 + 25 guided
   steps (FLOP counts, `jobs.planning.calibration`).
2. Simulated: the whole job (`benchmark simulated`'s stand-in stages) on a local Ray with N logical
   GPUs, the stand-ins sleeping the relative costs above scaled to ``--decoder-ms``, and stand-ins
   that share a logical GPU time-slicing it; images/s per reserved GPU measured against the
   prediction (time-slicing without loss, as the simulation does), for the chosen layout and the old one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from typing import Any

from cluster.layout import CLIP_GROUP, DECODER_GROUP, Layout, StageCosts, choose, co_located, dedicated, sweep
from jobs.benchmarks.common import Mode, machine

PREDICTED_GPUS = (2, 4, 8, 16, 64)


def real_costs(*, size: int = 768, steps: int = 50, prior_steps: int = 25) -> StageCosts:
    """The real models' per-image costs on an H100 (FLOP counts at the estimate's efficiency)."""
    from jobs.planning.calibration import estimated_profile, image_seconds
    from schemas.manifest import RenderDefaults

    defaults = RenderDefaults(num_inference_steps=steps, prior_num_inference_steps=prior_steps)
    seconds = image_seconds(estimated_profile("H100"), defaults=defaults, pixels=size * size)
    return StageCosts(prior=seconds["prior"], decoder=seconds["decoder"], source=f"H100 FLOP estimate, {size}px")


def old_layout(num_gpus: int, costs: StageCosts) -> Layout:
    """What the job did before, at best (with a calibration profile): whole GPUs only, as many prior GPUs as give
    the most images/s (one GPU: shared)."""
    if num_gpus < 2:
        return co_located(num_gpus=num_gpus, num_clip_actors=1, costs=costs, clip_stages=("prior",))
    return max(
        (
            dedicated(num_gpus=num_gpus, num_clip_gpus=k, costs=costs, clip_stages=("prior",))
            for k in range(1, num_gpus)
        ),
        key=lambda layout: layout.images_per_s,
    )


def predicted(costs: StageCosts) -> list[dict[str, Any]]:
    """Part 1: chosen vs best vs old, per cluster size."""
    rows = []
    for gpus in PREDICTED_GPUS:
        chosen, best = choose(num_gpus=gpus, costs=costs), sweep(num_gpus=gpus, costs=costs)[0]
        old = old_layout(gpus, costs)
        rows.append(
            {
                "num_gpus": gpus,
                "chosen": chosen.describe(),
                "chosen_per_gpu": round(chosen.images_per_s_per_gpu, 4),
                "best": best.describe(),
                "best_per_gpu": round(best.images_per_s_per_gpu, 4),
                "of_best": round(chosen.images_per_s / best.images_per_s, 4),
                "old_per_gpu": round(old.images_per_s_per_gpu, 4),
                "gain_over_old": round(chosen.images_per_s / old.images_per_s - 1, 4),
                "why": chosen.note,
            }
        )
        print(
            f"{gpus:>3} GPUs: chosen {chosen.describe()}: {chosen.images_per_s_per_gpu:.3f} images/s per GPU = "
            f"{rows[-1]['of_best']:.1%} of the best swept ({best.describe()}); the old layout "
            f"{old.images_per_s_per_gpu:.3f} ({rows[-1]['gain_over_old']:+.1%} now)",
            flush=True,
        )
    return rows


def simulate(args: argparse.Namespace, costs: StageCosts) -> list[dict[str, Any]]:
    """Part 2: the job with sleeping stages on N logical GPUs, chosen and old layouts, measured vs predicted."""
    import ray

    from jobs.benchmarks.simulated import simulate_once

    scale = args.decoder_ms / 1000 / costs.decoder
    sim = StageCosts(prior=costs.prior * scale, decoder=costs.decoder * scale, source="simulated")
    args.prior_ms, args.decoder_ms = sim.prior * 1000, sim.decoder * 1000
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-")
    os.environ["KR_SIM_SESSION"] = uuid.uuid4().hex[:8]  # the stand-ins' per-GPU locks of this run only
    runs = []
    for gpus in args.gpus:
        ray.init(
            num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
        )
        try:
            for name, layout in (("chosen", choose(num_gpus=gpus, costs=sim)), ("old", old_layout(gpus, sim))):
                clip, decoder = layout.group(CLIP_GROUP), layout.group(DECODER_GROUP)
                run = simulate_once(
                    args,
                    output=os.path.join(args.work_dir, f"out-{gpus}-{name}"),
                    rows=args.images_per_gpu * gpus,
                    num_decoders=decoder.num_actors,
                    num_priors=clip.num_actors,
                    layout=layout.kind,
                    prior_gpus=clip.num_gpus,
                    decoder_gpus=decoder.num_gpus,
                    gpu_lock=True,
                )
                # The simulation time-slices a shared GPU without loss: predict it that way.
                expected = layout
                if layout.kind == "co-located":
                    expected = co_located(
                        num_gpus=gpus,
                        num_clip_actors=clip.num_actors,
                        costs=sim,
                        clip_stages=clip.stages,
                        efficiency=1.0,
                    )
                measured = run["images_per_s"] / gpus
                runs.append(
                    {
                        "num_gpus": gpus,
                        "layout": name,
                        "describe": layout.describe(),
                        "predicted_per_gpu": round(expected.images_per_s_per_gpu, 4),
                        "measured_per_gpu": round(measured, 4),
                        "measured_of_predicted": round(measured / expected.images_per_s_per_gpu, 4),
                        "rows": run["rows"],
                        "seconds": run["seconds"],
                    }
                )
                print(
                    f"simulated {gpus:>2} GPUs, {name} ({layout.describe()}): {measured:.3f} images/s per GPU, "
                    f"predicted {expected.images_per_s_per_gpu:.3f} ({runs[-1]['measured_of_predicted']:.1%})",
                    flush=True,
                )
        finally:
            ray.shutdown()
    return runs


def run_layout(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``layout``: predicted sweep, then the simulated runs (``--gpus`` empty: predictions only)."""
    costs = real_costs()
    print(
        f"stage costs per image ({costs.source}): prior {costs.prior:.4f} s, decoder {costs.decoder:.4f} s "
        f"(CLIP work {costs.clip / costs.decoder:.1%} of a decoder's)",
        flush=True,
    )
    rows = predicted(costs)
    worst = min(row["of_best"] for row in rows)
    print(f"chosen layouts: at least {worst:.1%} of the best swept at {', '.join(map(str, PREDICTED_GPUS))} GPUs")
    runs = simulate(args, costs) if args.gpus else []
    return {
        "mode": "layout",
        "machine": machine(),
        "costs": costs.__dict__,
        "predicted": rows,
        "worst_of_best": worst,
        "simulated": runs,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark layout``."""
    parser.add_argument(
        "--gpus",
        type=int,
        nargs="*",
        default=[2, 4, 8, 16],
        help="logical GPU counts to simulate (none: predictions only)",
    )
    parser.add_argument("--decoder-ms", type=float, default=400.0, help="simulated decoder milliseconds per image")
    parser.add_argument("--images-per-gpu", type=int, default=40, help="images per logical GPU in each simulated run")
    parser.add_argument("--batch-size", type=int, default=4, help="images per decoder call")
    parser.add_argument("--prior-batch-size", type=int, default=4, help="images per prior call")
    parser.add_argument("--work-dir", help="where manifests and outputs go (default: a new temp dir)")
    parser.set_defaults(image_size=64, output_format="webdataset", shard_rows=40, num_writers=None, s3=False)


MODES = (
    Mode(
        name="layout",
        help="the chosen stage layout vs every alternative at 2-64 GPUs, predicted and simulated on logical GPUs",
        add_arguments=add_arguments,
        run=run_layout,
    ),
)
