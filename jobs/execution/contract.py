"""What a runner executes: a chain of model stages, a sink that owns the outputs, and tasks (one per shard).

The runners (`jobs.execution.local`, `jobs.execution.runner`) know nothing about Kandinsky;
`jobs.execution.chain.build_chain` decides which stages exist. A stage
is a plain class following `actors.stage.Stage` (a table in, the same rows out); the sink (e.g.
`actors.writer.ShardWriter`) takes the last stage's output batch by batch with ``add(tag, table)``
and publishes a task's outputs with ``finalize(tag, args)``.

Work arrives as tasks, each a list of groups of planned batches. The stages up to ``split_after``
see a group's batches in one call (concatenated) and must return their input rows in order; the
output of stage ``split_after`` is cut back into the group's batches, and every later stage sees
exactly one batch per call. So a prior call can serve several decoder batches, and the composition
of every call is a pure function of the plan (the pixels do not depend on scheduling). All batches
of a task go to one sink instance, which is told to finalize the task once they are all in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cluster.resources import StageLayout


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: `build` makes an instance (``cls(**kwargs, max_batch_size=batch_size, worker=...)``).

    ``cls`` follows the stage contract of `actors.stage.Stage` (which groups rows into model calls of
    at most ``max_batch_size`` rows and keeps every input row, in order). Stages with the same
    ``group`` run in the same actors (each actor builds all of them, in chain order), which then
    reserve the group's ``resources`` (equal for every stage of the group); by default a stage is a
    group of its own.
    """

    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: StageLayout = field(default_factory=lambda: StageLayout(num_actors=1, num_gpus=0.0, num_cpus=1.0))
    batch_size: int | None = None
    group: str = ""

    @property
    def group_name(self) -> str:
        """The group whose actors run this stage."""
        return self.group or self.name

    def build(self, *, worker: str) -> Any:
        """An instance of the stage."""
        return self.cls(**self.kwargs, max_batch_size=self.batch_size, worker=worker)


@dataclass(frozen=True, kw_only=True)
class SinkSpec:
    """The sink: ``cls(**kwargs, worker=...)`` with ``add(tag, table) -> dict``, ``finalize(tag, args) -> Any``
    and ``abandon(tag)``. Every batch of one task goes to the same instance."""

    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: StageLayout = field(default_factory=lambda: StageLayout(num_actors=1, num_gpus=0.0, num_cpus=1.0))

    def build(self, *, worker: str) -> Any:
        """An instance of the sink."""
        return self.cls(**self.kwargs, worker=worker)


@dataclass(frozen=True, kw_only=True)
class Task:
    """A unit of completion (a shard): its groups of planned batches, and what the sink's finalize is given."""

    tag: str
    groups: Sequence[Sequence[pa.Table]]
    args: Any = None

    @property
    def num_batches(self) -> int:
        """Planned batches in the task."""
        return sum(len(group) for group in self.groups)


@dataclass(frozen=True, kw_only=True)
class BatchDone:
    """One batch of a task reached the sink; ``info`` is what the sink's ``add`` returned."""

    tag: str
    info: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TaskDone:
    """A task is published; ``result`` is what the sink's ``finalize`` returned."""

    tag: str
    result: Any


Event = BatchDone | TaskDone


def split_rows(table: pa.Table, sizes: Sequence[int]) -> list[pa.Table]:
    """``table`` cut into consecutive pieces of ``sizes`` rows (which must add up to its rows)."""
    assert sum(sizes) == table.num_rows, (sizes, table.num_rows)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(table.slice(start, size))
        start += size
    return pieces


def check_split(stages: Sequence[StageSpec], split_after: int) -> None:
    """ValueError unless ``split_after`` names one of ``stages`` and each group's stages agree on its resources."""
    if not stages:
        raise ValueError("at least one stage is needed")
    if not 0 <= split_after < len(stages):
        raise ValueError(f"split_after must name one of the {len(stages)} stages, got {split_after}")
    for spec in stages:
        first = next(other for other in stages if other.group_name == spec.group_name)
        if spec.resources != first.resources:
            raise ValueError(f"stages {first.name} and {spec.name} share group {spec.group_name} but not its resources")


def stage_groups(stages: Sequence[StageSpec]) -> dict[str, list[int]]:
    """Group name -> indices of its stages in ``stages``, groups in order of their first stage."""
    groups: dict[str, list[int]] = {}
    for index, spec in enumerate(stages):
        groups.setdefault(spec.group_name, []).append(index)
    return groups
