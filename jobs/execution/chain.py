"""The stage chain of a render job ([depth] -> prior -> decoder -> writers) and how it runs: locally or on Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cluster.defaults import Machine
from cluster.resources import StageLayout, fit_cpus, place_stages, resolve_score, resolve_stages, resolve_writer
from jobs.execution.connect import connect_ray
from jobs.execution.contract import Event, SinkSpec, StageSpec, Task
from jobs.execution.local import run_local
from jobs.execution.metrics import MetricsRecorder
from jobs.execution.runner import Deadlines, RunnerMeasures, run_ray
from jobs.execution.timeline import Timeline
from jobs.execution.watch import Watcher
from jobs.planning.batches import prior_batch_size
from jobs.planning.machine import local_machine, ray_machine
from schemas.config import JobConfig
from schemas.modes import MODES
from schemas.stages import DECODER, DEPTH, MODEL_STAGES, PRIOR, SCORE, SPLIT_AFTER, WRITER

logger = logging.getLogger(__name__)


ChainBuilder = Callable[..., tuple[list[StageSpec], SinkSpec]]


def build_chain(
    config: JobConfig,
    *,
    modes: list[str],
    needs_depth: bool,
    movq_scales: dict[str, int],
    output_format: str,
    run_id: str,
    cluster_gpus: float,
) -> tuple[list[StageSpec], SinkSpec]:
    """The model stages the run needs and its writer pool, with resources resolved for ``cluster_gpus``.

    [depth] -> prior -> decoder -> [score] -> writers. Decoder actors load the checkpoints of
    ``modes`` only; the depth stage exists when ``needs_depth``, the scoring stage with ``--score``.
    """
    from actors.decoder import DecoderActor
    from actors.depth import DepthActor
    from actors.prior import PriorActor
    from actors.scorer import ScoreActor
    from actors.writer import ShardWriter

    scorer = config.scorer if config.score else None
    prior, decoder, depth = resolve_stages(
        config.prior,
        config.decoder,
        cluster_gpus=cluster_gpus,
        depth=config.depth if needs_depth else None,
        score=scorer,
    )
    writer = resolve_writer(config.writer, num_decoders=decoder.num_actors)
    score = None
    if scorer is not None:
        score = resolve_score(scorer, num_decoders=decoder.num_actors, cluster_gpus=cluster_gpus)
        gpus = sum(p.num_actors * p.num_gpus for p in (prior, decoder, score, depth) if p is not None)
        if gpus > cluster_gpus + 1e-9:
            raise ValueError(
                f"the stages ask for {gpus:g} GPUs with the scoring stage; the cluster has {cluster_gpus:g}"
            )
    prior, decoder = place_stages(prior, decoder, stage_placement=config.stage_placement)
    layouts = {DEPTH.name: depth, PRIOR.name: prior, DECODER.name: decoder, SCORE.name: score, WRITER.name: writer}
    inputs = {
        "storage_options": config.storage_options,
        "allowed_protocols": config.limits.allowed_protocols,
        "max_input_pixels": config.limits.max_input_pixels,
    }
    model = {"dtype": config.dtype, "accel": config.accel, "model_cache": config.models.cache}
    decoders = {mode: config.models.for_checkpoint(MODES[mode].checkpoint) for mode in modes}
    # Per stage: its class, what it is built with, and its calls' batch size.
    made: dict[str, tuple[type, dict[str, Any], int | None]] = {
        DEPTH.name: (
            DepthActor,
            {
                "model": config.models.depth,
                "revision": config.models.depth_hub_revision(),
                "model_cache": config.models.cache,
            },
            None,
        ),
        PRIOR.name: (PriorActor, {"model": config.models.prior, **model}, prior_batch_size(config)),
        DECODER.name: (DecoderActor, {"models": decoders, "movq_scales": movq_scales, **model}, config.batch_size),
        SCORE.name: (ScoreActor, {"model": config.models.prior, **model}, config.batch_size),
    }
    stages = []
    for stage in MODEL_STAGES:
        if layouts[stage.name] is not None:
            cls, kwargs, batch_size = made[stage.name]
            # The scorer reads no input images; storage options still reach its checkpoint.
            kwargs = {**kwargs, "storage_options": config.storage_options} if stage is SCORE else {**kwargs, **inputs}
            stages.append(
                StageSpec(name=stage.name, cls=cls, kwargs=kwargs, resources=layouts[stage.name], batch_size=batch_size)
            )
    sink_kwargs = {
        "output": config.output,
        "output_format": output_format,
        "run_id": run_id,
        "storage_options": config.storage_options,
        "spool_dir": config.spool_dir,
        "save_embeddings": config.save_embeddings,
        "min_clip_score": config.min_clip_score,
    }
    return stages, SinkSpec(name=WRITER.name, cls=ShardWriter, kwargs=sink_kwargs, resources=writer)


def split_index(stages: list[StageSpec]) -> int:
    """Stages up to `schemas.stages.SPLIT_AFTER` (the prior) see whole groups: one call serves several batches."""
    return [spec.name for spec in stages].index(SPLIT_AFTER)


def describe(stage: StageLayout) -> dict[str, Any]:
    """A stage's resources as stats.json records them."""
    described = {"num_actors": stage.num_actors, "num_gpus": stage.num_gpus, "num_cpus": stage.num_cpus}
    if not stage.placement.is_any:
        described["placement"] = dataclasses.asdict(stage.placement)
    return described


def start_imports(config: JobConfig) -> threading.Thread | None:
    """Import the stage modules (torch, diffusers: seconds) in a thread, for a Ray run; None with ``--runner local``."""
    if config.runner == "local":
        return None
    thread = threading.Thread(target=_import_stage_modules, name="import-stages", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def session(config: JobConfig, timeline: Timeline, *, imports: threading.Thread | None = None) -> Iterator[Machine]:
    """The machine the stages will run on, for the length of a run: a connected Ray cluster, or this machine.

    ``--runner ray``: joins the cluster the config names, else starts a private local Ray (shut
    down at exit), while ``imports`` (`start_imports`, started here when not given) imports the stage
    modules: Ray's start-up mostly waits on its own processes, so the two overlap. ``--runner
    local``: this machine, no Ray.
    """
    if config.runner == "local":
        yield local_machine()
        return
    import ray

    imports = imports or start_imports(config)
    started = connect_ray(config.address, wait_s=config.connect_wait_s)
    timeline.mark("ray_connected")
    imports.join()
    timeline.mark("imports_done")
    try:
        yield ray_machine()
    finally:
        if started:
            ray.shutdown()
            timeline.mark("ray_shutdown")


def execute(
    config: JobConfig,
    tasks: Iterable[Task],
    *,
    stage_info: dict[str, Any],
    timeline: Timeline,
    machine: Machine,
    build: ChainBuilder | None = None,
    runner_options: dict[str, Any] | None = None,
    watcher: Watcher | None = None,
    metrics: MetricsRecorder | None = None,
    **chain: Any,
) -> Iterator[Event]:
    """Run ``tasks`` through the chain inside a `session`; ``stage_info`` receives what stats.json shows.

    ``build`` (default `build_chain`) makes the stages: benchmarks swap in stand-in model stages and
    keep everything else real. ``runner_options`` go to `jobs.execution.runner.RayStagePipeline`.
    ``timeline`` receives when the stages were ready, the first dispatch and the first result;
    ``machine`` is what the `session` found (its GPUs and CPUs size the stages). ``watcher`` receives
    the Ray runner's phase lines and status, ``metrics`` its metrics (`jobs.execution.watch`).
    """
    build = build or build_chain
    if config.runner == "local":
        stages, sink = build(config, cluster_gpus=0.0, **chain)
        stage_info.update(runner="local", stages={spec.name: describe(spec.resources) for spec in [*stages, sink]})
        yield from run_local(stages, sink, tasks, split_after=split_index(stages))
        return
    cluster_gpus, cluster_cpus = machine.gpus, machine.cpus
    stages, sink = build(config, cluster_gpus=cluster_gpus, **chain)
    specs = [*stages, sink]
    fitted = fit_cpus([spec.resources for spec in specs], cluster_cpus=cluster_cpus)
    if fitted != [spec.resources for spec in specs]:
        logger.warning(
            "the stages reserve more than the cluster's %g CPUs; CPU reservations scaled to %s",
            cluster_cpus,
            [fit.num_cpus for fit in fitted],
        )
        specs = [dataclasses.replace(spec, resources=fit) for spec, fit in zip(specs, fitted)]
        stages, sink = specs[:-1], specs[-1]
    measures = RunnerMeasures(names=[spec.name for spec in specs], watcher=watcher, metrics=metrics)
    stage_info.update(
        runner="ray", cluster_gpus=cluster_gpus, stages={spec.name: describe(spec.resources) for spec in specs}
    )
    deadlines = Deadlines(
        call_timeout_s=config.call_timeout_s,
        call_timeout_floor_s=config.call_timeout_floor_s,
        stage_wait_s=config.stage_wait_s,
    )
    try:
        yield from run_ray(
            stages,
            sink,
            tasks,
            split_after=split_index(stages),
            measures=measures,
            deadlines=deadlines,
            max_tasks=config.shards_in_flight,
            **(runner_options or {}),
        )
    finally:
        timeline.mark_monotonic("stages_starting", measures.started)
        for name, at in measures.moments.items():
            timeline.mark_monotonic(name, at)
    stage_info.update(measures.per_stage())


def _import_stage_modules() -> None:
    """What the driver imports anyway: the stage classes (they import torch)."""
    import actors.decoder  # noqa: F401
    import actors.depth  # noqa: F401
    import actors.prior  # noqa: F401
    import actors.scorer  # noqa: F401
    import actors.writer  # noqa: F401
