"""Runners: execute a chain of stages over planned batches, in-process or on Ray.

A stage is a plain class from `actors/` (or a benchmark stand-in) whose instances map one Arrow
table to another; `StageSpec` says how to build it and what Ray resources its actors hold. The
runner knows nothing about Kandinsky: `jobs.pipeline` decides which stages exist.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cluster.resources import StagePlan
from schemas.work import from_ipc, to_ipc

logger = logging.getLogger(__name__)

PAYLOAD = "payload"


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: ``cls(**kwargs, worker=...)`` builds it; each instance maps a table to a table."""

    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: StagePlan = field(default_factory=lambda: StagePlan(num_actors=1, num_gpus=0.0, num_cpus=1.0))


def run_local(stages: Sequence[StageSpec], batches: Sequence[pa.Table]) -> Iterator[pa.Table]:
    """In-process: build one instance per stage, push each batch through the chain in order."""
    instances = [spec.cls(**spec.kwargs, worker="local") for spec in stages]
    for batch in batches:
        for instance in instances:
            batch = instance(batch)
        yield batch


def ray_worker_tag() -> str:
    """``gpus=<ray gpu ids> cuda=<CUDA_VISIBLE_DEVICES>`` of the current Ray worker."""
    import ray

    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    return f"gpus={gpu_ids or '-'} cuda={os.environ.get('CUDA_VISIBLE_DEVICES') or '-'}"


class PayloadStage:
    """Ray Data callable class: builds the stage once per actor, maps IPC payload rows through it."""

    def __init__(self, *, cls: type, kwargs: dict[str, Any], name: str) -> None:
        self.name = name
        self.instance = cls(**kwargs, worker=ray_worker_tag())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if PAYLOAD not in batch.column_names:
            raise KeyError(f"stage {self.name}: input batch lacks the {PAYLOAD!r} column (Arrow IPC of a batch)")
        outputs = [to_ipc(self.instance(from_ipc(payload))) for payload in batch.column(PAYLOAD).to_pylist()]
        return pa.table({PAYLOAD: pa.array(outputs, pa.large_binary())})


def connect_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; returns True when this call started Ray.

    ``address`` (or RAY_ADDRESS) joins a running cluster; otherwise a local Ray starts.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    return True


def run_ray(stages: Sequence[StageSpec], batches: Sequence[pa.Table]) -> Iterator[pa.Table]:
    """Ray Data: one fixed actor pool per stage, batches streaming between pools via the object store.

    Each planned batch is its own block and each stage call sees exactly one planned batch, so
    batch composition (and so the pixels, bit for bit) does not depend on scheduling. Ray must be
    connected (`connect_ray`).
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    items = [{PAYLOAD: to_ipc(batch)} for batch in batches]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    for spec in stages:
        # A subclass per stage so Ray (dashboard, state API, logs) names actors after their stage.
        stage_class = type(f"{spec.name.title()}Stage", (PayloadStage,), {})
        dataset = dataset.map_batches(
            stage_class,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=spec.resources.num_actors),
            num_gpus=spec.resources.num_gpus,
            num_cpus=spec.resources.num_cpus,
            fn_constructor_kwargs={"cls": spec.cls, "kwargs": spec.kwargs, "name": spec.name},
        )
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for payload in block.column(PAYLOAD).to_pylist():
            yield from_ipc(payload)
