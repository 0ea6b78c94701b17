"""What machine the job runs on (`cluster.defaults.Machine`) and the defaults it chooses for it.

`ray_machine` reads a connected Ray cluster (CPUs, GPUs, memory, GPU type), `local_machine` this
machine without Ray (``--runner local``, ``--dry-run``). `machine_defaults` fills the config's
machine-dependent options from either.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from cluster.defaults import REAL_DECODER_PARAMETERS, Choice, Machine, Workload, choose_defaults
from schemas.config import JobConfig
from schemas.models import is_hub_id, is_remote, local_path
from schemas.modes import DEFAULT_MODE, MODES

logger = logging.getLogger(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource naming each GPU node's type
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def local_machine() -> Machine:
    """This machine's CPUs (those this process may run on) and physical memory; no GPUs (torch is not imported)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return Machine(cpus=float(cpus), memory_bytes=float(memory), source="this machine")


def ray_machine() -> Machine:
    """The connected Ray cluster: its schedulable CPUs, GPUs and memory, and the GPU type when there is one.

    Ray names each detected GPU's type in an ``accelerator_type:<type>`` resource; logical GPUs
    (``ray.init(num_gpus=2)``) have none, and then the GPU memory is unknown.
    """
    import ray

    resources = ray.cluster_resources()
    types = sorted(key[len(ACCELERATOR_PREFIX) :] for key in resources if key.startswith(ACCELERATOR_PREFIX))
    return Machine(
        cpus=float(resources.get("CPU", 0.0)),
        gpus=float(resources.get("GPU", 0.0)),
        memory_bytes=float(resources.get("memory", 0.0)),
        accelerator_type=types[0] if len(types) == 1 else "",
        source="the Ray cluster",
    )


def machine_defaults(
    config: JobConfig,
    machine: Machine,
    *,
    modes: list[str],
    largest_pixels: int,
    needs_depth: bool,
    num_images: int = 0,
) -> tuple[JobConfig, list[Choice]]:
    """`cluster.defaults.choose_defaults` for the pending work: ``modes`` load, images up to ``largest_pixels``."""
    gpu = bool(machine.gpus)
    value_bytes = 2 if config.dtype in ("float16", "bfloat16") or (config.dtype == "auto" and gpu) else 4
    checkpoints = {MODES[mode].checkpoint for mode in modes} or {MODES[DEFAULT_MODE].checkpoint}
    weights = max(
        _weight_bytes(config.models.for_checkpoint(name), value_bytes, config.storage_options) for name in checkpoints
    )
    pixels = largest_pixels or config.defaults.height * config.defaults.width
    prior_s, decoder_s, profile = (0.0, 0.0, "") if not gpu else _profile_costs(config, machine, pixels)
    workload = Workload(
        largest_pixels=pixels,
        decoder_weight_bytes=weights,
        value_bytes=value_bytes,
        prior_seconds=prior_s,
        decoder_seconds=decoder_s,
        profile=profile,
        needs_depth=needs_depth,
        score=bool(config.score),
        num_images=num_images,
    )
    return choose_defaults(config, machine, workload)


def _weight_bytes(path: str, value_bytes: int, storage_options: dict[str, Any]) -> float:
    """One decoder checkpoint's weights in memory: its files' size when a folder or on object storage, the real
    model's when a hub id (or when they cannot be listed)."""
    if is_remote(path):
        from fsspec.core import url_to_fs

        try:
            fs, root = url_to_fs(path, **storage_options)
            found = fs.find(root, detail=True)
        except Exception:  # noqa: BLE001 - only an estimate: assume the real model
            return REAL_DECODER_PARAMETERS * value_bytes
        return float(sum(info.get("size") or 0 for name, info in found.items() if name.endswith(_WEIGHT_SUFFIXES)))
    path = local_path(path)
    if is_hub_id(path) or not os.path.isdir(path):
        return REAL_DECODER_PARAMETERS * value_bytes
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names if n.endswith(_WEIGHT_SUFFIXES))
    return float(total)


def _profile_costs(config: JobConfig, machine: Machine, pixels: int) -> tuple[float, float, str]:
    """Busy seconds per image of prior and decoder on the GPU type's calibration profile, at the defaults' steps."""
    from jobs.planning.calibration import image_seconds, load_calibration

    profile = {profile.name: profile for profile in load_calibration()}.get(machine.accelerator_type)
    if profile is None:
        return 0.0, 0.0, ""
    seconds = image_seconds(profile, defaults=config.defaults, pixels=pixels)
    kind = "measured" if profile.measured else "estimated, not measured"
    return seconds["prior"], seconds["decoder"], f"{profile.name} ({kind})"


def log_choices(machine: Machine, choices: list[Choice]) -> None:
    """Say at start-up what the job found and chose (INFO: part of the default output)."""
    if not choices:
        return
    found = f"{machine.cpus:g} CPU(s), " + (
        f"{machine.gpus:g} GPU(s){' ' + machine.accelerator_type if machine.accelerator_type else ''}"
        if machine.gpus
        else "no GPU"
    )
    lines = "".join(f"\n  {choice.line()}" for choice in choices)
    logger.info("defaults for %s (%s; every flag overrides):%s", machine.source, found, lines)


def stats_record(machine: Machine, choices: list[Choice]) -> dict[str, Any]:
    """stats.json's ``defaults`` entry: the machine found and each value chosen with its reason."""
    return {"machine": machine.describe(), "chosen": [choice.as_dict() for choice in choices]}
