"""Mode ``simulated``: the job's planner and runner with sleeping stand-in stages on a local Ray with logical GPUs."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cluster.resources import StagePlan, priors_needed
from jobs.benchmarks.common import Mode, machine, write_manifest
from schemas.results import result_from_work, results_table
from schemas.work import WORK_SCHEMA, embed_fields, embed_schema

GENERATOR_STATE_BYTES = 5056  # a CPU torch.Generator's state, what the prior hands the decoder per image


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


class SimulatedPrior:
    """Stand-in prior: each call lasts ``seconds_per_image`` per row and emits real-size embeddings.

    Output rows carry ``embed_dim`` float32 embeddings (1280: the real prior's) and a generator
    state of the real size, so payloads weigh what real ones do.
    """

    def __init__(self, *, seconds_per_image: float, embed_dim: int = 1280, worker: str = "") -> None:
        self.seconds_per_image = seconds_per_image
        self.embed_dim = embed_dim
        self.worker = f"simulated-prior {worker}".strip()
        self._embed(WORK_SCHEMA.empty_table())  # first use of Arrow's kernels is slow: not what is measured

    def __call__(self, work: pa.Table) -> pa.Table:
        started = time.perf_counter()
        table = self._embed(work)
        _sleep_until(started + self.seconds_per_image * work.num_rows)
        return table

    def _embed(self, work: pa.Table) -> pa.Table:
        n = work.num_rows
        values = pa.array(np.zeros(n * self.embed_dim, dtype=np.float32))
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * self.embed_dim)
        embeds = pa.ListArray.from_arrays(offsets, values)
        columns = [
            embeds,
            embeds,
            pa.array([bytes(GENERATOR_STATE_BYTES)] * n, pa.binary()),
            pa.array([self.worker] * n, pa.string()),
            pa.array([self.seconds_per_image] * n, pa.float64()),
        ]
        table = work
        for field, column in zip(embed_fields(self.embed_dim), columns):
            table = table.append_column(field, column)
        return table.cast(embed_schema(self.embed_dim))


class SimulatedDecoder:
    """Stand-in decoder: each call lasts ``seconds_per_image`` per row and returns ``ok`` results rows."""

    def __init__(self, *, seconds_per_image: float, run_id: str = "simulated", worker: str = "") -> None:
        self.seconds_per_image = seconds_per_image
        self.run_id = run_id
        self.worker = f"simulated-decoder {worker}".strip()
        self._results(embed_schema(1280).empty_table())  # warm Arrow's kernels, as SimulatedPrior does

    def __call__(self, embeds: pa.Table) -> pa.Table:
        started = time.perf_counter()
        table = self._results(embeds)
        _sleep_until(started + self.seconds_per_image * embeds.num_rows)
        return table

    def _results(self, embeds: pa.Table) -> pa.Table:
        rows = [
            result_from_work(
                row,
                run_id=self.run_id,
                uri=f"simulated://{row['key']}",
                width=row["width"],
                height=row["height"],
                decoder_worker=self.worker,
                decoder_seconds=self.seconds_per_image,
            )
            for row in embeds.drop_columns(["image_embeds", "negative_image_embeds", "generator_state"]).to_pylist()
        ]
        return results_table(rows)


def simulate_once(
    *,
    work_dir: Path,
    num_decoders: int,
    num_priors: int,
    rows: int,
    prior_seconds: float,
    decoder_seconds: float,
    batch_size: int,
    prior_batch_size: int,
    wiring: str,
) -> dict[str, Any]:
    """One simulated run on the connected Ray: plan, group and run exactly as a render job does."""
    from actors.storage import Storage
    from jobs.benchmarks.ray_data import run_ray_data
    from jobs.execution.job import prior_batch_size as resolve_prior_batch_size
    from jobs.execution.job import work_groups
    from jobs.execution.runner import StageSpec, run_ray
    from jobs.output.results import ResultsWriter
    from jobs.planning.plan import make_plan
    from schemas.config import JobConfig
    from schemas.manifest import SUPPORTED_MODES

    run_dir = work_dir / f"simulated-{wiring}-{num_decoders}"
    manifest = write_manifest(run_dir / "manifest.parquet", num_rows=rows)
    config = JobConfig(
        manifest=manifest, output=str(run_dir / "out"), batch_size=batch_size, prior_batch_size=prior_batch_size
    )
    plan = make_plan(config, done=None, supported_modes=SUPPORTED_MODES)
    stages = [
        StageSpec(
            name="prior",
            cls=SimulatedPrior,
            kwargs={"seconds_per_image": prior_seconds},
            resources=StagePlan(num_actors=num_priors, num_gpus=1.0, num_cpus=0.0),
            batch_size=resolve_prior_batch_size(config),
        ),
        StageSpec(
            name="decoder",
            cls=SimulatedDecoder,
            kwargs={"seconds_per_image": decoder_seconds},
            resources=StagePlan(num_actors=num_decoders, num_gpus=1.0, num_cpus=0.0),
            batch_size=batch_size,
        ),
    ]
    writer = ResultsWriter(Storage(config.output), run_id="simulated")
    timeline: dict[str, Any] = {}
    called = time.monotonic()
    if wiring == "actors":
        results = run_ray(stages, work_groups(plan, config), wait_for_actors=True, timeline=timeline)
    else:
        results = run_ray_data(stages, work_groups(plan, config))
    num_images, first, last, first_rows = 0, None, None, 0
    for table in results:
        now = time.monotonic()
        if first is None:
            first, first_rows = now, table.num_rows
        last = now
        num_images += table.num_rows
        writer.add(table)
    writer.close()
    if num_images != plan.num_to_render:
        raise RuntimeError(f"simulated run returned {num_images} images for {plan.num_to_render}")
    ideal = num_decoders / decoder_seconds
    first_bound = min(prior_batch_size, rows) * prior_seconds + min(batch_size, rows) * decoder_seconds
    from_call = first - called
    if wiring == "actors":
        start = timeline["first_dispatch"]
        seconds = last - start
        achieved = num_images / seconds
        decoder_busy = timeline["busy_seconds"][1] / (num_decoders * seconds)
        actors_start = timeline["actors_ready"] - timeline["started"]
    else:  # Ray Data starts its actors inside the run: count from the first result (steady state only)
        start = called
        seconds = last - first
        achieved = (num_images - first_rows) / seconds if seconds > 0 else float("nan")
        decoder_busy = None
        actors_start = None
    return {
        "wiring": wiring,
        "num_decoders": num_decoders,
        "num_priors": num_priors,
        "rows": num_images,
        "batch_size": batch_size,
        "prior_batch_size": prior_batch_size,
        "prior_ms": prior_seconds * 1000,
        "decoder_ms": decoder_seconds * 1000,
        "seconds": round(seconds, 3),
        "images_per_s": round(achieved, 3),
        "ideal_images_per_s": round(ideal, 3),
        "efficiency": round(achieved / ideal, 4),
        "decoder_busy": None if decoder_busy is None else round(decoder_busy, 4),
        "first_image_s": round(first - start, 3),
        "first_image_bound_s": round(first_bound, 3),
        "first_image_from_call_s": round(from_call, 3),  # actor start-up included, either wiring
        "actors_start_s": None if actors_start is None else round(actors_start, 3),
    }


def run_simulated(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``simulated``: sleeping stages on a local Ray with logical GPUs, 1/2/4/8 decoders."""
    import ray

    counts = [args.num_decoders] if args.num_decoders else [1, 2, 4, 8]
    prior_s, decoder_s = args.prior_ms / 1000, args.decoder_ms / 1000
    priors = {
        d: args.num_priors or priors_needed(num_decoders=d, prior_seconds=prior_s, decoder_seconds=decoder_s)
        for d in counts
    }
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    if ray.is_initialized():
        raise RuntimeError("benchmark simulated starts its own local Ray; call it without a Ray connection")
    num_gpus = max(d + priors[d] for d in counts)
    ray.init(
        num_cpus=os.cpu_count(), num_gpus=num_gpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    runs = []
    try:
        for d in counts:
            run = simulate_once(
                work_dir=work_dir,
                num_decoders=d,
                num_priors=priors[d],
                rows=args.rows or args.rows_per_decoder * d,
                prior_seconds=prior_s,
                decoder_seconds=decoder_s,
                batch_size=args.batch_size,
                prior_batch_size=args.prior_batch_size or args.batch_size,
                wiring=args.wiring,
            )
            runs.append(run)
            print(
                f"{run['wiring']:8s} {d} decoder(s) + {run['num_priors']} prior(s), {run['rows']} images: "
                f"{run['images_per_s']:.2f} images/s of ideal {run['ideal_images_per_s']:.2f} -> "
                f"efficiency {run['efficiency']:.3f}; first image {run['first_image_s']:.3f} s "
                f"(bound {run['first_image_bound_s']:.3f} s; {run['first_image_from_call_s']:.2f} s from the call)",
                flush=True,
            )
    finally:
        ray.shutdown()
    return {"mode": "simulated", "machine": machine(), **runs[-1], "runs": runs}


def add_arguments(sim: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark simulated``."""
    sim.add_argument("--num-decoders", type=int, help="one run with this many decoders (default: 1, 2, 4 and 8)")
    sim.add_argument("--num-priors", type=int, help="prior actors (default: enough for the decoders, +10%%)")
    sim.add_argument("--prior-ms", type=float, default=20.0, help="prior cost per image")
    sim.add_argument("--decoder-ms", type=float, default=100.0, help="decoder cost per image")
    sim.add_argument("--rows", type=int, help="images per run (default: --rows-per-decoder x decoders)")
    sim.add_argument("--rows-per-decoder", type=int, default=160, help="images per decoder when --rows is unset")
    sim.add_argument("--batch-size", type=int, default=4, help="images per decoder call")
    sim.add_argument("--prior-batch-size", type=int, help="images per prior call (default: --batch-size)")
    sim.add_argument("--wiring", choices=("actors", "ray-data"), default="actors", help="runner to measure")
    sim.add_argument("--work-dir", help="where manifests and results go (default: a new temp dir)")


MODES = (Mode(name="simulated", help="sleeping stages on a local Ray", add_arguments=add_arguments, run=run_simulated),)
