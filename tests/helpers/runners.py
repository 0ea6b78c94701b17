"""Toy stages and sinks for the runner tests: call sizes recorded per stage, rows collected per task, crashes on cue."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa

from actors.stage import Call, Outcome, Stage
from cluster.resources import StageLayout
from jobs.execution.contract import SinkSpec, StageSpec, Task, TaskDone
from jobs.planning.batches import group_batches
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from tests.helpers.rows import write_manifest


class Tag(Stage):
    """A stage that records the size of every model call it makes in a column named after the stage."""

    def __init__(self, *, column: str, crash_marker: str | None = None, crash_on: str | None = None, **base) -> None:
        super().__init__(**base)
        self.column = column
        self.crash_marker = crash_marker
        self.crash_on = crash_on

    def run(self, call: Call, arrays: dict) -> list[int]:
        ids = [row["id"] for row in call.rows]
        if self.crash_marker and self.crash_on in ids and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()
            os._exit(1)  # the process dies mid-call: an infrastructure failure, not an exception
        return [len(call.rows)] * len(call.rows)

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        return table.append_column(self.column, pa.array(outcome.outputs, pa.int64()))


class Broken(Stage):
    """A stage with a bug (outside any model call)."""

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        raise ValueError("bug in the stage")


class CannotStart(Stage):
    """A stage whose model cannot load."""

    def __init__(self, **base) -> None:
        raise FileNotFoundError("no checkpoint at /nowhere")


class Collector:
    """A sink that keeps each task's rows in memory and returns them when the task is finalized."""

    def __init__(self, *, crash_marker: str | None = None, crash_on: str | None = None, worker: str = "") -> None:
        self.rows: dict[str, list[dict]] = {}
        self.crash_marker, self.crash_on = crash_marker, crash_on

    def add(self, tag: str, table: pa.Table) -> dict:
        ids = table.column("id").to_pylist()
        if self.crash_marker and self.crash_on in ids and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()
            os._exit(1)  # the sink's process dies with the task half added
        self.rows.setdefault(tag, []).extend(table.to_pylist())
        return {"rows": table.num_rows, "errors": 0}

    def finalize(self, tag: str, args: object) -> dict:
        return {"tag": tag, "rows": self.rows.pop(tag, []), "args": args}

    def abandon(self, tag: str) -> None:
        self.rows.pop(tag, None)


def work_rows(rows: list[dict]) -> pa.Table:
    """Planned work for manifest ``rows`` (through the real planner)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp) / "m.parquet", rows)
        config = JobConfig(manifest=manifest, output=f"{tmp}/out", batch_size=1000)
        return manifest_work(config).batches.work


MIXED = [
    {"id": f"r{i:02d}", "prompt": f"p{i}", "height": (64, 128)[i % 2], "num_images": 1 + i % 3, "seed": i}
    for i in range(12)
] + [{"id": "neg", "prompt": "x", "negative_prompt": "y", "num_images": 2, "seed": 1}]


NONE = StageLayout(num_actors=1, num_gpus=0.0, num_cpus=0.0)


def toy_stages(*, first_batch: int | None = None, **last: object) -> list[StageSpec]:
    return [
        StageSpec(name="first", cls=Tag, kwargs={"column": "first_rows"}, resources=NONE, batch_size=first_batch),
        StageSpec(
            name="last",
            cls=Tag,
            kwargs={"column": "last_rows", **last},
            resources=StageLayout(num_actors=2, num_gpus=0.0, num_cpus=0.0),
        ),
    ]


def toy_sink(num_actors: int = 1, **kwargs: object) -> SinkSpec:
    resources = StageLayout(num_actors=num_actors, num_gpus=0.0, num_cpus=0.0)
    return SinkSpec(name="sink", cls=Collector, kwargs=kwargs, resources=resources)


def toy_tasks(batches: list[pa.Table], *, max_rows: int, num_tasks: int = 3) -> list[Task]:
    groups = list(group_batches(batches, max_rows=max_rows))
    size = -(-len(groups) // num_tasks)
    return [Task(tag=f"t{k}", groups=groups[k * size : (k + 1) * size], args=k) for k in range(num_tasks)]


def row_key(row: dict) -> tuple:
    return (row["id"], row["image_index"])


def task_rows(events: list) -> dict[str, list[dict]]:
    """Rows per finished task, sorted; every task finished exactly once."""
    done = [e for e in events if isinstance(e, TaskDone)]
    assert len({e.tag for e in done}) == len(done)
    return {e.tag: sorted(e.result["rows"], key=row_key) for e in done}


def task_ids(rows: dict[str, list[dict]]) -> dict[str, list[tuple]]:
    return {tag: [row_key(row) for row in found] for tag, found in rows.items()}
