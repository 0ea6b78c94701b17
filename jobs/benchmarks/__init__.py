"""``kandinsky-render benchmark``: cpu, simulated, plan and gpu throughput figures (see BENCHMARKS.md).

Every mode prints readable lines, then one JSON object as its last line. Speed is only ever
measured here, never asserted by tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.resources import StagePlan, priors_needed, suggest_stages
from jobs.dev.real_size import build_real_size_models
from jobs.dev.reference import combined_pipeline
from schemas.results import RESULTS_SCHEMA, result_from_work, results_table
from schemas.work import EMBED_FIELDS, EMBED_SCHEMA, WORK_SCHEMA

REPO = Path(__file__).resolve().parent.parent
GENERATOR_STATE_BYTES = 5056  # a CPU torch.Generator's state, what the prior hands the decoder per image
NOUNS = ("fox", "cat", "lighthouse", "city", "forest", "mountain", "boat", "tree", "robot", "castle", "river", "owl")
ADJECTIVES = ("red", "misty", "ancient", "futuristic", "tiny", "giant", "golden", "frozen", "quiet", "stormy")
STYLES = ("watercolor", "oil painting", "photo", "pixel art", "pencil sketch", "woodcut")


def prompt(i: int) -> str:
    """A deterministic, varied prompt; distinct for i below 720."""
    return (
        f"a {ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 12]} at {('dawn', 'dusk', 'night')[(i // 120) % 3]}, "
        f"{STYLES[(i // 360) % 6]}"
    )


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where /proc has it (ru_maxrss keeps a forking parent's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _timed(command: list[str], *, log: Path) -> float:
    """Seconds from spawning ``command`` to its exit; raises with the log tail when it fails."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=REPO, env=_subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[:5])} ... exited {proc.returncode}:\n{tail}")
    return seconds


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


# ---------------------------------------------------------------- simulated stages


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
        for field, column in zip(EMBED_FIELDS, columns):
            table = table.append_column(field, column)
        return table.cast(EMBED_SCHEMA)


class SimulatedDecoder:
    """Stand-in decoder: each call lasts ``seconds_per_image`` per row and returns ``ok`` results rows."""

    def __init__(self, *, seconds_per_image: float, run_id: str = "simulated", worker: str = "") -> None:
        self.seconds_per_image = seconds_per_image
        self.run_id = run_id
        self.worker = f"simulated-decoder {worker}".strip()
        self._results(EMBED_SCHEMA.empty_table())  # warm Arrow's kernels, as SimulatedPrior does

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


# ---------------------------------------------------------------- simulated


def write_manifest(
    path: Path, *, num_rows: int, size: int = 64, steps: int = 10, prior_steps: int | None = None
) -> str:
    """A text2img manifest: ``num_rows`` rows of distinct prompts, one image each, ``size`` square.

    ``steps`` decoder steps, ``prior_steps`` prior steps (default: ``steps``).
    """
    rows = {
        "id": [f"row-{i:06d}" for i in range(num_rows)],
        "prompt": [prompt(i) for i in range(num_rows)],
        "seed": list(range(num_rows)),
        "height": [size] * num_rows,
        "width": [size] * num_rows,
        "num_inference_steps": [steps] * num_rows,
        "prior_num_inference_steps": [steps if prior_steps is None else prior_steps] * num_rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return str(path)


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
    from jobs.execution.job import prior_batch_size as resolve_prior_batch_size
    from jobs.execution.job import work_groups
    from jobs.execution.runner import StageSpec, run_ray, run_ray_data
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
    return {"mode": "simulated", "machine": _machine(), **runs[-1], "runs": runs}


# ---------------------------------------------------------------- cpu


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
        ours.append(_timed(ours_cmd, log=work_dir / f"ours-{repeat}.log"))
        print(f"kandinsky-render render: {ours[-1]:.2f} s (process start to exit)", flush=True)
        loop.append(_timed(loop_cmd, log=work_dir / f"loop-{repeat}.log"))
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
        "machine": _machine(),
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


# ---------------------------------------------------------------- plan


def write_plan_fixture(root: Path, *, num_rows: int, part_rows: int = 1000) -> None:
    """A ``num_rows`` manifest plus ``num_rows`` ok results, half of them for rows of this manifest.

    Like a scheduled run: yesterday's output holds results for ids ``num_rows/2 .. 3*num_rows/2``,
    today's manifest asks for ids ``0 .. num_rows``. Results parts hold ``part_rows`` rows each
    (the job's default flush), so reading them back costs what it does in a real output.
    """
    root.mkdir(parents=True, exist_ok=True)
    index = np.arange(num_rows)
    manifest = pa.table(
        {
            "id": pa.array([f"m-{i:09d}" for i in range(num_rows)]),
            "prompt": pa.array([f"{prompt(i)}, take {i % 997}" for i in range(num_rows)]),
            "negative_prompt": pa.array([("blurry" if i % 10 == 0 else None) for i in range(num_rows)], pa.string()),
            "height": pa.array(np.where(index % 10 == 3, 768, 512)),
            "width": pa.array(np.where(index % 10 == 3, 768, 512)),
            "seed": pa.array([None if i % 2 else i for i in range(num_rows)], pa.int64()),
        }
    )
    pq.write_table(manifest, root / "manifest.parquet")
    results = root / "out" / "results"
    results.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    first = num_rows // 2
    for part, start in enumerate(range(0, num_rows, part_rows)):
        ids = [f"m-{i:09d}" for i in range(first + start, first + min(start + part_rows, num_rows))]
        n = len(ids)
        columns = {f.name: pa.nulls(n, f.type) for f in RESULTS_SCHEMA}
        columns.update(
            id=pa.array(ids),
            image_index=pa.array(np.zeros(n, np.int32)),
            status=pa.array(["ok"] * n),
            uri=pa.array([f"file:///previous/images/{i}.png" for i in ids]),
            run_id=pa.array(["previous"] * n),
            finished_at=pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        )
        table = pa.table(columns, schema=RESULTS_SCHEMA)
        pq.write_table(table, results / f"part-previous-{part:06d}.parquet", compression="zstd")


def plan_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a fresh process: read previous results and plan, exactly as `jobs.execution.job.run_job` starts."""
    import pyarrow.compute as pc

    from actors.storage import Storage
    from jobs.output.results import final_results, read_results
    from jobs.planning.plan import make_plan
    from schemas.config import JobConfig
    from schemas.manifest import SUPPORTED_MODES
    from schemas.results import STATUS_OK

    baseline = _peak_rss_mb()
    root = Path(args.dir)
    started = time.perf_counter()
    config = JobConfig(manifest=str(root / "manifest.parquet"), output=str(root / "out"))
    columns = ["id", "image_index", "status", "finished_at"]
    previous = final_results(read_results(Storage(config.output), columns=columns))
    done = previous.filter(pc.equal(previous.column("status"), STATUS_OK))
    plan = make_plan(config, done=done, supported_modes=SUPPORTED_MODES)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_after_imports_mb": round(baseline, 1),
        "num_rows": plan.num_rows,
        "num_done": plan.num_done,
        "num_to_render": plan.num_to_render,
        "num_batches": len(plan.batches),
    }


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``plan``: time and peak driver memory of planning, each size in a fresh process."""
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    runs = []
    for num_rows in args.rows:
        root = work_dir / f"plan-{num_rows}"
        write_plan_fixture(root, num_rows=num_rows)
        command = [sys.executable, "-m", "jobs.cli", "benchmark", "plan-worker", "--dir", str(root)]
        proc = subprocess.run(command, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"plan worker failed:\n{proc.stderr[-3000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"{num_rows:>9,} rows vs {num_rows:,} previous results: {run['seconds']:.2f} s, peak RSS "
            f"{run['peak_rss_mb']:.0f} MB (after imports {run['rss_after_imports_mb']:.0f} MB), "
            f"{run['num_to_render']:,} to render in {run['num_batches']:,} batches",
            flush=True,
        )
    result: dict[str, Any] = {"mode": "plan", "machine": _machine(), **runs[-1], "runs": runs}
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        result["rows_growth"] = round(large["num_rows"] / small["num_rows"], 2)
        result["peak_rss_growth"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 2)
        print(f"rows x{result['rows_growth']:g} -> peak RSS x{result['peak_rss_growth']:g}")
    return result


# ---------------------------------------------------------------- gpu


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Mode ``gpu``: decoder images/s per GPU at several batch sizes vs the Combined pipeline, same run.

    Real-size random-weight models (``--tiny``: the tiny test models, for a dry run on any device).
    Also renders a few rows in float32 with both to check equality, and in float16 to measure drift.
    """
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.planning.plan import make_plan
    from schemas.config import AccelOptions, JobConfig
    from schemas.manifest import SUPPORTED_MODES

    device = args.device or ("cuda" if torch.cuda.is_available() else "")
    if not device:
        raise ValueError("benchmark gpu needs a CUDA device (or --device cpu --tiny for a dry run)")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-", dir=_fast_tmp()))
    started = time.perf_counter()
    if args.models:
        models = args.models
    elif args.tiny:
        models = str(work_dir / "models")
        build_tiny_models(models)
    else:
        models = build_real_size_models(work_dir / "models", device=device)
    build_seconds = time.perf_counter() - started
    kind = args.models or ("tiny" if args.tiny else "real-size, random weights")
    print(f"models ready in {build_seconds:.1f} s ({kind})")
    dtype_name = args.dtype
    dtype = getattr(torch, dtype_name)
    batch_sizes = sorted(args.batch_sizes)
    num_rows = max(batch_sizes) * (args.timed_batches + 1)
    manifest = write_manifest(
        work_dir / "manifest.parquet", num_rows=num_rows, size=args.size, steps=args.steps, prior_steps=args.prior_steps
    )
    rows = pq.read_table(manifest).to_pylist()
    extra = {"num_inference_steps": args.steps, "prior_num_inference_steps": args.prior_steps}

    # diffusers' Combined pipeline, one row per call, as a user would loop over a manifest
    pipe = combined_pipeline(models, dtype=dtype, device=device)
    combined_kwargs = {"height": args.size, "width": args.size, **extra}
    out_dir = work_dir / "combined"
    out_dir.mkdir(exist_ok=True)

    def combined_row(pipe: Any, row: dict) -> None:
        image = pipe(prompt=row["prompt"], generator=torch.Generator("cpu").manual_seed(row["seed"]), **combined_kwargs)
        image.images[0].save(out_dir / f"{row['id']}.png")

    combined_row(pipe, rows[0])  # warm-up
    _synchronize(device)
    timed = rows[1 : 1 + args.combined_rows]
    t0 = time.perf_counter()
    for row in timed:
        combined_row(pipe, row)
    _synchronize(device)
    combined_rate = len(timed) / (time.perf_counter() - t0)
    print(f"diffusers Combined, 1 row per call: {combined_rate:.3f} images/s per GPU", flush=True)
    del pipe
    _release(device)

    # ours: the prior and decoder stage classes, as each actor runs them
    accel = AccelOptions(channels_last=args.channels_last, compile=args.compile)
    config = JobConfig(manifest=manifest, output=str(work_dir / "ours"), batch_size=max(batch_sizes))
    work = make_plan(config, done=None, supported_modes=SUPPORTED_MODES).batches.work
    prior = PriorActor(f"{models}/prior", dtype=dtype_name, device=device, accel=accel, worker="bench")
    prior_bs = max(batch_sizes)
    prior(work.slice(0, prior_bs))  # warm-up
    _synchronize(device)
    t0 = time.perf_counter()
    embeds = pa.concat_tables([prior(work.slice(s, prior_bs)) for s in range(0, work.num_rows, prior_bs)])
    _synchronize(device)
    prior_seconds = (time.perf_counter() - t0) / work.num_rows
    print(f"prior stage (batch {prior_bs}): {prior_seconds * 1000:.1f} ms per image", flush=True)
    del prior
    _release(device)
    decoder = DecoderActor(
        {"text2img": f"{models}/decoder"},
        output=config.output,
        run_id="bench",
        dtype=dtype_name,
        device=device,
        accel=accel,
        worker="bench",
    )
    per_batch = []
    for batch_size in batch_sizes:
        decoder(embeds.slice(0, batch_size))  # warm-up (and compile, if asked)
        _synchronize(device)
        t0 = time.perf_counter()
        for k in range(args.timed_batches):
            results = decoder(embeds.slice(batch_size * (k + 1), batch_size))
        _synchronize(device)
        rate = batch_size * args.timed_batches / (time.perf_counter() - t0)
        errors = [r for r in results.to_pylist() if r["status"] != "ok"]
        per_batch.append({"batch_size": batch_size, "decoder_images_per_s": round(rate, 4), "errors": len(errors)})
        print(f"decoder stage, batch {batch_size}: {rate:.3f} images/s per decoder GPU", flush=True)
    del decoder
    _release(device)
    best = max(per_batch, key=lambda r: r["decoder_images_per_s"])
    decoder_seconds = 1 / best["decoder_images_per_s"]
    shared_rate = 1 / (decoder_seconds + prior_seconds)
    eight = suggest_stages(prior_seconds=prior_seconds, decoder_seconds=decoder_seconds, cluster_gpus=8)
    print(
        f"per GPU, prior cost included: {shared_rate:.3f} images/s = {shared_rate / combined_rate:.2f}x Combined "
        f"(target >= 1.2x); decoder GPU alone {best['decoder_images_per_s']:.3f} images/s"
    )
    equality = _precision_check(args, models=models, device=device, work_dir=work_dir)
    return {
        "mode": "gpu",
        "machine": {**_machine(), "device": _device_name(device)},
        "models": kind,
        "size": args.size,
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "dtype": dtype_name,
        "accel": {"channels_last": args.channels_last, "compile": args.compile, "attention": "sdpa"},
        "combined_images_per_s": round(combined_rate, 4),
        "prior_seconds_per_image": round(prior_seconds, 5),
        "batches": per_batch,
        "best_batch_size": best["batch_size"],
        "images_per_s_per_gpu": round(shared_rate, 4),
        "speedup_vs_combined": round(shared_rate / combined_rate, 3),
        "decoder_only_speedup_vs_combined": round(best["decoder_images_per_s"] / combined_rate, 3),
        "eight_gpus": {"flags": eight.flags(), "images_per_s": round(eight.images_per_s, 3), "note": eight.note},
        **equality,
        "build_seconds": round(build_seconds, 1),
    }


def _precision_check(args: argparse.Namespace, *, models: str, device: str, work_dir: Path) -> dict[str, Any]:
    """Render ``--check-rows`` rows with few steps: ours vs Combined in float32, and ours in float16."""
    import torch

    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from jobs.planning.plan import make_plan
    from schemas.config import AccelOptions, JobConfig
    from schemas.manifest import SUPPORTED_MODES

    if args.check_rows <= 0:
        return {}
    steps = args.check_steps
    manifest = write_manifest(work_dir / "check.parquet", num_rows=args.check_rows, size=args.size, steps=steps)
    rows = pq.read_table(manifest).to_pylist()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 on both sides
    try:
        pipe = combined_pipeline(models, dtype=torch.float32, device=device)
        reference = {}
        for row in rows:
            image = pipe(
                prompt=row["prompt"],
                generator=torch.Generator("cpu").manual_seed(row["seed"]),
                height=args.size,
                width=args.size,
                num_inference_steps=steps,
                prior_num_inference_steps=steps,
            ).images[0]
            reference[row["id"]] = np.asarray(image, dtype=np.int16)
        del pipe
        _release(device)
        figures = {}
        for dtype_name in ("float32", args.dtype):
            config = JobConfig(manifest=manifest, output=str(work_dir / f"check-{dtype_name}"), batch_size=len(rows))
            work = make_plan(config, done=None, supported_modes=SUPPORTED_MODES).batches.work
            accel = AccelOptions(channels_last=args.channels_last)
            prior = PriorActor(f"{models}/prior", dtype=dtype_name, device=device, accel=accel)
            embeds = prior(work)
            del prior
            decoder = DecoderActor(
                {"text2img": f"{models}/decoder"},
                output=config.output,
                run_id="check",
                dtype=dtype_name,
                device=device,
                accel=accel,
            )
            results = decoder(embeds).to_pylist()
            del decoder
            _release(device)
            diffs = []
            for result in results:
                if result["status"] != "ok":
                    figures[dtype_name] = {"error": result["error"]}
                    break
                from PIL import Image

                with Image.open(result["uri"]) as image:
                    diffs.append(np.abs(np.asarray(image.convert("RGB"), np.int16) - reference[result["id"]]))
            else:
                stacked = np.stack(diffs)
                figures[dtype_name] = {
                    "max_level_difference": int(stacked.max()),
                    "mean_level_difference": round(float(stacked.mean()), 4),
                    "share_over_1_level": round(float((stacked > 1).mean()), 6),
                }
            print(f"vs Combined float32 ({len(rows)} rows, {steps} steps): ours {dtype_name} {figures[dtype_name]}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"check_rows": len(rows), "check_steps": steps, "vs_combined_float32": figures}


def _fast_tmp() -> str | None:
    """RAM-backed /dev/shm when it exists: real-size checkpoints are written and read back once."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return device


# ---------------------------------------------------------------- command line


def build_parser(prog: str = "kandinsky-render benchmark") -> argparse.ArgumentParser:
    """The ``benchmark`` command line: one sub-command per mode."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    formatter = argparse.ArgumentDefaultsHelpFormatter

    cpu = modes.add_parser("cpu", help="whole job vs a per-row diffusers loop, tiny models", formatter_class=formatter)
    cpu.add_argument("--rows", type=int, default=128, help="text2img rows")
    cpu.add_argument("--size", type=int, default=64, help="height and width")
    cpu.add_argument("--steps", type=int, default=10, help="prior and decoder steps")
    cpu.add_argument("--render-args", default=CPU_RENDER_ARGS, help="extra flags of the timed render command")
    cpu.add_argument("--repeats", type=int, default=1, help="alternate both commands this many times (medians)")
    cpu.add_argument("--work-dir", help="where models, manifests and outputs go (default: a new temp dir)")

    sim = modes.add_parser("simulated", help="sleeping stages on a local Ray", formatter_class=formatter)
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

    plan = modes.add_parser("plan", help="driver time and peak memory of planning", formatter_class=formatter)
    plan.add_argument(
        "--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="manifest sizes (each vs as many results)"
    )
    plan.add_argument("--work-dir", help="where fixtures go (default: a new temp dir)")

    gpu = modes.add_parser("gpu", help="decoder images/s per GPU vs the Combined pipeline", formatter_class=formatter)
    gpu.add_argument("--device", help="torch device (default: cuda)")
    gpu.add_argument("--tiny", action="store_true", help="tiny test models instead of real-size ones (dry run)")
    gpu.add_argument("--models", help="checkpoints to use (DIR/prior, DIR/decoder), e.g. the real weights")
    gpu.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="timed dtype")
    gpu.add_argument("--size", type=int, default=768, help="height and width")
    gpu.add_argument("--steps", type=int, default=50, help="decoder steps")
    gpu.add_argument("--prior-steps", type=int, default=25, help="prior steps")
    gpu.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="decoder batch sizes")
    gpu.add_argument("--timed-batches", type=int, default=2, help="timed decoder calls per batch size")
    gpu.add_argument("--combined-rows", type=int, default=4, help="timed Combined pipeline rows")
    gpu.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC weights")
    gpu.add_argument("--compile", action="store_true", help="torch.compile the UNet (adds compile time)")
    gpu.add_argument("--check-rows", type=int, default=2, help="rows rendered for the float32/float16 check")
    gpu.add_argument("--check-steps", type=int, default=10, help="prior and decoder steps of the check")
    gpu.add_argument("--work-dir", help="where checkpoints go (default: a new dir in /dev/shm)")

    loop = modes.add_parser("diffusers-loop", help=argparse.SUPPRESS)
    loop.add_argument("--manifest", required=True)
    loop.add_argument("--models", required=True)
    loop.add_argument("--output", required=True)
    worker = modes.add_parser("plan-worker", help=argparse.SUPPRESS)
    worker.add_argument("--dir", required=True)
    return parser


RUNNERS = {
    "cpu": run_cpu,
    "simulated": run_simulated,
    "plan": run_plan,
    "gpu": run_gpu,
    "diffusers-loop": diffusers_loop,
    "plan-worker": plan_worker,
}


def main(argv: Sequence[str] | None = None, *, prog: str = "kandinsky-render benchmark") -> int:
    """Run one benchmark mode; its last printed line is a JSON object of its figures."""
    args = build_parser(prog).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if args.mode in ("cpu", "gpu", "diffusers-loop"):
        from actors.common import quiet_libraries

        quiet_libraries()
    try:
        result = RUNNERS[args.mode](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jobs.benchmarks"))
