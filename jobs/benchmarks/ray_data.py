"""The first wiring, Ray Data ``map_batches`` actor pools, kept to compare with the job's (``simulated --wiring``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from cluster.resources import ray_remote_args
from jobs.execution.runner import StageSpec, StageWorker
from schemas.work import from_ipc, to_ipc

PAYLOAD = "payload"
SIZES = "sizes"


class PayloadStage:
    """Ray Data callable class: builds the stage once per actor, maps IPC payload rows through it."""

    def __init__(self, *, cls: type, kwargs: dict[str, Any], name: str, batch_size: int | None) -> None:
        self.name = name
        self.worker = StageWorker(cls=cls, kwargs=kwargs, name=name, batch_size=batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if PAYLOAD not in batch.column_names:
            raise KeyError(f"stage {self.name}: input batch lacks the {PAYLOAD!r} column (Arrow IPC of a batch)")
        outputs = []
        sizes = batch.column(SIZES).to_pylist() if SIZES in batch.column_names else None
        for i, payload in enumerate(batch.column(PAYLOAD).to_pylist()):
            table = from_ipc(payload)
            outputs.extend(self.worker.run(payload, sizes[i] if sizes else [table.num_rows])[:-1])
        return pa.table({PAYLOAD: pa.array(outputs, pa.large_binary())})


def run_ray_data(stages: Sequence[StageSpec], groups: Iterable[Sequence[pa.Table]]) -> Iterator[pa.Table]:
    """The same stages as Ray Data ``map_batches`` actor pools (kept to compare wirings in benchmarks).

    Each group is one block; the first stage emits one row per batch and later stages take one row
    per call. Materialises every group's payload up front, so it is not meant for huge plans.
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    items = [{PAYLOAD: to_ipc(pa.concat_tables(group)), SIZES: [table.num_rows for table in group]} for group in groups]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    for spec in stages:
        # A subclass per stage so Ray (dashboard, state API, logs) names actors after their stage.
        stage_class = type(f"{spec.name.title()}Stage", (PayloadStage,), {})
        dataset = dataset.map_batches(
            stage_class,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=spec.resources.num_actors),
            **ray_remote_args(spec.resources),
            fn_constructor_kwargs={
                "cls": spec.cls,
                "kwargs": spec.kwargs,
                "name": spec.name,
                "batch_size": spec.batch_size,
            },
        )
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for payload in block.column(PAYLOAD).to_pylist():
            yield from_ipc(payload)
