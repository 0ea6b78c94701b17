"""Runners and batching: call composition is a function of the plan; the Ray runner streams, bounds and recovers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cluster.resources import StageLayout
from jobs.execution.contract import BatchDone, StageSpec, Task, TaskDone
from jobs.execution.local import run_local
from jobs.execution.runner import Deadlines, RayStagePipeline, RunnerMeasures, run_ray
from jobs.planning.batches import batch, group_batches
from schemas.config import JobConfig
from schemas.work import CALL_KEY, PRIOR_CALL_KEY
from tests.helpers.runners import (
    MIXED,
    NONE,
    Broken,
    CannotStart,
    Tag,
    row_key,
    task_ids,
    task_rows,
    toy_sink,
    toy_stages,
    toy_tasks,
    work_rows,
)


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


def test_prior_groups_hold_whole_consecutive_batches() -> None:
    batches = batch(work_rows(MIXED), batch_size=3)
    groups = list(group_batches(batches, max_rows=7))
    assert [t.to_pylist() for g in groups for t in g] == [t.to_pylist() for t in batches]  # order and content kept
    for group in groups:
        assert sum(t.num_rows for t in group) <= 7 or len(group) == 1
    assert any(len(g) > 1 for g in groups)
    assert [len(g) for g in group_batches(batches, max_rows=1)] == [1] * len(batches)


def test_rows_that_differ_only_in_prior_settings_share_a_decoder_batch() -> None:
    rows = [
        {"id": f"r{i}", "prompt": "a fox", "seed": i, "prior_num_inference_steps": 2 + i % 2,
         "negative_prompt": "blur" if i % 3 == 0 else None}
        for i in range(6)
    ]  # fmt: skip
    batches = batch(work_rows(rows), batch_size=8)
    assert len(batches) == 1  # one decoder call
    table = batches[0]
    keys = [tuple(table.column(name)[i].as_py() for name in PRIOR_CALL_KEY) for i in range(table.num_rows)]
    assert keys == sorted(keys)  # each prior kind together within the batch


def test_local_runner_calls_first_stage_per_group_and_later_stages_per_batch() -> None:
    batches = list(batch(work_rows(MIXED), batch_size=3))
    tasks = toy_tasks(batches, max_rows=9)
    events = list(run_local(toy_stages(first_batch=5), toy_sink(), tasks))
    assert [e.tag for e in events if isinstance(e, TaskDone)] == ["t0", "t1", "t2"]
    assert sum(e.info["rows"] for e in events if isinstance(e, BatchDone)) == sum(b.num_rows for b in batches)
    rows = task_rows(events)
    assert {e.tag: e.result["args"] for e in events if isinstance(e, TaskDone)} == {"t0": 0, "t1": 1, "t2": 2}
    for task in tasks:
        got = {row_key(r): r for r in rows[task.tag]}
        expected = [r for group in task.groups for table in group for r in table.to_pylist()]
        assert [{k: v for k, v in got[row_key(r)].items() if not k.endswith("_rows")} for r in expected] == expected
        for group in task.groups:
            size = sum(table.num_rows for table in group)
            for table in group:
                for key in table.select(["id", "image_index"]).to_pylist():
                    row = got[row_key(key)]
                    assert row["last_rows"] == table.num_rows  # later stages: one call per batch
                    assert row["first_rows"] <= min(5, size)  # the group cut into calls of at most 5 rows


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_equals_local_and_records_a_timeline() -> None:
    batches = list(batch(work_rows(MIXED), batch_size=3))
    expected = task_rows(list(run_local(toy_stages(), toy_sink(), toy_tasks(batches, max_rows=6))))
    measures = RunnerMeasures(names=["first", "last", "sink"])
    events = list(run_ray(toy_stages(), toy_sink(2), toy_tasks(batches, max_rows=6), measures=measures))
    assert task_rows(events) == expected
    assert measures.started <= measures.moments["first_dispatch"] <= measures.moments["first_result"]
    calls = measures.per_stage()["calls"]
    assert calls["last"] == len(batches) and calls["first"] < len(batches)
    assert calls["sink"] == len(batches) + 3  # one add per batch, one finalize per task


@pytest.mark.usefixtures("ray_two_gpus")
def test_stages_before_the_split_see_whole_groups() -> None:
    """[depth] -> prior -> decoder: the split comes after the prior, the second of three stages."""
    batches = list(batch(work_rows(MIXED), batch_size=2))
    stages = [StageSpec(name="zero", cls=Tag, kwargs={"column": "zero_rows"}, resources=NONE), *toy_stages()]
    local = task_rows(list(run_local(stages, toy_sink(), toy_tasks(batches, max_rows=6), split_after=1)))
    remote = task_rows(list(run_ray(stages, toy_sink(), toy_tasks(batches, max_rows=6), split_after=1)))
    assert remote == local
    for task in toy_tasks(batches, max_rows=6):
        rows = {row_key(r): r for r in local[task.tag]}
        for group in task.groups:
            size = sum(t.num_rows for t in group)
            for table in group:
                for key in table.select(["id", "image_index"]).to_pylist():
                    row = rows[row_key(key)]
                    assert row["zero_rows"] == row["first_rows"] == size and row["last_rows"] == table.num_rows
    with pytest.raises(ValueError, match="split_after"):
        list(run_local(stages, toy_sink(), [], split_after=3))


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_opens_tasks_lazily() -> None:
    batches = list(batch(work_rows(MIXED), batch_size=1))
    pulled = []

    def tasks() -> Iterator[Task]:
        for k, table in enumerate(batches):
            pulled.append(k)
            yield Task(tag=f"t{k}", groups=[[table]])

    pipeline = RayStagePipeline(toy_stages(), toy_sink(), max_tasks=2)
    try:
        events = pipeline.run(tasks())
        next(e for e in events if isinstance(e, TaskDone))
        assert len(pulled) <= 3, pulled  # the open tasks, plus at most one that found no room
        assert 1 + sum(1 for e in events if isinstance(e, TaskDone)) == len(batches)
    finally:
        pipeline.close()


@pytest.mark.usefixtures("ray_two_gpus")
@pytest.mark.parametrize("stage", ["first", "last", "sink"])
def test_ray_runner_survives_a_dying_actor(tmp_path: Path, stage: str) -> None:
    batches = list(batch(work_rows(MIXED), batch_size=2))
    crash = {"crash_marker": str(tmp_path / "crashed"), "crash_on": "r05"}
    stages = [
        StageSpec(
            name=spec.name,
            cls=spec.cls,
            kwargs={**spec.kwargs, **(crash if spec.name == stage else {})},
            resources=spec.resources,
        )
        for spec in toy_stages()
    ]
    sink = toy_sink(**(crash if stage == "sink" else {}))
    expected = task_rows(list(run_local(toy_stages(), toy_sink(), toy_tasks(batches, max_rows=4))))
    got = task_rows(list(run_ray(stages, sink, toy_tasks(batches, max_rows=4))))
    assert (tmp_path / "crashed").exists()
    assert task_ids(got) == task_ids(expected)  # every row of every task exactly once, after the re-runs


@pytest.mark.usefixtures("ray_two_gpus")
def test_ray_runner_raises_stage_bugs_and_start_failures() -> None:
    batches = list(batch(work_rows(MIXED[:2]), batch_size=2))
    with pytest.raises(ValueError, match="bug in the stage"):
        list(
            run_ray([StageSpec(name="broken", cls=Broken, resources=NONE)], toy_sink(), toy_tasks(batches, max_rows=2))
        )
    with pytest.raises(RuntimeError, match="(?s)no actor could start.*no checkpoint"):
        list(
            run_ray(
                [StageSpec(name="model", cls=CannotStart, resources=NONE)],
                toy_sink(),
                toy_tasks(batches, max_rows=2),
            )
        )


@pytest.mark.usefixtures("ray_two_gpus")
def test_a_stage_no_node_can_hold_is_refused_at_once_naming_the_node_shapes() -> None:
    batches = list(batch(work_rows(MIXED[:2]), batch_size=2))
    greedy = StageSpec(
        name="greedy", cls=Tag, kwargs={"column": "x"}, resources=StageLayout(num_actors=1, num_gpus=3.0, num_cpus=0.0)
    )
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"stage greedy: each actor needs 3 GPU and 0 CPU on one node.*GPU: 2"):
        list(run_ray([greedy], toy_sink(), toy_tasks(batches, max_rows=2), deadlines=Deadlines(stage_wait_s=600.0)))
    assert time.monotonic() - started < 60  # not the stage wait


def test_plan_of_many_rows_stays_columnar(tmp_path: Path) -> None:
    """A big plan is one sorted table plus offsets, not one Arrow object per batch; ``only`` plans a subset."""
    import pyarrow.parquet as pq

    from jobs.planning.manifests import list_manifest_paths, read_footer, read_whole
    from jobs.planning.work import shard_work

    n = 20_000
    rows = pa.table({"id": [f"id-{i:06d}" for i in range(n)], "prompt": ["p"] * n, "seed": np.arange(n)})
    pq.write_table(rows, tmp_path / "m.parquet")
    config = JobConfig(manifest=str(tmp_path / "m.parquet"), output=str(tmp_path / "out"), batch_size=4)
    ((uri, relpath),) = list_manifest_paths(config.manifest)
    table = read_whole(read_footer(uri, relpath))
    odd = [f"id-{i:06d}" for i in range(1, n, 2)]
    only = pa.table({"id": odd, "image_index": pa.array([0] * len(odd), pa.int32())})
    plan = shard_work(table, file=uri, config=config, movq_scales={}, only=only)
    assert plan.num_done == n // 2 and plan.num_to_render == n // 2 and plan.num_images == n
    assert len(plan.batches) == n // 8 and plan.batches.offsets.dtype == np.int64
    assert plan.batches[0].column("id").to_pylist() == ["id-000001", "id-000003", "id-000005", "id-000007"]
