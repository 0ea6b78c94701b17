"""What the Ray runner tracks while it runs: open tasks, groups and items of batches, calls in flight, and
what it measures (`RunnerMeasures`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.execution.contract import Task
from jobs.execution.pool import Actor


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
    stage: int = -1  # index of the stage the call runs (the runner's stages, then the sink)
    outputs: list[Any] = field(default_factory=list)
    group: Group | None = None
    item: Item | None = None
    task: TaskState | None = None
    attempt: int = 0
    num_batches: int = 0


@dataclass(kw_only=True)
class RunnerMeasures:
    """What the Ray runner measures: the first time each moment happened (``time.monotonic()``) and, per
    stage (the sink last), busy seconds and calls. The job turns the moments into its `Timeline` marks."""

    names: list[str]
    started: float = field(default_factory=time.monotonic)
    moments: dict[str, float] = field(default_factory=dict)
    busy_seconds: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    pools: dict[str, Any] = field(default_factory=dict)  # `jobs.execution.scaling.ActorPools.stats`, at the end

    def __post_init__(self) -> None:
        self.busy_seconds = self.busy_seconds or [0.0] * len(self.names)
        self.calls = self.calls or [0] * len(self.names)

    def mark(self, name: str) -> None:
        """Record the first time ``name`` happens."""
        self.moments.setdefault(name, time.monotonic())

    def count_call(self, stage: int, seconds: float) -> None:
        """One finished call of ``stage`` that was busy ``seconds``."""
        self.busy_seconds[stage] += seconds
        self.calls[stage] += 1

    def per_stage(self) -> dict[str, Any]:
        """stats.json's busy seconds and calls per stage."""
        return {
            "busy_seconds": {name: round(s, 3) for name, s in zip(self.names, self.busy_seconds)},
            "calls": dict(zip(self.names, self.calls)),
            "pools": self.pools,
        }
