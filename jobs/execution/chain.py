"""The stage chain of a render job ([depth] -> prior -> decoder -> writers) and how it runs: locally or on Ray."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from actors.pins import Pin
from cluster.defaults import Machine
from cluster.layout import DECODER_GROUP
from cluster.resources import StageGroup, fit_cpus, requested_gpus, resolve_groups
from jobs.execution.capacity import await_gpus
from jobs.execution.connect import connect_ray
from jobs.execution.contract import Event, SinkSpec, StageSpec, Task
from jobs.execution.local import run_local
from jobs.execution.metrics import MetricsRecorder
from jobs.execution.runner import Deadlines, RunnerMeasures, run_ray
from jobs.execution.scaling import Elasticity
from jobs.execution.timeline import Timeline
from jobs.execution.watch import Watcher
from jobs.planning.batches import prior_batch_size
from jobs.planning.forecast import planned_cluster
from jobs.planning.machine import local_machine, ray_machine
from schemas.accel import dtype_name
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.manifest import input_protocols
from schemas.modes import MODES
from schemas.stages import DECODER, DEPTH, MODEL_STAGES, PRIOR, SCORE, SPLIT_AFTER, WRITER

logger = logger_for(__name__)


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
    call_shapes: Iterable[tuple[str, int, int]] = (),
    pins: Mapping[str, Pin] | None = None,
    model_ids: Mapping[str, str] | None = None,
) -> tuple[list[StageSpec], SinkSpec]:
    """The model stages the run needs and its writer pool, in actor groups resolved for ``cluster_gpus``.

    [depth] -> prior -> decoder -> [score] -> writers, grouped into processes by the config's layout
    (`cluster.resources.resolve_groups`). Decoder actors load the checkpoints of ``modes`` only; the
    depth stage exists when ``needs_depth``, the scoring stage with ``--score``. With ``--compile`` a decoder
    actor compiles at start for each of ``call_shapes`` (mode, height, width) at the run's batch size. ``pins``
    (checkpoint path -> `actors.pins.Pin`, what the driver resolved) reach every actor that loads the checkpoint, so
    each loads that version, restarted or added late. ``model_ids`` (checkpoint name -> ``name@content id``) and
    the decoders' dtype reach the writers, which record them in every results row.
    """
    from actors.decoder import DecoderActor
    from actors.depth import DepthActor
    from actors.prior import PriorActor
    from actors.scorer import ScoreActor
    from actors.writer import ShardWriter

    groups, writer = resolve_groups(config, cluster_gpus=cluster_gpus, needs_depth=needs_depth)
    group_of = {stage: group for group in groups for stage in group.stages}
    inputs = {
        "storage_options": config.storage_options,
        "allowed_protocols": input_protocols(config.limits, manifest=config.manifest),
        "max_input_pixels": config.limits.max_input_pixels,
        "max_input_bytes": config.limits.max_input_bytes,
    }
    pins = pins or {}

    def pinned(*paths: str) -> dict[str, dict[str, Pin]]:
        """The ``pins`` argument of a stage loading ``paths`` (only theirs: a kept actor's key holds its arguments)."""
        return {"pins": {path: pins[path] for path in paths if path in pins}}

    model = {"dtype": config.dtype, "accel": config.accel, "model_cache": config.models.cache}
    decoders = {mode: config.models.for_checkpoint(MODES[mode].checkpoint) for mode in modes}
    warmup = [(mode, h, w, config.batch_size) for mode, h, w in call_shapes if mode in decoders]
    decoder = {"models": decoders, "movq_scales": movq_scales, "warmup": warmup if config.accel.compile else []}
    # Per stage: its class, what it is built with, and its calls' batch size.
    made: dict[str, tuple[type, dict[str, Any], int | None]] = {
        DEPTH.name: (
            DepthActor,
            {
                "model": config.models.depth,
                "revision": config.models.depth_hub_revision(),
                "model_cache": config.models.cache,
                **pinned(config.models.depth),
            },
            None,
        ),
        PRIOR.name: (
            PriorActor,
            {"model": config.models.prior, **model, **pinned(config.models.prior)},
            prior_batch_size(config),
        ),
        DECODER.name: (DecoderActor, {**decoder, **model, **pinned(*decoders.values())}, config.batch_size),
        SCORE.name: (
            ScoreActor,
            {"model": config.models.prior, **model, **pinned(config.models.prior)},
            config.batch_size,
        ),
    }
    stages = []
    for stage in MODEL_STAGES:
        group = group_of.get(stage.name)
        if group is not None:
            cls, kwargs, batch_size = made[stage.name]
            # The scorer reads no input images; storage options still reach its checkpoint.
            kwargs = {**kwargs, "storage_options": config.storage_options} if stage is SCORE else {**kwargs, **inputs}
            if 0 < group.resources.num_gpus < 1:  # sharing a GPU: each process within its share of the memory
                kwargs["memory_role"] = "decoder" if group.name == DECODER_GROUP else "clip"
            spec = StageSpec(
                name=stage.name,
                cls=cls,
                kwargs=kwargs,
                resources=group.resources,
                batch_size=batch_size,
                group=group.name,
            )
            stages.append(spec)
    sink_kwargs = {
        "output": config.output,
        "output_format": output_format,
        "run_id": run_id,
        "storage_options": config.storage_options,
        "spool_dir": config.spool_dir,
        "save_embeddings": config.save_embeddings,
        "min_clip_score": config.min_clip_score,
        "model_ids": dict(model_ids or {}),
        "dtype": _decoder_dtype(config, groups),
        # the gallery previews a few rows' inputs, read under the same limits
        **{name: value for name, value in inputs.items() if name != "storage_options"},
    }
    return stages, SinkSpec(name=WRITER.name, cls=ShardWriter, kwargs=sink_kwargs, resources=writer)


def stage_gpus(config: JobConfig, machine: Machine) -> float:
    """The GPUs a run's stages are sized for on ``machine``: none with ``--runner local``; with an autoscaler,
    those the flags or ``--plan-for`` ask for too (nodes may join)."""
    if config.runner == "local":
        return 0.0
    if machine.autoscaler:
        return max(machine.gpus, machine.planned_gpus, requested_gpus(config))
    return machine.gpus


def decoder_dtype(config: JobConfig, *, cluster_gpus: float, needs_depth: bool) -> str:
    """The dtype the decoders of a run compute in (``--dtype auto`` resolved), as results rows and the output's
    pinned settings record it."""
    groups, _ = resolve_groups(config, cluster_gpus=cluster_gpus, needs_depth=needs_depth)
    return _decoder_dtype(config, groups)


def _decoder_dtype(config: JobConfig, groups: list[StageGroup]) -> str:
    if config.runner == "local":  # the stages run in this process, on its GPU if it sees one
        import torch

        return dtype_name(config.dtype, cuda=torch.cuda.is_available())
    return dtype_name(config.dtype, cuda=any(g.resources.num_gpus > 0 for g in groups if DECODER.name in g.stages))


def split_index(stages: list[StageSpec]) -> int:
    """Stages up to `schemas.stages.SPLIT_AFTER` (the prior) see whole groups: one call serves several batches."""
    return [spec.name for spec in stages].index(SPLIT_AFTER)


def describe(spec: StageSpec | SinkSpec) -> dict[str, Any]:
    """A stage's actors as stats.json records them: their group (the stages sharing them) and resources."""
    stage = spec.resources
    described = {"num_actors": stage.num_actors, "num_gpus": stage.num_gpus, "num_cpus": stage.num_cpus}
    if isinstance(spec, StageSpec):
        described["group"] = spec.group_name
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
        machine = planned_machine(config, ray_machine())
        if machine.planned_gpus and not machine.gpus:  # scale from zero: ask for the planned GPUs and wait
            machine = await_gpus(
                machine, wait_s=config.stage_wait_s, read=lambda: planned_machine(config, ray_machine())
            )
            timeline.mark("gpus_up")
        elif machine.autoscaler and not machine.gpus and requested_gpus(config):
            logger.info(
                "no GPU is up yet: the stages' GPU actors (%g GPUs at start, by the flags) wait for the nodes the "
                "autoscaler adds, within --stage-wait",
                requested_gpus(config),
            )
        elif machine.autoscaler and not machine.gpus:
            logger.warning(
                "an autoscaler runs but no GPU is up and none is planned: the stages run on CPUs. If the cluster "
                "has GPU node types, pass --plan-for NxTYPE (e.g. 8xL4) so the job asks for them and waits"
            )
        yield machine
    finally:
        if started:
            ray.shutdown()
            timeline.mark("ray_shutdown")


def planned_machine(config: JobConfig, machine: Machine) -> Machine:
    """``machine`` with the GPUs the run is planned for: ``--plan-for NxTYPE`` (one cluster), else the GPUs the
    cluster's node groups allow when Ray knows them (`ray_machine`). ValueError for a bad or second value."""
    if not config.plan_for:
        return machine
    cluster = planned_cluster(config)
    return dataclasses.replace(
        machine,
        planned_gpus=float(cluster.num_gpus),
        accelerator_type=machine.accelerator_type or cluster.accelerator_type,
    )


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
        stage_info.update(runner="local", stages={spec.name: describe(spec) for spec in [*stages, sink]})
        yield from run_local(stages, sink, tasks, split_after=split_index(stages))
        return
    cluster_gpus, cluster_cpus = stage_gpus(config, machine), machine.cpus  # with an autoscaler: asked, not refused
    stages, sink = build(config, cluster_gpus=cluster_gpus, **chain)
    # CPU reservations are fitted per actor group (the stages of a group share its actors); with an autoscaler
    # the nodes it adds bring their CPUs, so nothing is scaled down to what is up now.
    groups = {spec.group_name: spec.resources for spec in stages} | {sink.name: sink.resources}
    fitted = dict(zip(groups, fit_cpus(list(groups.values()), cluster_cpus=cluster_cpus)))
    if fitted != groups and not machine.autoscaler:
        logger.warning(
            "the stages reserve more than the cluster's %g CPUs; CPU reservations scaled to %s",
            cluster_cpus,
            {name: fit.num_cpus for name, fit in fitted.items()},
        )
        stages = [dataclasses.replace(spec, resources=fitted[spec.group_name]) for spec in stages]
        sink = dataclasses.replace(sink, resources=fitted[sink.name])
    specs = [*stages, sink]
    measures = RunnerMeasures(names=[spec.name for spec in specs], watcher=watcher, metrics=metrics)
    stage_info.update(runner="ray", cluster_gpus=cluster_gpus, stages={spec.name: describe(spec) for spec in specs})
    deadlines = Deadlines(
        call_timeout_s=config.call_timeout_s,
        call_timeout_floor_s=config.call_timeout_floor_s,
        call_timeout_warm_floor_s=config.call_timeout_warm_floor_s,
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
            elasticity=Elasticity(idle_timeout_s=config.idle_timeout_s, autoscaler=machine.autoscaler),
            max_tasks=config.shards_in_flight,
            keep_actors=config.keep_actors,
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
