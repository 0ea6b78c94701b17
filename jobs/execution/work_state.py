"""What the Ray runner tracks while it runs: open tasks, groups and items of batches, calls in flight, and
what it measures (the timeline dict of `jobs.execution.runner.run_ray`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.execution.pool import Actor
from jobs.execution.stages import Task


@dataclass(eq=False, kw_only=True)
class TaskState:
    """A task (shard) while it is open: its attempt, its sink and the batches the sink still lacks."""

    task: Task
    attempt: int = 0
    sink: Actor | None = None
    remaining: int = 0  # batches not yet added to the sink
    finalizing: bool = False


@dataclass(eq=False, kw_only=True)
class Group:
    """One group of planned batches on its way through the stages up to the split (one call per stage)."""

    task: TaskState
    attempt: int  # the task attempt this group belongs to; stale groups are dropped
    batches: Sequence[pa.Table]
    wanted: set[int]  # positions whose split output is still needed
    queued: bool = False
    stage: int = 0
    data: Any = None
    failures: int = 0


@dataclass(eq=False, kw_only=True)
class Item:
    """One batch of a group after the split, with its current data (an ObjectRef)."""

    group: Group
    position: int
    data: Any = None


@dataclass(eq=False, kw_only=True)
class Call:
    """A call in flight: which actor, what kind, its outputs and the work it carries."""

    actor: Actor
    kind: str  # group | item | add | finalize | probe | abandon
    outputs: list[Any] = field(default_factory=list)
    group: Group | None = None
    item: Item | None = None
    task: TaskState | None = None
    attempt: int = 0
    num_batches: int = 0


def start_timeline(timeline: dict[str, Any] | None, names: list[str]) -> dict[str, Any]:
    """``timeline`` (or a new dict) set up for a run of stages ``names``: its start, busy seconds and calls."""
    timeline = timeline if timeline is not None else {}
    timeline.update(started=time.monotonic(), names=names, busy_seconds=[0.0] * len(names), calls=[0] * len(names))
    return timeline


def mark(timeline: dict[str, Any], name: str) -> None:
    """Record the first time ``name`` happens (monotonic clock)."""
    timeline.setdefault(name, time.monotonic())


def count_call(timeline: dict[str, Any], stage: int, seconds: float) -> None:
    """One finished call of ``stage`` that was busy ``seconds``."""
    timeline["busy_seconds"][stage] += seconds
    timeline["calls"][stage] += 1
