"""What the Ray runner tracks while it runs: open tasks, groups and items of batches, calls in flight, and
what it measures (`RunnerMeasures`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.execution.contract import Task
from jobs.execution.metrics import MetricsRecorder
from jobs.execution.pool import Actor
from jobs.execution.watch import PipelineWatch, Watcher


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
    stage (the sink last), busy seconds and calls. The job turns the moments into its `Timeline` marks.

    ``watcher`` (phase lines, status) and ``metrics`` (Ray metrics) receive what `tick` observes of the
    runner (`jobs.execution.watch`) and the calls `count_call` counts; both optional."""

    names: list[str]
    started: float = field(default_factory=time.monotonic)
    moments: dict[str, float] = field(default_factory=dict)
    busy_seconds: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    pools: dict[str, Any] = field(default_factory=dict)  # `jobs.execution.scaling.ActorPools.stats`, at the end
    watcher: Watcher | None = None
    metrics: MetricsRecorder | None = None
    tick_every_s: float = 1.0

    def __post_init__(self) -> None:
        self.busy_seconds = self.busy_seconds or [0.0] * len(self.names)
        self.calls = self.calls or [0] * len(self.names)
        self._watch = PipelineWatch(self.watcher, self.metrics)
        self._ticked = float("-inf")
        self._came_up = False  # an actor came up since the last look

    def mark(self, name: str) -> None:
        """Record the first time ``name`` happens."""
        self.moments.setdefault(name, time.monotonic())

    def count_call(self, stage: int, seconds: float, rows: int = 0) -> None:
        """One finished call of ``stage`` that was busy ``seconds`` on ``rows`` images."""
        self.busy_seconds[stage] += seconds
        self.calls[stage] += 1
        if self.metrics is not None:
            name = self.names[stage]
            self.metrics.add("stage_busy_seconds", seconds, stage=name)
            self.metrics.add("stage_calls", stage=name)
            if rows:
                self.metrics.observe("seconds_per_image", seconds / rows, stage=name)

    def came_up(self) -> None:
        """An actor answered its probe for the first time since it (re)started: look at the pipeline next tick."""
        self._came_up = True

    def tick(self, pipeline: Any) -> None:
        """Let the watcher and the metrics look at ``pipeline``'s state (at most once per ``tick_every_s``, or now
        when an actor just came up: its phase line is not missed by a run that ends within the interval)."""
        now = time.monotonic()
        if now - self._ticked >= self.tick_every_s or self._came_up:
            self._came_up = False
            self._ticked = now
            self._watch.observe(pipeline)

    def per_stage(self) -> dict[str, Any]:
        """stats.json's busy seconds and calls per stage."""
        return {
            "busy_seconds": {name: round(s, 3) for name, s in zip(self.names, self.busy_seconds)},
            "calls": dict(zip(self.names, self.calls)),
            "pools": self.pools,
        }
