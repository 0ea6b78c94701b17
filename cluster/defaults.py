"""Defaults chosen for the machine a job finds: actors per stage, CPUs (threads) per actor, batch sizes, layout.

Every option left unset (``None`` in `schemas.config.JobConfig`) that depends on the machine is
filled here, once, when the job starts: `choose_defaults` returns the concrete config and one
`Choice` per filled value with its reason (printed at start-up, recorded in stats.json). A value
the user set is never changed.

CPU-only clusters (what `kandinsky-render benchmark cpu` measured best on 2 cores):
- layout ``one-process``: each model actor holds every model stage (prior, decoder, depth,
  scoring), so no process is spent only on the small stages' start-up;
- one such actor per CPU core (no more than the run has batches of images), each reserving one
  CPU, so one torch thread (Ray sets ``OMP_NUM_THREADS`` from the reservation): a multi-thread
  actor lost most of its speed whenever another process took a core (its OpenMP threads wait for
  each other), one-thread actors do not; fewer when the node's memory cannot hold that many copies
  of the decoder; writers reserve no CPU (their work runs in the gaps);
- decoder batches of 16 (prior batches of 32: one prior call feeds two decoder batches), fewer
  when the memory estimate says so; diffusers' memory format (channels-last was 5-13% faster, but
  its float effects moved pixels of a long render by up to 12 levels from diffusers' image, and CPU
  runs are where users check the 1-level promise: ``--channels-last`` still takes it).
GPU clusters:
- the layout `cluster.layout.choose` picks from the stages' per-image costs on the GPU type (a
  calibration profile, measured or estimated from FLOP counts): CLIP GPUs of their own, or the CLIP
  actors beside the decoders; one CPU per actor; writers as many as encode the predicted images/s;
- the largest decoder batch (a power of two, at most 16) whose estimated memory at the
  manifest's largest image fits the GPU (with the CLIP group's weights where they share it); the
  estimate is rough, and a call that still runs out of memory is split in halves by the actor
  (actors/stage.py), so a wrong guess costs speed, not images.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cluster.accelerators import accelerator_spec, canonical_accelerator
from cluster.layout import CLIP_GROUP, DECODER_GROUP, Layout, StageCosts, choose, sweep
from cluster.nodes import NodeShape, cpus_per_gpu_actor
from schemas.choices import LAYOUT_CO_LOCATED, LAYOUT_DEDICATED, LAYOUT_ONE_PROCESS
from schemas.config import JobConfig
from schemas.resources import UNBOUNDED, StageResources
from schemas.stages import DECODER, DEPTH, PRIOR, SCORE, STAGES, WRITER

CPU_BATCH_SIZE = 16
CPU_PRIOR_BATCH_SIZE = 32
GPU_MAX_BATCH_SIZE = 16
GPU_FALLBACK_BATCH_SIZE = 4  # GPU memory unknown

# Memory estimates (bytes). Decoder weights of the real checkpoints: UNet 1.22B + MoVQ 0.07B parameters.
REAL_DECODER_PARAMETERS = 1.29e9
# Peak activation memory of one decoder image at 768x768 in 2-byte precision, guidance on (MoVQ decode dominates);
# scaled by pixel count and bytes per value. An estimate, not a measurement: the OOM split is the safety net.
IMAGE_BYTES_768 = 1.5e9
MEMORY_HEADROOM = 0.85  # of a GPU or a node's memory, what the defaults plan to use

# Writers: CPU seconds to encode one 768x768 PNG at the writers' compression level 6 (actors/images.py) on one
# core of the development machine (a photo-like image; level 1 took 0.108 s for 10% larger files), scaled by
# pixels for other sizes.
PNG_SECONDS_768 = 0.16
WRITER_HEADROOM = 1.5  # writers kept this much faster than the decoders produce
# Weights of the CLIP group's checkpoint (prior 1.03 B + CLIP ViT-bigG/14 image 1.84 B + text 0.69 B parameters):
# what a co-located CLIP actor adds to a decoder's GPU.
REAL_CLIP_PARAMETERS = 3.56e9


@dataclass(frozen=True, kw_only=True)
class Machine:
    """What the job found: schedulable CPUs, GPUs and memory of the cluster (a private local Ray: this machine)."""

    cpus: float
    gpus: float = 0.0
    memory_bytes: float = 0.0  # Ray's schedulable memory (0: unknown)
    accelerator_type: str = ""  # the GPU type when every GPU node has the same one
    source: str = "the Ray cluster"  # where the numbers come from
    nodes: tuple[NodeShape, ...] = ()  # the live nodes (empty: not known, e.g. a --plan-for cluster)
    autoscaler: bool = False  # an autoscaler adds nodes on demand
    planned_gpus: float = 0.0  # GPUs the cluster is planned for (--plan-for, autoscaler limits), beyond those up

    def gpu_memory(self) -> tuple[float, str]:
        """(bytes, whose) of one GPU, from the accelerator type; (0, "unknown") for logical or unlisted GPUs."""
        spec = accelerator_spec(self.accelerator_type) if self.accelerator_type else None
        if spec is not None:
            return spec.memory_bytes, f"a {canonical_accelerator(self.accelerator_type)}'s"
        return 0.0, "unknown"

    def describe(self) -> dict[str, Any]:
        """The machine as stats.json records it (nodes by their shape)."""
        return {**dataclasses.asdict(self), "nodes": [node.describe() for node in self.nodes]}


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One default filled for this machine: the flag that would set it, the value, and why."""

    flag: str
    value: Any
    reason: str

    def setting(self) -> str:
        """``--batch-size 16``."""
        return f"{self.flag} {_shown(self.value)}"

    def line(self) -> str:
        """``--batch-size 16: why``."""
        return f"{self.setting()}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """The choice as stats.json records it."""
        return {"flag": self.flag, "value": self.value, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the defaults need to know of the pending work (from the plan's scan)."""

    largest_pixels: int  # height x width of the largest image
    decoder_weight_bytes: float  # one decoder actor's weights at the run's precision
    value_bytes: int  # bytes per activation value: 4 (float32) or 2
    costs: StageCosts | None = None  # per-image stage costs on one GPU of the cluster's type (None: no GPU)
    needs_depth: bool = False
    score: bool = False
    num_images: int = 0  # images to render (0: unknown)


def image_bytes(workload: Workload) -> float:
    """Estimated peak activation bytes of one decoder image of the largest size.

    Activations grow with channel width, weights with its square: a narrower checkpoint of the same
    architecture (the tiny test models) needs ``sqrt(weights / real weights)`` of the real one's.
    """
    width = min(1.0, math.sqrt(workload.decoder_weight_bytes / (REAL_DECODER_PARAMETERS * workload.value_bytes)))
    return IMAGE_BYTES_768 * workload.largest_pixels / (768 * 768) * workload.value_bytes / 2 * width


def choose_defaults(config: JobConfig, machine: Machine, workload: Workload) -> tuple[JobConfig, list[Choice]]:
    """``config`` with every machine-dependent option it leaves unset filled in, and a `Choice` per filled value."""
    choices: list[Choice] = []
    if machine.gpus or machine.planned_gpus:
        config = _gpu_defaults(config, machine, workload, choices)
    else:
        config = _cpu_defaults(config, machine, workload, choices)
    return config, choices


def _cpu_defaults(config: JobConfig, machine: Machine, workload: Workload, choices: list[Choice]) -> JobConfig:
    cores = max(1, math.floor(machine.cpus + 1e-9))
    per_actor = workload.decoder_weight_bytes + CPU_BATCH_SIZE * image_bytes(workload)
    updates: dict[str, Any] = {}
    if config.layout is None:
        reason = (
            "no GPU: each model actor holds every stage (prior, decoder, depth, scoring), so no process is spent on "
            "the small stages' start-up (torch and diffusers imports) and every core denoises"
        )
        updates["layout"] = LAYOUT_ONE_PROCESS
        choices.append(Choice(flag="--layout", value=LAYOUT_ONE_PROCESS, reason=reason))
    decoder = config.decoder
    if decoder.num_actors is None:
        count, reason = cores, f"one single-thread model actor per CPU core ({cores} found)"
        if machine.memory_bytes and per_actor * cores > machine.memory_bytes * MEMORY_HEADROOM:
            count = max(1, math.floor(machine.memory_bytes * MEMORY_HEADROOM / per_actor))
            reason += (
                f", {count} because each needs ~{per_actor / 1e9:.1f} GB (weights and a batch) of the "
                f"{machine.memory_bytes / 1e9:.1f} GB Ray may use"
            )
        batches = -(-workload.num_images // (config.batch_size or CPU_BATCH_SIZE)) if workload.num_images else count
        if batches < count:  # an actor that would get no batch only costs its start-up
            count = max(1, batches)
            reason = (
                f"the run has {workload.num_images} image(s), {batches} batch(es) of at most "
                f"{config.batch_size or CPU_BATCH_SIZE}: one single-thread model actor per batch (per core otherwise, "
                f"{cores} found)"
            )
        decoder = _set(decoder, "num_actors", count, "--num-decoder-actors", reason, choices)
    if decoder.num_cpus is None:
        reason = "one core and one torch thread per actor: one-thread actors keep their speed when a core is busy"
        decoder = _set(decoder, "num_cpus", 1.0, "--decoder-cpus", reason, choices)
    updates["decoder"] = decoder
    beside = "no CPU reserved: its work is small beside the decoders' and runs in their gaps"
    for stage in STAGES:
        if stage is not DECODER:  # the other stages share the model actors' cores unless given actors of their own
            shown = stage.sink or getattr(config, stage.config_field).num_actors is not None
            recorded = (
                choices if shown and stage.in_run(needs_depth=workload.needs_depth, score=workload.score) else None
            )
            resources = getattr(config, stage.config_field)
            updates[stage.config_field] = _set(resources, "num_cpus", 0.0, stage.flag("cpus"), beside, recorded)
    if config.batch_size is None:
        batch, reason = CPU_BATCH_SIZE, "on CPU, batches of 16 amortise each call's fixed work (benchmark cpu)"
        fits = _fitting_batch(machine.memory_bytes / max(cores, 1), workload, limit=CPU_BATCH_SIZE)
        if machine.memory_bytes and fits < batch:
            batch, reason = (
                fits,
                f"the largest batch whose estimated memory fits a core's share of {machine.memory_bytes / 1e9:.0f} GB",
            )
        updates["batch_size"] = batch
        choices.append(Choice(flag="--batch-size", value=batch, reason=reason))
    if config.prior_batch_size is None:
        prior_batch = 2 * (updates.get("batch_size") or config.batch_size)
        updates["prior_batch_size"] = prior_batch
        reason = "two decoder batches per prior call: the prior's per-call work is amortised over more rows"
        choices.append(Choice(flag="--prior-batch-size", value=prior_batch, reason=reason))
    if config.accel.channels_last is None:
        reason = (
            "diffusers' memory format keeps images within 1 level of diffusers' own (channels-last is 5-13% faster "
            "on CPU but moved pixels of long renders by up to 12 levels; --channels-last to take it)"
        )
        updates["accel"] = dataclasses.replace(config.accel, channels_last=False)
        choices.append(Choice(flag="--channels-last", value=False, reason=reason))
    return dataclasses.replace(config, **updates)


def _gpu_defaults(config: JobConfig, machine: Machine, workload: Workload, choices: list[Choice]) -> JobConfig:
    updates: dict[str, Any] = {}
    present = math.floor(machine.gpus + 1e-9)
    gpus = max(1, present, math.floor(machine.planned_gpus + 1e-9))  # what the pools are sized up to
    costs = workload.costs or StageCosts(prior=0.0, decoder=1.0, source="no costs known")
    own = {s.name for s in STAGES if s.config_field in ("scorer", "depth") and _own_actors(config, s.config_field)}
    clip_stages = tuple(
        s.name
        for s in STAGES
        if s.name in (PRIOR.name, SCORE.name, DEPTH.name)
        and s.in_run(needs_depth=workload.needs_depth, score=workload.score)
        and s.name not in own
    )
    chosen = choose(num_gpus=gpus, costs=costs, clip_stages=clip_stages)
    kind = config.layout
    if kind is None:
        kind = updates["layout"] = chosen.kind
        choices.append(Choice(flag="--layout", value=kind, reason=chosen.note))
    elif kind != chosen.kind and kind != LAYOUT_ONE_PROCESS:  # the user's kind: its best layout
        chosen = next(
            layout for layout in sweep(num_gpus=gpus, costs=costs, clip_stages=clip_stages) if layout.kind == kind
        )
    prior, decoder = config.prior, config.decoder
    clip, decoders = chosen.group(CLIP_GROUP), chosen.group(DECODER_GROUP)
    if kind != LAYOUT_ONE_PROCESS and clip is not None and decoders is not None:
        # Pools start with what the GPUs up now hold and grow as nodes join: up to the planned cluster's layout,
        # or without bound when nothing is planned.
        now = _same_kind(kind, present, costs, clip_stages) if present < gpus else chosen
        bound = (lambda n: str(n)) if present < gpus else (lambda n: "")
        why = f"layout {kind}: {chosen.describe()} ({chosen.images_per_s / gpus:.3g} images/s per GPU predicted); " + (
            f"{present} GPU(s) up of the {gpus} planned: pools start with what fits and grow as nodes join"
            if present < gpus
            else "more as GPU nodes join"
        )
        start = {name: (now.group(name).num_actors if now is not None else 0) for name in (CLIP_GROUP, DECODER_GROUP)}
        most = {CLIP_GROUP: clip.num_actors, DECODER_GROUP: decoders.num_actors}
        # A count the user set is kept: the other group's default leaves room for it (now and at the bound).
        mine = {CLIP_GROUP: (prior, clip.num_gpus), DECODER_GROUP: (decoder, decoders.num_gpus)}
        for name, other in ((CLIP_GROUP, DECODER_GROUP), (DECODER_GROUP, CLIP_GROUP)):
            (defaulted, its_gpus), (fixed, fixed_gpus) = mine[name], mine[other]
            if defaulted.num_actors is None and fixed.min_actors is not None:
                per_actor = defaulted.num_gpus if defaulted.num_gpus is not None else its_gpus
                used = fixed.min_actors * (fixed.num_gpus if fixed.num_gpus is not None else fixed_gpus)
                start[name] = min(start[name], _room(max(present, 1) - used, per_actor))
                most[name] = min(most[name], _room(gpus - used, per_actor))
        prior = _set(
            prior, "num_actors", f"{start[CLIP_GROUP]}:{bound(most[CLIP_GROUP])}", PRIOR.flag("actors"), why, choices
        )
        prior = _set(prior, "num_gpus", clip.num_gpus, PRIOR.flag("gpus"), why, None)
        decoder = _set(
            decoder,
            "num_actors",
            f"{start[DECODER_GROUP]}:{bound(most[DECODER_GROUP])}",
            DECODER.flag("actors"),
            why,
            choices,
        )
        decoder = _set(decoder, "num_gpus", decoders.num_gpus, DECODER.flag("gpus"), why, None)
    stages = {PRIOR.config_field: prior, DECODER.config_field: decoder}
    # A CPU per actor beside its GPU, less where a GPU node has fewer CPUs than the actors its GPUs hold.
    per_gpu = 2 if kind != LAYOUT_DEDICATED else 1
    cpus = cpus_per_gpu_actor(machine.nodes, actors_per_gpu=per_gpu)
    one_cpu = "one CPU per actor beside its GPU: input decoding, batch assembly, Ray's own work"
    if cpus < 1:
        one_cpu = f"{cpus:g} CPU per actor: the GPU nodes' CPUs shared by the {per_gpu} actor(s) each GPU holds"
    for stage in STAGES:
        shown = stage.sink or stage.name in (PRIOR.name, DECODER.name) or stage.name in own
        recorded = choices if shown and stage.in_run(needs_depth=workload.needs_depth, score=workload.score) else None
        resources = stages.get(stage.config_field, getattr(config, stage.config_field))
        value = 1.0 if stage.sink else cpus
        reason = "one CPU per writer: PNG encoding and uploads" if stage.sink else one_cpu
        stages[stage.config_field] = _set(resources, "num_cpus", value, stage.flag("cpus"), reason, recorded)
    writer = stages[WRITER.config_field]
    if writer.num_actors is None:
        png = PNG_SECONDS_768 * workload.largest_pixels / (768 * 768)
        count = max(1, math.ceil(chosen.images_per_s * png * WRITER_HEADROOM - 1e-9))
        why = (
            f"{chosen.images_per_s:.3g} images/s predicted ({costs.source}) x {png:.3g} s of PNG encoding per image "
            f"on one core, with {WRITER_HEADROOM:g}x headroom"
        )
        # ... but no more than the CPUs the model actors leave: writers start first and must not take theirs.
        model_cpus = sum(
            (r.min_actors or 0) * (r.num_cpus or 0)
            for r in (stages[s.config_field] for s in STAGES if not s.sink)
            if r.num_gpus
        )
        per_writer = stages[WRITER.config_field].num_cpus or 1.0
        spare = math.floor((machine.cpus - model_cpus) / per_writer + 1e-9)
        if machine.cpus and 1 <= spare < count:
            count, why = spare, f"{why}; capped at the {spare} writer(s) the CPUs left beside the GPU actors hold"
        stages[WRITER.config_field] = _set(writer, "num_actors", count, WRITER.flag("actors"), why, choices)
    updates.update(stages)
    if config.batch_size is None:
        memory, where = machine.gpu_memory()
        if memory:
            shared = kind == LAYOUT_CO_LOCATED or gpus < 2 or kind == LAYOUT_ONE_PROCESS  # CLIP weights on the GPU
            clip_bytes = REAL_CLIP_PARAMETERS * workload.value_bytes if shared else 0.0
            weights = workload.decoder_weight_bytes + clip_bytes
            batch = _fitting_batch(memory - weights / MEMORY_HEADROOM, workload, limit=GPU_MAX_BATCH_SIZE)
            side = math.isqrt(workload.largest_pixels)
            reason = (
                f"the largest batch (at most {GPU_MAX_BATCH_SIZE}) whose estimated memory fits {where} "
                f"{memory / 1e9:.0f} GB at the largest image (~{side}x{side})"
                + (" beside the CLIP group's weights" if clip_bytes else "")
                + "; a call that runs out of memory is halved"
            )
        else:
            batch = GPU_FALLBACK_BATCH_SIZE
            reason = "GPU memory unknown (Ray names no GPU type this table knows); pass --batch-size to use more"
        updates["batch_size"] = batch
        choices.append(Choice(flag="--batch-size", value=batch, reason=reason))
    if config.prior_batch_size is None:
        prior_batch = updates.get("batch_size") or config.batch_size
        updates["prior_batch_size"] = prior_batch
        reason = "one prior call per decoder batch: on a GPU the prior is a few percent of the decoder's time"
        choices.append(Choice(flag="--prior-batch-size", value=prior_batch, reason=reason))
    if config.accel.channels_last is None:
        updates["accel"] = dataclasses.replace(config.accel, channels_last=False)
        reason = (
            "diffusers' default memory format: channels-last has not been measured on a GPU yet (`kandinsky-render "
            "benchmark gpu` measures it with and without --compile); --channels-last to try"
        )
        choices.append(Choice(flag="--channels-last", value=False, reason=reason))
    return dataclasses.replace(config, **updates)


def _same_kind(kind: str, num_gpus: int, costs: StageCosts, clip_stages: tuple[str, ...]) -> Layout | None:
    """The best layout of ``kind`` on ``num_gpus`` GPUs, None when it needs more (dedicated on one GPU, none up)."""
    if num_gpus < 1:
        return None
    layouts = sweep(num_gpus=num_gpus, costs=costs, clip_stages=clip_stages)
    return next((layout for layout in layouts if layout.kind == kind), None)


def _own_actors(config: JobConfig, field: str) -> bool:
    """Whether the user gave stage ``field`` actors of its own (else it runs in the CLIP actors)."""
    resources = getattr(config, field)
    return resources.num_actors is not None or resources.num_gpus is not None


def _fitting_batch(memory_bytes: float, workload: Workload, *, limit: int) -> int:
    """The largest power of two up to ``limit`` whose images fit ``memory_bytes`` (with headroom); at least 1."""
    per_image = image_bytes(workload)
    if per_image <= 0 or memory_bytes <= 0:
        return 1
    fits = memory_bytes * MEMORY_HEADROOM / per_image
    batch = 1
    while batch * 2 <= min(fits, limit):
        batch *= 2
    return batch


def _room(gpus: float, per_actor: float) -> int:
    """Actors of ``per_actor`` GPUs that fit in ``gpus`` (at least one: an oversized ask is refused later, by name)."""
    return max(1, math.floor(gpus / per_actor + 1e-9)) if per_actor > 0 else UNBOUNDED


def _set(
    stage: StageResources, name: str, value: Any, flag: str, reason: str, choices: list[Choice] | None
) -> StageResources:
    """``stage`` with ``name`` set to ``value`` unless the user set it; records the choice when ``choices``."""
    if getattr(stage, name) is not None:
        return stage
    if choices is not None:
        choices.append(Choice(flag=flag, value=value, reason=reason))
    return dataclasses.replace(stage, **{name: value})


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
