"""Runners and batching: call composition is a function of the plan; the Ray runner streams, bounds and recovers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.stage import Call, Outcome, Stage
from cluster.resources import StagePlan
from jobs.execution.runner import RayStagePipeline, StageSpec, run_local, run_ray
from jobs.planning.plan import batch, group_batches, make_plan
from schemas.config import JobConfig
from schemas.work import CALL_KEY, PRIOR_CALL_KEY
from tests.conftest import write_manifest


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


def work_rows(rows: list[dict]) -> pa.Table:
    """Planned work for manifest ``rows`` (through the real planner)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp) / "m.parquet", rows)
        config = JobConfig(manifest=manifest, output=f"{tmp}/out", batch_size=1000)
        return make_plan(config, done=None).batches.work


MIXED = [
    {"id": f"r{i:02d}", "prompt": f"p{i}", "height": (64, 128)[i % 2], "num_images": 1 + i % 3, "seed": i}
    for i in range(12)
] + [{"id": "neg", "prompt": "x", "negative_prompt": "y", "num_images": 2, "seed": 1}]


def test_batches_are_uniform_full_and_independent_of_row_order() -> None:
    work = work_rows(MIXED)
    batches = batch(work, batch_size=4)
    assert sum(b.num_rows for b in batches) == work.num_rows == 26
    for table in batches:
        assert 1 <= table.num_rows <= 4
        for name in CALL_KEY:
            assert len(set(table.column(name).to_pylist())) == 1, name
    keys = [tuple(b.column(name)[0].as_py() for name in CALL_KEY) for b in batches]
    for table, key, next_key in zip(batches, keys, keys[1:]):
        assert table.num_rows == 4 or key != next_key  # only the last batch of a key may be short
    again = batch(work_rows(list(reversed(MIXED))), batch_size=4)
    rows = lambda tables: [t.drop_columns(["manifest_file"]).to_pylist() for t in tables]  # noqa: E731
    assert rows(again) == rows(batches)
    # list-like views: indexing, negative indexing, slicing, bounds
    assert batches[-1].to_pylist() == list(batches)[-1].to_pylist()
    assert [b.num_rows for b in batches[1:3]] == [batches[1].num_rows, batches[2].num_rows]
    with pytest.raises(IndexError):
        batches[len(batches)]
    assert len(batch(work.slice(0, 0), batch_size=4)) == 0


def test_prior_groups_hold_whole_batches_sharing_the_prior_key() -> None:
    batches = batch(work_rows(MIXED), batch_size=3)
    groups = list(group_batches(batches, max_rows=7))
    assert [t.to_pylist() for g in groups for t in g] == [t.to_pylist() for t in batches]  # order and content kept
    for group in groups:
        assert sum(t.num_rows for t in group) <= 7 or len(group) == 1
        keys = {tuple(t.column(name)[0].as_py() for name in PRIOR_CALL_KEY) for t in group}
        assert len(keys) == 1
    assert any(len(g) > 1 for g in groups)
    assert [len(g) for g in group_batches(batches, max_rows=1)] == [1] * len(batches)


def _stages(*, first_batch: int | None = None, **last: object) -> list[StageSpec]:
    none = StagePlan(num_actors=1, num_gpus=0.0, num_cpus=0.0)
    return [
        StageSpec(name="first", cls=Tag, kwargs={"column": "first_rows"}, resources=none, batch_size=first_batch),
        StageSpec(
            name="last",
            cls=Tag,
            kwargs={"column": "last_rows", **last},
            resources=StagePlan(num_actors=2, num_gpus=0.0, num_cpus=0.0),
        ),
    ]


def test_local_runner_calls_first_stage_per_group_and_later_stages_per_batch() -> None:
    batches = batch(work_rows(MIXED), batch_size=3)
    groups = list(group_batches(batches, max_rows=9))
    outputs = list(run_local(_stages(first_batch=5), groups))
    kept = [o.drop_columns(["first_rows", "last_rows"]).to_pylist() for o in outputs]
    assert kept == [b.to_pylist() for b in batches]
    position = 0
    for group in groups:
        rows = sum(t.num_rows for t in group)
        for table in group:
            out = outputs[position]
            assert set(out.column("last_rows").to_pylist()) == {table.num_rows}
            # the group is cut into first-stage calls of at most 5 rows
            assert max(out.column("first_rows").to_pylist()) <= min(5, rows)
            position += 1


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_equals_local_and_records_a_timeline() -> None:
    batches = batch(work_rows(MIXED), batch_size=3)
    expected = sorted(str(o.to_pylist()) for o in run_local(_stages(), group_batches(batches, max_rows=6)))
    timeline: dict = {}
    outputs = list(run_ray(_stages(), group_batches(batches, max_rows=6), timeline=timeline))
    assert sorted(str(o.to_pylist()) for o in outputs) == expected
    assert timeline["started"] <= timeline["first_dispatch"] <= timeline["first_result"]
    assert timeline["calls"][1] == len(batches) and timeline["calls"][0] < len(batches)


@pytest.mark.usefixtures("ray_two_gpus")
def test_stages_before_the_split_see_whole_groups() -> None:
    """[depth] -> prior -> decoder: the split comes after the prior, the second of three stages."""
    batches = batch(work_rows(MIXED), batch_size=2)
    none = StagePlan(num_actors=1, num_gpus=0.0, num_cpus=0.0)
    stages = [
        StageSpec(name="zero", cls=Tag, kwargs={"column": "zero_rows"}, resources=none),
        *_stages(),
    ]
    local = list(run_local(stages, group_batches(batches, max_rows=6), split_after=1))
    remote = list(run_ray(stages, group_batches(batches, max_rows=6), split_after=1))
    assert sorted(str(o.to_pylist()) for o in remote) == sorted(str(o.to_pylist()) for o in local)
    for group in group_batches(batches, max_rows=6):
        rows = sum(t.num_rows for t in group)
        for table in group:
            first = table.select(["id", "image_index"]).to_pylist()[0]
            out = next(o for o in local if o.select(["id", "image_index"]).to_pylist()[0] == first)
            assert set(out.column("zero_rows").to_pylist()) == set(out.column("first_rows").to_pylist()) == {rows}
            assert set(out.column("last_rows").to_pylist()) == {table.num_rows}
    with pytest.raises(ValueError, match="split_after"):
        list(run_local(stages, [], split_after=3))


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_pulls_work_lazily_within_its_buffer() -> None:
    batches = batch(work_rows(MIXED), batch_size=1)
    pulled = []

    def groups() -> Iterator[list[pa.Table]]:
        for table in batches:
            pulled.append(table)
            yield [table]

    pipeline = RayStagePipeline(_stages(), max_buffered=3)
    try:
        results = pipeline.run(groups())
        next(results)
        assert len(pulled) <= 4  # at most the buffer, plus the group that filled it
        assert 1 + sum(1 for _ in results) == len(batches)
    finally:
        pipeline.close()


@pytest.mark.usefixtures("ray_two_gpus")
@pytest.mark.parametrize("stage", ["first", "last"])
def test_ray_runner_survives_a_dying_actor(tmp_path: Path, stage: str) -> None:
    batches = batch(work_rows(MIXED), batch_size=2)
    crash = {"crash_marker": str(tmp_path / "crashed"), "crash_on": "r05"}
    stages = _stages()
    stages = [
        StageSpec(
            name=spec.name,
            cls=spec.cls,
            kwargs={**spec.kwargs, **(crash if spec.name == stage else {})},
            resources=spec.resources,
        )
        for spec in stages
    ]
    outputs = list(run_ray(stages, group_batches(batches, max_rows=4)))
    assert (tmp_path / "crashed").exists()
    ids = sorted((r["id"], r["image_index"]) for o in outputs for r in o.to_pylist())
    assert ids == sorted((r["id"], r["image_index"]) for b in batches for r in b.to_pylist())  # each exactly once


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_raises_stage_bugs_and_start_failures() -> None:
    batches = batch(work_rows(MIXED[:2]), batch_size=2)
    none = StagePlan(num_actors=1, num_gpus=0.0, num_cpus=0.0)
    with pytest.raises(ValueError, match="bug in the stage"):
        list(run_ray([StageSpec(name="broken", cls=Broken, resources=none)], group_batches(batches, max_rows=2)))
    with pytest.raises(RuntimeError, match="(?s)no actor could start.*no checkpoint"):
        list(run_ray([StageSpec(name="model", cls=CannotStart, resources=none)], group_batches(batches, max_rows=2)))


def test_plan_of_many_rows_stays_columnar(tmp_path: Path) -> None:
    """A big plan is one sorted table plus offsets, not one Arrow object per batch."""
    n = 20_000
    rows = pa.table({"id": [f"id-{i:06d}" for i in range(n)], "prompt": ["p"] * n, "seed": np.arange(n)})
    import pyarrow.parquet as pq

    pq.write_table(rows, tmp_path / "m.parquet")
    config = JobConfig(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), batch_size=4)
    done_ids = [f"id-{i:06d}" for i in range(0, n, 2)]
    done = pa.table({"id": done_ids, "image_index": pa.array([0] * len(done_ids), pa.int32())})
    plan = make_plan(config, done=done)
    assert plan.num_done == n // 2 and plan.num_to_render == n // 2
    assert len(plan.batches) == n // 8 and plan.batches.offsets.dtype == np.int64
    assert plan.batches[0].column("id").to_pylist() == ["id-000001", "id-000003", "id-000005", "id-000007"]
