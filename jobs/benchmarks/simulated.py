"""Modes ``simulated``, ``ceiling`` and ``efficiency``: the whole render job with stand-in model stages.

The job is the real one (`jobs.job.run_job`): shards planned from real Parquet footers,
the Ray runner, real writer actors encoding real PNGs into the chosen format, markers, stats.
Only the prior and the decoder are stand-ins that sleep a fixed time per image and emit payloads of
the real size (1280-float embeddings, a 5056-byte generator state, ``--image-size`` pixels), so the
figures measure the wiring, the driver and the writers, not a model.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cluster.layout import HEADROOM
from jobs.benchmarks.common import Mode, machine, write_manifest
from jobs.benchmarks.stand_ins import simulated_chain


def simulate_once(
    args: argparse.Namespace,
    *,
    output: str,
    rows: int,
    num_decoders: int,
    num_priors: int,
    storage_options: dict[str, Any] | None = None,
    layout: str = "dedicated",
    prior_gpus: float = 1.0,
    decoder_gpus: float = 1.0,
    gpu_lock: bool = False,
) -> dict[str, Any]:
    """One simulated job on the connected Ray (its CLIP and decoder groups as ``layout`` and the counts and GPU
    shares say); its figures from the job's own stats.json."""
    from actors.storage import Storage
    from jobs.dev.tiny_models import build_tiny_models
    from jobs.job import run_job
    from schemas.config import JobConfig
    from schemas.models import ModelPaths
    from schemas.resources import StageResources

    work_dir = Path(args.work_dir)
    name = f"{args.output_format}-{layout}-{num_priors}p{num_decoders}d-{rows}"
    manifest = write_manifest(work_dir / name / "manifest.parquet", num_rows=rows, size=args.image_size, steps=1)
    prior_s, decoder_s = args.prior_ms / 1000, args.decoder_ms / 1000
    config = JobConfig(
        manifest=manifest,
        output=output,
        batch_size=args.batch_size,
        prior_batch_size=args.prior_batch_size,
        shard_rows=args.shard_rows,
        output_format=args.output_format,
        # The stand-ins replace these stages, in the groups and on the GPU shares the layout gives them.
        layout=layout,
        prior=StageResources(num_actors=num_priors, num_gpus=prior_gpus, num_cpus=0.0),
        decoder=StageResources(num_actors=num_decoders, num_gpus=decoder_gpus, num_cpus=0.0),
        writer=StageResources(num_actors=args.num_writers),
        storage_options=storage_options or {},
        overwrite=True,
        # Only the checkpoints' configs are read (the MoVQ scale of the size checks: 2, so any even side).
        models=ModelPaths.resolve(models_dir=build_tiny_models(str(work_dir / "models"))["prior"].rsplit("/", 1)[0]),
    )
    build = simulated_chain(
        prior_seconds=prior_s, decoder_seconds=decoder_s, image_size=args.image_size, gpu_lock=gpu_lock
    )
    called = time.monotonic()
    stats = run_job(config, build=build, runner_options={"wait_for_actors": True}).stats
    wall = time.monotonic() - called
    timeline, busy = stats["timeline"], stats["stages"]["busy_seconds"]
    seconds = timeline["rendered"] - timeline["first_dispatch"]
    images = stats["this_run"]["num_images"]
    if images != rows or stats["this_run"]["by_status"].get("ok", 0) != rows:
        raise RuntimeError(f"simulated run gave {stats['this_run']} for {rows} images")
    keys = Storage(output, storage_options=storage_options).list_files("")
    objects = len(keys)
    shards = sum(key.startswith("shards/") for key in keys)
    per_shard = sum(key.split("/", 1)[0] in ("shards", "results", "data", "images") for key in keys) / shards
    ideal = num_decoders / decoder_s if decoder_s else float("inf")
    achieved = images / seconds
    return {
        "num_decoders": num_decoders,
        "num_priors": num_priors,
        "num_writers": stats["stages"]["stages"]["writer"]["num_actors"],
        "rows": images,
        "image_size": args.image_size,
        "output_format": args.output_format,
        "shard_rows": config.shard_rows,
        "batch_size": args.batch_size,
        "prior_ms": args.prior_ms,
        "decoder_ms": args.decoder_ms,
        "seconds": round(seconds, 3),
        "images_per_s": round(achieved, 3),
        "ideal_images_per_s": None if decoder_s == 0 else round(ideal, 3),
        "efficiency": None if decoder_s == 0 else round(achieved / ideal, 4),
        "decoder_busy": None if decoder_s == 0 else round(busy["decoder"] / (num_decoders * seconds), 4),
        "writer_busy_seconds": busy["writer"],
        "first_image_s": round(timeline["first_result"] - timeline["first_dispatch"], 3),
        "actors_start_s": round(timeline["actors_ready"] - timeline["stages_starting"], 3),
        "job_wall_s": round(wall, 3),
        "objects_written": objects,
        "objects_per_1000_images": round(1000 * objects / images, 2),
        "num_shards": shards,
        "objects_per_shard": round(per_shard, 2),  # data, results and marker (files: + one PNG per image)
    }


def _priors_needed(num_decoders: int, prior_s: float, decoder_s: float) -> int:
    """Dedicated prior actors that feed ``num_decoders`` decoders (`cluster.layout.choose`'s headroom)."""
    if not decoder_s:
        return 1
    return max(1, math.ceil(num_decoders * prior_s * HEADROOM / decoder_s - 1e-9))


def run_simulated(args: argparse.Namespace) -> dict[str, Any]:
    """Simulated jobs on a local Ray with logical GPUs, for each decoder count."""
    runs = _simulate_all(args, formats=[args.output_format])
    return {"mode": args.mode, "machine": machine(), **runs[-1], "runs": runs, "s3": args.s3}


def run_objects(args: argparse.Namespace) -> dict[str, Any]:
    """Objects written per 1,000 images and per shard, for each output format (zero-cost stages), one Ray."""
    runs = _simulate_all(args, formats=["files", "webdataset", "parquet"])
    figures = {
        run["output_format"]: {
            k: run[k] for k in ("objects_written", "objects_per_1000_images", "num_shards", "objects_per_shard", "rows")
        }
        for run in runs
    }
    return {"mode": "objects", "machine": machine(), "formats": figures}


def _simulate_all(args: argparse.Namespace, *, formats: list[str]) -> list[dict[str, Any]]:
    """One simulated job per (output format, decoder count), all on one local Ray started here."""
    import ray

    counts = [args.num_decoders] if args.num_decoders else [1, 2, 4, 8]
    prior_s, decoder_s = args.prior_ms / 1000, args.decoder_ms / 1000
    priors = {d: args.num_priors or _priors_needed(d, prior_s, decoder_s) for d in counts}
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-")
    if ray.is_initialized():
        raise RuntimeError("this benchmark starts its own local Ray; call it without a Ray connection")
    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=max(d + priors[d] for d in counts),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    server, options, runs = None, None, []
    try:
        if args.s3:
            server, options = _loopback_s3()
        for output_format in formats:
            each = argparse.Namespace(**{**vars(args), "output_format": output_format})
            for d in counts:
                rows = args.rows or args.rows_per_decoder * d
                name = f"{output_format}-{d}"
                output = f"s3://bench/{name}" if args.s3 else str(Path(args.work_dir) / f"out-{name}")
                run = simulate_once(
                    each, output=output, rows=rows, num_decoders=d, num_priors=priors[d], storage_options=options
                )
                runs.append(run)
                efficiency = "" if run["efficiency"] is None else f", efficiency {run['efficiency']:.3f}"
                print(
                    f"{d} decoder(s) + {run['num_priors']} prior(s) + {run['num_writers']} writer(s), {run['rows']} "
                    f"{args.image_size}px images -> {output_format} on {'loopback S3' if args.s3 else 'local disk'}: "
                    f"{run['images_per_s']:.2f} images/s{efficiency}; {run['objects_per_1000_images']} objects per "
                    f"1000 images",
                    flush=True,
                )
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    return runs


def _loopback_s3() -> tuple[Any, dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint) and storage options reaching it, with a bucket."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    s3fs.S3FileSystem(**options).mkdir("bench")
    return server, options


def _add_arguments(sim: argparse.ArgumentParser, **defaults: Any) -> None:
    settings = {
        "prior_ms": 20.0,
        "decoder_ms": 100.0,
        "image_size": 64,
        "batch_size": 4,
        "rows_per_decoder": 160,
        "output_format": "webdataset",
        "shard_rows": 1000,
        **defaults,
    }
    sim.add_argument(
        "--num-decoders",
        type=int,
        default=settings.get("num_decoders"),
        help="one run with this many decoders (default: 1, 2, 4 and 8)",
    )
    sim.add_argument("--num-priors", type=int, help="prior actors (default: enough for the decoders, +10%%)")
    sim.add_argument("--num-writers", type=int, help="writer actors (default: the job's: one per two decoders)")
    sim.add_argument("--prior-ms", type=float, default=settings["prior_ms"], help="prior cost per image")
    sim.add_argument("--decoder-ms", type=float, default=settings["decoder_ms"], help="decoder cost per image")
    sim.add_argument("--image-size", type=int, default=settings["image_size"], help="side of the emitted images")
    sim.add_argument("--rows", type=int, default=settings.get("rows"), help="images per run")
    sim.add_argument(
        "--rows-per-decoder",
        type=int,
        default=settings["rows_per_decoder"],
        help="images per decoder when --rows is unset",
    )
    sim.add_argument("--batch-size", type=int, default=settings["batch_size"], help="images per decoder call")
    sim.add_argument(
        "--prior-batch-size",
        type=int,
        default=settings.get("prior_batch_size"),
        help="images per prior call (default: --batch-size)",
    )
    sim.add_argument(
        "--output-format",
        choices=("files", "webdataset", "parquet"),
        default=settings["output_format"],
        help="output format the writers produce",
    )
    sim.add_argument("--shard-rows", type=int, default=settings["shard_rows"], help="manifest rows per shard")
    sim.add_argument(
        "--s3",
        action=argparse.BooleanOptionalAction,
        default=settings.get("s3", False),
        help="write to a loopback S3 endpoint (moto's server) instead of the local disk",
    )
    sim.add_argument("--work-dir", help="where manifests and outputs go (default: a new temp dir)")


MODES = (
    Mode(name="simulated", help="the whole job with sleeping model stages on a local Ray",
         add_arguments=_add_arguments, run=run_simulated),
    Mode(name="ceiling", help="driver ceiling: the whole job with zero-cost model stages, batch 16",
         add_arguments=lambda p: _add_arguments(p, prior_ms=0.0, decoder_ms=0.0, image_size=8, batch_size=16,
                                                 prior_batch_size=64, num_decoders=1, rows=20_000),
         run=run_simulated),
    Mode(name="efficiency", help="decoder efficiency with real 768x768 encoding and writes to loopback S3",
         add_arguments=lambda p: _add_arguments(p, decoder_ms=500.0, image_size=768, num_decoders=2, rows=480,
                                                 shard_rows=60, s3=True),
         run=run_simulated),
    Mode(name="objects", help="objects written per 1,000 images and per shard, for each output format",
         add_arguments=lambda p: _add_arguments(p, prior_ms=0.0, decoder_ms=0.0, batch_size=16, num_decoders=1,
                                                 rows=2000),
         run=run_objects),
)  # fmt: skip
