"""What machine the job runs on (`cluster.defaults.Machine`) and the defaults it chooses for it.

`ray_machine` reads a connected Ray cluster (CPUs, GPUs, memory, GPU type), `local_machine` this
machine without Ray (``--runner local``, ``--dry-run``). `machine_defaults` fills the config's
machine-dependent options from either.
"""

from __future__ import annotations

import os
from typing import Any

from cluster.defaults import REAL_DECODER_PARAMETERS, Choice, Machine, Workload, choose_defaults
from cluster.layout import StageCosts
from cluster.nodes import NodeShape
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.models import is_hub_id, is_remote, local_path
from schemas.modes import DEFAULT_MODE, MODES

logger = logger_for(__name__)

ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource naming each GPU node's type
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
REFERENCE_ACCELERATOR = "H100"  # whose estimated costs stand in for a GPU type no profile knows


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
    """The connected Ray cluster: its schedulable CPUs, GPUs and memory, its live nodes, the GPU type when there is
    one, whether an autoscaler runs, and the GPUs its autoscaler may add (when Ray knows its node groups).

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
        nodes=tuple(ray_nodes()),
        autoscaler=autoscaler_running(),
        planned_gpus=float((_max_resources() or {}).get("GPU", 0) or 0),
    )


def ray_nodes() -> list[NodeShape]:
    """The live nodes of the connected cluster: totals, what is free now, labels, whether each is being drained.

    Reads Ray's GCS through ``ray._private.state`` (what ``ray status`` and Ray Serve's node cache read):
    a private API, pinned by constraints.txt.
    """
    import ray
    from ray._private.state import state

    free = state.available_resources_per_node()
    draining = set(state.get_draining_nodes())
    shapes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        shapes.append(
            NodeShape(
                name=node_id[:8],
                total=dict(node.get("Resources") or {}),
                available=dict(free.get(node_id, {})),
                labels=dict(node.get("Labels") or {}),
                draining=node_id in draining,
                node_id=node_id,
            )
        )
    return shapes


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes manages the cluster.

    Autoscaler v1 reports on node types in the GCS; a Ray started without an autoscaling config (``ray.init()``,
    ``ray start`` by hand) runs the same monitor over a read-only provider whose node types are ``node_<id>``
    (it adds nothing, so it does not count). Autoscaler v2 (KubeRay's ``version: v2``) marks itself in the GCS.
    """
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    if _autoscaler_v2():
        return True
    try:
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    except ValueError:
        return False
    report = status.get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return bool(report) and any(kind != f"node_{node_id}" for node_id, kind in mapping.items())


def _autoscaler_v2() -> bool:
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # noqa: BLE001 - a Ray without autoscaler v2: only v1 reports count
        return False


def _max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's node groups allow, when Ray was given its autoscaling config."""
    from ray._private.state import state

    try:
        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it: nothing declared
        return None


def machine_defaults(
    config: JobConfig,
    machine: Machine,
    *,
    modes: list[str],
    largest_pixels: int,
    needs_depth: bool,
    num_images: int = 0,
    units: dict[str, float] | None = None,
    depth_images: int = 0,
) -> tuple[JobConfig, list[Choice]]:
    """`cluster.defaults.choose_defaults` for the pending work: ``modes`` load, images up to ``largest_pixels``;
    ``units`` (the work's `jobs.planning.calibration.unit_totals`) and ``depth_images`` price its stages."""
    gpu = bool(machine.gpus)
    value_bytes = 2 if config.dtype in ("float16", "bfloat16") or (config.dtype == "auto" and gpu) else 4
    checkpoints = {MODES[mode].checkpoint for mode in modes} or {MODES[DEFAULT_MODE].checkpoint}
    weights = max(
        _weight_bytes(config.models.for_checkpoint(name), value_bytes, config.storage_options) for name in checkpoints
    )
    pixels = largest_pixels or config.defaults.height * config.defaults.width
    workload = Workload(
        largest_pixels=pixels,
        decoder_weight_bytes=weights,
        value_bytes=value_bytes,
        costs=machine_costs(
            config,
            machine,
            pixels=pixels,
            needs_depth=needs_depth,
            units=units,
            num_images=num_images,
            depth_images=depth_images,
        )
        if gpu
        else None,
        needs_depth=needs_depth,
        score=bool(config.score),
        num_images=num_images,
    )
    return choose_defaults(config, machine, workload)


def _weight_bytes(path: str, value_bytes: int, storage_options: dict[str, Any]) -> float:
    """One decoder checkpoint's weights in memory: its files' size when a folder or on object storage, the real
    model's when a hub id (or when they cannot be listed)."""
    if is_remote(path):
        from actors.storage import open_fs

        try:
            fs, root = open_fs(path, storage_options)
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


def machine_costs(
    config: JobConfig,
    machine: Machine,
    *,
    pixels: int,
    needs_depth: bool,
    units: dict[str, float] | None = None,
    num_images: int = 0,
    depth_images: int = 0,
) -> StageCosts:
    """Per-image stage costs on one GPU of the machine's type: of the work whose `unit_totals` are ``units``
    (``num_images`` images), else of one image of ``pixels`` at the defaults' steps.

    From the calibration profile of the GPU type (measured, or estimated from FLOP counts); for a type
    no profile knows (logical GPUs, an unlisted type) the FLOP estimate of an H100, whose ratios are
    what the layout needs.
    """
    from jobs.planning.calibration import estimated_profile, image_seconds, profile_for, stage_costs

    profile = profile_for(machine.accelerator_type) if machine.accelerator_type else None
    note = ""
    if profile is None:
        profile = estimated_profile(REFERENCE_ACCELERATOR)
        note = f"; GPU type {machine.accelerator_type or 'unknown'}: {REFERENCE_ACCELERATOR} ratios"
    if units and num_images:
        costs = stage_costs(
            profile,
            units,
            num_images=num_images,
            score=bool(config.score),
            depth_images=depth_images,
            batch_size=config.batch_size,
            prior_batch_size=config.prior_batch_size,
        )
        return StageCosts(**{**costs.__dict__, "source": costs.source + note})
    seconds = image_seconds(profile, defaults=config.defaults, pixels=pixels)
    kind = "measured" if profile.measured else "estimated"
    return StageCosts(
        prior=seconds["prior"],
        decoder=seconds["decoder"],
        score=seconds["score"] if config.score else 0.0,
        depth=profile.depth_image_seconds if needs_depth else 0.0,
        source=f"{profile.name} profile, {kind}{note}",
    )


def log_choices(machine: Machine, choices: list[Choice]) -> None:
    """Say at start-up what the job found and chose: one INFO line with the values, each value's reason at DEBUG
    (``--log-level DEBUG``; stats.json's ``defaults`` keeps them too)."""
    if not choices:
        return
    found = f"{machine.cpus:g} CPU(s), " + (
        f"{machine.gpus:g} GPU(s){' ' + machine.accelerator_type if machine.accelerator_type else ''}"
        if machine.gpus
        else "no GPU"
    )
    values = " ".join(choice.setting() for choice in choices)
    logger.info("defaults for %s (%s): %s (reasons: --log-level DEBUG or stats.json)", machine.source, found, values)
    lines = "".join(f"\n  {choice.line()}" for choice in choices)
    logger.debug("why each default (every flag overrides):%s", lines)


def stats_record(machine: Machine, choices: list[Choice]) -> dict[str, Any]:
    """stats.json's ``defaults`` entry: the machine found and each value chosen with its reason."""
    return {"machine": machine.describe(), "chosen": [choice.as_dict() for choice in choices]}
