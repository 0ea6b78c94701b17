"""Mode ``heartbeat``: the longest silence of log-mode progress in a run whose decoder takes long to load.

The job is the real one on a private local Ray, with the sleeping stand-in stages of `simulated`; the
decoder's constructor first sleeps ``--load-seconds`` (a checkpoint of gigabytes loading on a busy
node). Every progress log record (phase lines and the heartbeat) is timed; the figures are the
longest gap between two records against ``--progress-every``, and the phase lines themselves.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.common import Mode, machine, write_manifest
from jobs.benchmarks.stand_ins import SimulatedDecoder, simulated_chain
from schemas.loggers import logger_for


class SlowLoadingDecoder(SimulatedDecoder):
    """`SimulatedDecoder` whose constructor sleeps ``load_seconds`` first."""

    def __init__(self, *, load_seconds: float, **kwargs: Any) -> None:
        time.sleep(load_seconds)
        super().__init__(**kwargs)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "progress"):
            self.records.append(record)


def run_heartbeat(args: argparse.Namespace) -> dict[str, Any]:
    """One job with a slow decoder load; the gaps between its progress log lines."""
    import dataclasses

    from jobs.dev.tiny_models import build_tiny_models
    from jobs.job import run_job
    from jobs.reporting.progress import Progress
    from schemas.config import JobConfig
    from schemas.models import ModelPaths
    from schemas.resources import StageResources

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kandinsky-bench-"))
    models = build_tiny_models(str(work_dir / "models"))["prior"].rsplit("/", 1)[0]  # configs only (size checks)
    config = JobConfig(
        manifest=write_manifest(work_dir / "manifest.parquet", num_rows=args.rows, steps=1),
        output=str(work_dir / "out"),
        models=ModelPaths.resolve(models_dir=models),
        prior=StageResources(num_actors=1, num_gpus=1.0, num_cpus=0.0),
        decoder=StageResources(num_actors=1, num_gpus=1.0, num_cpus=0.0),
        batch_size=4,
        overwrite=True,
    )
    base = simulated_chain(prior_seconds=0.01, decoder_seconds=0.05, image_size=64)

    def build(job: Any, **chain: Any) -> Any:
        stages, sink = base(job, **chain)
        slow = {"load_seconds": args.load_seconds}
        stages = [
            dataclasses.replace(s, cls=SlowLoadingDecoder, kwargs={**s.kwargs, **slow}) if s.name == "decoder" else s
            for s in stages
        ]
        return stages, sink

    import ray

    if not ray.is_initialized():  # logical GPUs for the stand-ins, as `simulated` does
        ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    handler = _Records()
    progress_logger = logger_for("progress")
    progress_logger.addHandler(handler)
    progress_logger.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        stats = run_job(config, build=build, progress=Progress(live=False, log_every_s=args.progress_every)).stats
    finally:
        progress_logger.removeHandler(handler)
    wall = time.monotonic() - started
    times = [record.created for record in handler.records]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    phases = [
        f"{record.progress['since_start_s']:6.1f} s  {record.progress['event']}"
        for record in handler.records
        if record.progress.get("phase") == "phase"
    ]
    print("\n".join(phases), flush=True)
    return {
        "mode": "heartbeat",
        "machine": machine(),
        "load_seconds": args.load_seconds,
        "progress_every_s": args.progress_every,
        "num_lines": len(times),
        "max_gap_s": round(max(gaps), 2) if gaps else None,
        "mean_gap_s": round(sum(gaps) / len(gaps), 2) if gaps else None,
        "num_phase_lines": len(phases),
        "images_ok": stats["this_run"]["by_status"].get("ok", 0),
        "wall_s": round(wall, 1),
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-seconds", type=float, default=20.0, help="seconds the decoder takes to load")
    parser.add_argument("--progress-every", type=float, default=5.0, help="the job's --progress-every")
    parser.add_argument("--rows", type=int, default=8, help="rows of the manifest (one image each)")
    parser.add_argument("--work-dir", default=None, help="folder for the manifest, models and output")


MODES = (
    Mode(
        name="heartbeat",
        help="longest silence of log-mode progress in a run whose decoder takes long to load",
        add_arguments=_add_arguments,
        run=run_heartbeat,
    ),
)
