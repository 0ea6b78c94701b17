"""The in-process runner (``--runner local``): one instance per stage and one sink, tasks one after another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from jobs.execution.contract import BatchDone, Event, SinkSpec, StageSpec, Task, TaskDone, check_split, split_rows


def run_local(
    stages: Sequence[StageSpec], sink: SinkSpec, tasks: Iterable[Task], *, split_after: int = 0
) -> Iterator[Event]:
    """In-process: one instance per stage and one sink; tasks one after another, events in order.

    Model stages are built when the first task with batches arrives, so a run of refused rows loads no model.
    """
    check_split(stages, split_after)
    chain: list[Any] = []
    writer = sink.build(worker="local")
    for task in tasks:
        if task.groups and not chain:
            chain = [spec.build(worker="local") for spec in stages]
        for group in task.groups:
            table = pa.concat_tables(group)
            for instance in chain[: split_after + 1]:
                table = instance(table)
            for piece in split_rows(table, [batch.num_rows for batch in group]):
                for instance in chain[split_after + 1 :]:
                    piece = instance(piece)
                yield BatchDone(tag=task.tag, info=writer.add(task.tag, piece))
        yield TaskDone(tag=task.tag, result=writer.finalize(task.tag, task.args))
