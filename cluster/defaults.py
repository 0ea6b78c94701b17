"""Defaults chosen for the machine a job finds: actors per stage, CPUs (threads) per actor, batch sizes, layout.

Every option left unset (``None`` in `schemas.config.JobConfig`) that depends on the machine is
filled here, once, when the job starts: `choose_defaults` returns the concrete config and one
`Choice` per filled value with its reason (printed at start-up, recorded in stats.json). A value
the user set is never changed.

CPU-only clusters (what `kandinsky-render benchmark cpu` measured best on 2 cores):
- one decoder actor per CPU core (no more than the run has batches of images), each reserving one
  CPU, so one torch thread (Ray sets ``OMP_NUM_THREADS`` from the reservation): a multi-thread
  actor lost most of its speed whenever another process took a core (its OpenMP threads wait for
  each other), one-thread actors do not; fewer when the node's memory cannot hold that many copies
  of the decoder;
- every other stage (prior, depth, scorer, writers) reserves no CPU: their work is small beside the
  decoders' and runs in the gaps;
- decoder batches of 16 (prior batches of 32: one prior call feeds two decoder batches), fewer
  when the memory estimate says so; diffusers' memory format (channels-last was 5-13% faster, but
  its float effects moved pixels of a long render by up to 12 levels from diffusers' image, and CPU
  runs are where users check the 1-level promise: ``--channels-last`` still takes it).
GPU clusters:
- actors as `cluster.resources.resolve_stages` lays them out, with as many prior GPUs as the
  calibration profile of the GPU type says keep the decoders fed (when a profile exists);
- the largest decoder batch (a power of two, at most 16) whose estimated memory at the
  manifest's largest image fits the GPU; the estimate is rough, and a call that still runs out of
  memory is split in halves by the actor (actors/stage.py), so a wrong guess costs speed, not images.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from schemas.config import JobConfig, StageResources
from schemas.stages import DECODER, PRIOR, STAGES

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

# GPU memory by Ray accelerator type (its ``accelerator_type:<type>`` resource).
GPU_MEMORY_BYTES = {
    "T4": 16e9,
    "V100": 16e9,
    "P100": 16e9,
    "A10G": 24e9,
    "L4": 24e9,
    "L40S": 48e9,
    "A100": 40e9,  # the smaller of the two A100s
    "A100-40G": 40e9,
    "A100-80G": 80e9,
    "H100": 80e9,
    "H200": 141e9,
}


@dataclass(frozen=True, kw_only=True)
class Machine:
    """What the job found: schedulable CPUs, GPUs and memory of the cluster (a private local Ray: this machine)."""

    cpus: float
    gpus: float = 0.0
    memory_bytes: float = 0.0  # Ray's schedulable memory (0: unknown)
    accelerator_type: str = ""  # the GPU type when every GPU node has the same one
    source: str = "the Ray cluster"  # where the numbers come from

    def gpu_memory(self) -> tuple[float, str]:
        """(bytes, whose) of one GPU, from the accelerator type; (0, "unknown") for logical or unlisted GPUs."""
        if self.accelerator_type in GPU_MEMORY_BYTES:
            return GPU_MEMORY_BYTES[self.accelerator_type], f"a {self.accelerator_type}'s"
        return 0.0, "unknown"

    def describe(self) -> dict[str, Any]:
        """The machine as stats.json records it."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One default filled for this machine: the flag that would set it, the value, and why."""

    flag: str
    value: Any
    reason: str

    def line(self) -> str:
        """``--batch-size 16: why``."""
        return f"{self.flag} {_shown(self.value)}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """The choice as stats.json records it."""
        return {"flag": self.flag, "value": self.value, "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the defaults need to know of the pending work (from the plan's scan)."""

    largest_pixels: int  # height x width of the largest image
    decoder_weight_bytes: float  # one decoder actor's weights at the run's precision
    value_bytes: int  # bytes per activation value: 4 (float32) or 2
    prior_seconds: float = 0.0  # busy seconds per image of the GPU type's calibration profile (0: none)
    decoder_seconds: float = 0.0
    profile: str = ""  # the profile's name, and whether it was measured
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
    if machine.gpus:
        config = _gpu_defaults(config, machine, workload, choices)
    else:
        config = _cpu_defaults(config, machine, workload, choices)
    return config, choices


def _cpu_defaults(config: JobConfig, machine: Machine, workload: Workload, choices: list[Choice]) -> JobConfig:
    cores = max(1, math.floor(machine.cpus + 1e-9))
    per_actor = workload.decoder_weight_bytes + CPU_BATCH_SIZE * image_bytes(workload)
    decoder = config.decoder
    if decoder.num_actors is None:
        count, reason = cores, f"one single-thread decoder per CPU core ({cores} found)"
        if machine.memory_bytes and per_actor * cores > machine.memory_bytes * MEMORY_HEADROOM:
            count = max(1, math.floor(machine.memory_bytes * MEMORY_HEADROOM / per_actor))
            reason += (
                f", {count} because each needs ~{per_actor / 1e9:.1f} GB (weights and a batch) of the "
                f"{machine.memory_bytes / 1e9:.1f} GB Ray may use"
            )
        batches = -(-workload.num_images // (config.batch_size or CPU_BATCH_SIZE)) if workload.num_images else count
        if batches < count:  # a decoder that would get no batch only costs its start-up
            count = max(1, batches)
            reason = (
                f"the run has {workload.num_images} image(s), {batches} batch(es) of at most "
                f"{config.batch_size or CPU_BATCH_SIZE}: one single-thread decoder per batch (per core otherwise, "
                f"{cores} found)"
            )
        decoder = _set(decoder, "num_actors", count, "--num-decoder-actors", reason, choices)
    if decoder.num_cpus is None:
        reason = "one core and one torch thread per decoder: one-thread actors keep their speed when a core is busy"
        decoder = _set(decoder, "num_cpus", 1.0, "--decoder-cpus", reason, choices)
    beside = "its work is small beside the decoders' and runs in their gaps"
    updates: dict[str, Any] = {"decoder": decoder}
    for stage in STAGES:
        if stage is not DECODER:
            recorded = choices if stage.in_run(needs_depth=workload.needs_depth, score=workload.score) else None
            resources = getattr(config, stage.config_field)
            reason = f"no CPU reserved: {beside}"
            updates[stage.config_field] = _set(resources, "num_cpus", 0.0, stage.flag("cpus"), reason, recorded)
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
    prior = config.prior
    gpus = int(machine.gpus)
    if (
        prior.num_actors is None
        and config.decoder.num_actors is None
        and gpus >= 2
        and workload.prior_seconds
        and workload.decoder_seconds
    ):
        # Imported here: suggest_prior_decoder lives beside the resource mapping it feeds.
        from cluster.resources import suggest_prior_decoder

        suggestion = suggest_prior_decoder(
            prior_seconds=workload.prior_seconds, decoder_seconds=workload.decoder_seconds, cluster_gpus=gpus
        )
        reason = f"calibration profile {workload.profile}: {suggestion.note}"
        prior = _set(prior, "num_actors", suggestion.num_prior_actors, "--num-prior-actors", reason, choices)
    stages = {PRIOR.config_field: prior}
    one_cpu = "one CPU per actor beside its GPU: input decoding, batch assembly, Ray's own work"
    for stage in STAGES:
        reason = "one CPU per writer: PNG encoding and uploads" if stage.sink else one_cpu
        # stages the run does not have print nothing
        recorded = choices if stage.in_run(needs_depth=workload.needs_depth, score=workload.score) else None
        resources = stages.get(stage.config_field, getattr(config, stage.config_field))
        stages[stage.config_field] = _set(resources, "num_cpus", 1.0, stage.flag("cpus"), reason, recorded)
    updates.update(stages)
    if config.batch_size is None:
        memory, where = machine.gpu_memory()
        if memory:
            shared = 0 < machine.gpus < 2  # the prior's weights share the GPU
            weights = workload.decoder_weight_bytes * (1.3 if shared else 1.0)
            batch = _fitting_batch(memory - weights / MEMORY_HEADROOM, workload, limit=GPU_MAX_BATCH_SIZE)
            side = math.isqrt(workload.largest_pixels)
            reason = (
                f"the largest batch (at most {GPU_MAX_BATCH_SIZE}) whose estimated memory fits {where} "
                f"{memory / 1e9:.0f} GB at the largest image (~{side}x{side}); a call that runs out of memory is halved"
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
        reason = "diffusers' default memory format on GPUs (channels-last is unmeasured there; --channels-last to try)"
        choices.append(Choice(flag="--channels-last", value=False, reason=reason))
    return dataclasses.replace(config, **updates)


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
