"""Runners: push planned work through a chain of stages, in-process or on pools of Ray actors.

A stage is a plain class from `actors/` (or a benchmark stand-in) whose instances map one Arrow
table to another; `StageSpec` says how to build it, what Ray resources its actors hold and how
many rows one call may take. The runner knows nothing about Kandinsky: `jobs.execution.job` decides
which stages exist.

Work arrives as groups of planned batches. The stages up to ``split_after`` see a group's
batches in one call (concatenated; cut into calls of at most their ``batch_size`` rows) and must
return their input rows in order; the output of stage ``split_after`` is cut back into the group's
batches, and every later stage sees exactly one batch per call. So a prior call can serve several
decoder batches, and the composition of every call is a pure function of the plan (the pixels do
not depend on scheduling).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cluster.resources import StagePlan, ray_remote_args
from schemas.work import from_ipc, to_ipc

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: ``cls(**kwargs, worker=...)`` builds it; each instance maps a table to a table.

    ``batch_size`` caps the rows of one call of the instance: a longer input is cut into
    consecutive slices (deterministically) and their outputs concatenated. None: no cap.
    """

    name: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    resources: StagePlan = field(default_factory=lambda: StagePlan(num_actors=1, num_gpus=0.0, num_cpus=1.0))
    batch_size: int | None = None


def call_stage(instance: Any, table: pa.Table, *, batch_size: int | None, name: str) -> pa.Table:
    """``instance(table)``, in consecutive calls of at most ``batch_size`` rows; checks rows are kept."""
    if batch_size is None or table.num_rows <= batch_size:
        output = instance(table)
    else:
        parts = [instance(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)]
        output = pa.concat_tables(parts)
    if output.num_rows != table.num_rows:
        raise RuntimeError(f"stage {name} returned {output.num_rows} rows for {table.num_rows}; it must keep rows")
    return output


def split_rows(table: pa.Table, sizes: Sequence[int]) -> list[pa.Table]:
    """``table`` cut into consecutive pieces of ``sizes`` rows (which must add up to its rows)."""
    assert sum(sizes) == table.num_rows, (sizes, table.num_rows)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(table.slice(start, size))
        start += size
    return pieces


def _check_split(stages: Sequence[StageSpec], split_after: int) -> None:
    if not stages:
        raise ValueError("at least one stage is needed")
    if not 0 <= split_after < len(stages):
        raise ValueError(f"split_after must name one of the {len(stages)} stages, got {split_after}")


def run_local(
    stages: Sequence[StageSpec], groups: Iterable[Sequence[pa.Table]], *, split_after: int = 0
) -> Iterator[pa.Table]:
    """In-process: one instance per stage; each group goes through the chain, batches yielded in order."""
    _check_split(stages, split_after)
    chain = [(spec, spec.cls(**spec.kwargs, worker="local")) for spec in stages]
    for group in groups:
        table = pa.concat_tables(group)
        for spec, instance in chain[: split_after + 1]:
            table = call_stage(instance, table, batch_size=spec.batch_size, name=spec.name)
        for piece in split_rows(table, [batch.num_rows for batch in group]):
            for spec, instance in chain[split_after + 1 :]:
                piece = call_stage(instance, piece, batch_size=spec.batch_size, name=spec.name)
            yield piece


def ray_worker_tag() -> str:
    """``gpus=<ray gpu ids> cuda=<CUDA_VISIBLE_DEVICES>`` of the current Ray worker."""
    import ray

    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    return f"gpus={gpu_ids or '-'} cuda={os.environ.get('CUDA_VISIBLE_DEVICES') or '-'}"


class StageWorker:
    """Body of one Ray actor: builds the stage once, then maps Arrow IPC payloads through it."""

    def __init__(self, *, cls: type, kwargs: dict[str, Any], name: str, batch_size: int | None) -> None:
        self.name = name
        self.batch_size = batch_size
        self.instance = cls(**kwargs, worker=ray_worker_tag())

    def ready(self) -> str:
        """Answers once the constructor (model loading) is done."""
        return self.name

    def run(self, payload: bytes, sizes: list[int]) -> tuple[Any, ...]:
        """Map one payload; return one payload per entry of ``sizes`` plus a small info dict, last."""
        started = time.perf_counter()
        table = call_stage(self.instance, from_ipc(payload), batch_size=self.batch_size, name=self.name)
        pieces = [to_ipc(piece) for piece in split_rows(table, sizes)]
        return (*pieces, {"rows": table.num_rows, "seconds": time.perf_counter() - started})


def connect_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; returns True when this call started Ray.

    ``address`` (or RAY_ADDRESS) joins a running cluster; otherwise a local Ray starts.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    return True


@dataclass(eq=False, kw_only=True)
class _Actor:
    stage: int
    handle: Any
    ready: bool = False
    inflight: int = 0
    failures: int = 0


@dataclass(eq=False, kw_only=True)
class _Group:
    batches: Sequence[pa.Table]
    wanted: set[int]  # positions whose split output is still needed (all, unless re-run after a failure)
    queued: bool = False  # waiting for, or running in, a group-level call
    stage: int = 0  # the next group-level stage
    data: Any = None  # ObjectRef of the previous group-level stage's output
    failures: int = 0


@dataclass(eq=False, kw_only=True)
class _Item:
    group: _Group
    position: int
    data: Any = None  # ObjectRef of the previous stage's output


@dataclass(eq=False, kw_only=True)
class _Call:
    actor: _Actor
    outputs: list[Any]
    group: _Group | None = None  # a group-level call (stages up to split_after)
    item: _Item | None = None  # a batch-level call


class RayStagePipeline:
    """Ray Core actors per stage, with first-stage outputs passed by reference straight to later stages.

    The driver only moves ObjectRefs and reads small info dicts and the last stage's output; data
    between stages stays in the object store. Scheduling, per stage:
    - an actor gets work only once it has answered ``ready`` (its model is loaded), and holds at
      most ``calls_per_actor`` calls (one running, the next already waiting: no idle round trip);
    - a call is submitted only when its input exists, to the least busy actor, so no actor queues
      behind an input that another actor could take instead; work further along goes first;
    - new groups enter only while fewer than ``max_buffered`` batches are in the system (bounded
      memory; groups are pulled lazily from the iterator).
    Failures: an exception raised by a stage is a bug and is raised at once. Infrastructure failures
    (an actor or node died, an object was lost) re-run the affected work from the first stage, with
    the same composition, up to ``max_attempts`` times per batch; outputs are written idempotently by
    the stages, so at-least-once execution never duplicates results. Results are yielded as soon as
    each batch leaves the last stage.
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        *,
        calls_per_actor: int = 2,
        max_buffered: int | None = None,
        max_attempts: int = 3,
        split_after: int = 0,
        wait_for_actors: bool = False,
        timeline: dict[str, Any] | None = None,
        stall_warning_s: float = 120.0,
    ) -> None:
        import ray

        _check_split(stages, split_after)
        self.stall_warning_s = stall_warning_s
        self.stages = list(stages)
        self.split_after = split_after
        self.calls_per_actor = calls_per_actor
        later = sum(spec.resources.num_actors for spec in self.stages[split_after + 1 :])
        later = later or self.stages[split_after].resources.num_actors
        self.max_buffered = max_buffered or 2 * calls_per_actor * later
        self.max_attempts = max_attempts
        self.wait_for_actors = wait_for_actors
        self.timeline = timeline if timeline is not None else {}
        self.timeline.update(started=time.monotonic(), busy_seconds=[0.0] * len(stages), calls=[0] * len(stages))
        self.pools: list[list[_Actor]] = []
        self.calls: dict[Any, _Call | _Actor] = {}  # info ref of a call, or ready ref of an actor
        for number, spec in enumerate(self.stages):
            # A subclass per stage so Ray (dashboard, state API, logs) names actors after their stage.
            remote = ray.remote(type(f"{spec.name.title()}Stage", (StageWorker,), {}))
            pool = []
            for _ in range(spec.resources.num_actors):
                handle = remote.options(
                    **ray_remote_args(spec.resources),  # num_gpus, num_cpus, accelerator type, node labels
                    max_restarts=-1,  # a dead actor comes back (model reloaded) ...
                    max_task_retries=0,  # ... and the driver re-runs its work, from the first stage
                ).remote(cls=spec.cls, kwargs=spec.kwargs, name=spec.name, batch_size=spec.batch_size)
                actor = _Actor(stage=number, handle=handle)
                self._probe(actor)
                pool.append(actor)
            self.pools.append(pool)
        self.retry_groups: collections.deque[_Group] = collections.deque()
        # Per stage, work whose input exists: groups for stages 1..split_after, batches after that.
        self.ready: list[collections.deque[Any]] = [collections.deque() for _ in self.stages]
        self.num_buffered = 0
        self.num_failures = 0

    def run(self, groups: Iterable[Sequence[pa.Table]]) -> Iterator[pa.Table]:
        """Yield the last stage's output for every batch of every group, in order of completion."""
        import ray

        pending = iter(groups)
        exhausted = False
        while True:
            if not exhausted:
                exhausted = self._dispatch(pending)
            else:
                self._dispatch(iter(()))
            if not self.calls:
                if exhausted and not self.retry_groups and not any(self.ready) and self.num_buffered == 0:
                    return
                raise RuntimeError("runner stalled: work is left but no actor is working on it")  # pragma: no cover
            refs = list(self.calls)
            done, _ = ray.wait(refs, num_returns=1, timeout=self.stall_warning_s, fetch_local=False)
            if not done:
                self._warn_stalled()
                continue
            more, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in dict.fromkeys(done + more):
                yield from self._complete(ref)

    def close(self) -> None:
        """Kill every actor (frees their GPUs for the next job in this Ray session)."""
        import ray

        for pool in self.pools:
            for actor in pool:
                ray.kill(actor.handle)
        self.pools = []
        self.calls = {}

    def _warn_stalled(self) -> None:
        waited = time.monotonic() - self.timeline["started"]
        for spec, pool in zip(self.stages, self.pools):
            if not any(actor.ready for actor in pool):
                logger.warning(
                    "stage %s: no actor is up after %.0f s (each asks for %g CPU, %g GPU): still loading its "
                    "model, or the cluster lacks the resources",
                    spec.name,
                    waited,
                    spec.resources.num_cpus,
                    spec.resources.num_gpus,
                )

    def _free_actor(self, stage: int) -> _Actor | None:
        candidates = [a for a in self.pools[stage] if a.ready and a.inflight < self.calls_per_actor]
        return min(candidates, key=lambda a: a.inflight) if candidates else None

    def _all_ready(self) -> bool:
        return all(actor.ready for pool in self.pools for actor in pool)

    def _dispatch(self, pending: Iterator[Sequence[pa.Table]]) -> bool:
        """Submit every call that has an input and a free actor; returns True once ``pending`` is used up."""
        if self.wait_for_actors and not self._all_ready():
            return False
        for stage in reversed(range(1, len(self.stages))):  # drain work already in the system first
            while self.ready[stage]:
                actor = self._free_actor(stage)
                if actor is None:
                    break
                work = self.ready[stage].popleft()
                if isinstance(work, _Group):
                    self._submit_group(work, actor)
                else:
                    self._submit_item(work, actor)
        while True:
            actor = self._free_actor(0)
            if actor is None:
                return False
            if self.retry_groups:
                group = self.retry_groups.popleft()
            else:
                if self.num_buffered >= self.max_buffered:
                    return False
                batches = next(pending, None)
                if batches is None:
                    return True
                group = _Group(batches=batches, wanted=set(range(len(batches))), queued=True)
                self.num_buffered += len(batches)
            self._submit_group(group, actor)

    def _submit_group(self, group: _Group, actor: _Actor) -> None:
        stage = group.stage
        payload = to_ipc(pa.concat_tables(group.batches)) if stage == 0 else group.data
        rows = [table.num_rows for table in group.batches]
        sizes = rows if stage == self.split_after else [sum(rows)]
        refs = actor.handle.run.options(num_returns=len(sizes) + 1).remote(payload, sizes)
        self._track(_Call(actor=actor, outputs=refs[:-1], group=group), refs[-1])

    def _submit_item(self, item: _Item, actor: _Actor) -> None:
        size = item.group.batches[item.position].num_rows
        data, info = actor.handle.run.options(num_returns=2).remote(item.data, [size])
        self._track(_Call(actor=actor, outputs=[data], item=item), info)

    def _track(self, call: _Call, info: Any) -> None:
        call.actor.inflight += 1
        self.timeline.setdefault("first_dispatch", time.monotonic())
        self.calls[info] = call

    def _complete(self, ref: Any) -> Iterator[pa.Table]:
        import ray

        call = self.calls.pop(ref)
        if isinstance(call, _Actor):
            self._actor_ready(call, ref)
            return
        call.actor.inflight -= 1
        stage = call.actor.stage
        try:
            info = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # the stage itself raised: a bug, not bad luck; never retried
        except ray.exceptions.RayError as exc:
            self._failed(call, exc)
            return
        self.timeline["busy_seconds"][stage] += info["seconds"]
        self.timeline["calls"][stage] += 1
        last = stage == len(self.stages) - 1
        group = call.group
        if group is not None and stage < self.split_after:
            group.stage, group.data = stage + 1, call.outputs[0]
            self.ready[stage + 1].append(group)
            return
        if group is not None:  # the split: one item per batch still wanted
            items = [_Item(group=group, position=p, data=d) for p, d in enumerate(call.outputs) if p in group.wanted]
            group.wanted.clear()
            group.queued, group.stage, group.data = False, 0, None
        else:
            call.item.data = call.outputs[0]
            items = [call.item]
        for item in items:
            if last:
                yield from self._finish(item)
            else:
                self.ready[stage + 1].append(item)

    def _finish(self, item: _Item) -> Iterator[pa.Table]:
        import ray

        table = from_ipc(ray.get(item.data))
        self.num_buffered -= 1
        self.timeline.setdefault("first_result", time.monotonic())
        yield table

    def _probe(self, actor: _Actor) -> None:
        """Ask ``actor`` to answer once it is up; retried across restarts, so a crash loop ends in an error."""
        self.calls[actor.handle.ready.options(max_task_retries=self.max_attempts).remote()] = actor

    def _actor_ready(self, actor: _Actor, ref: Any) -> None:
        import ray

        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            pool = self.pools[actor.stage]
            pool.remove(actor)
            ray.kill(actor.handle)
            logger.warning("stage %s: an actor failed to start: %s", self.stages[actor.stage].name, exc)
            if not pool:
                raise RuntimeError(f"stage {self.stages[actor.stage].name}: no actor could start: {exc}") from exc
            return
        actor.ready = True
        if self._all_ready():
            self.timeline.setdefault("actors_ready", time.monotonic())

    def _failed(self, call: _Call, exc: Exception) -> None:
        """Infrastructure failure of one call: re-run its work from the first stage, a bounded number of times."""
        import ray

        self.num_failures += 1
        call.actor.failures += 1
        name = self.stages[call.actor.stage].name
        if isinstance(exc, ray.exceptions.RayActorError) and call.actor.ready:
            # The actor died or is restarting: give it no work until it answers again.
            call.actor.ready = False
            self._probe(call.actor)
        if call.group is not None:
            group, positions = call.group, set(call.group.wanted)
        else:
            group, positions = call.item.group, {call.item.position}
        group.failures += 1
        if group.failures >= self.max_attempts:
            raise RuntimeError(f"stage {name}: a batch failed {group.failures} times, last: {exc}") from exc
        logger.warning(
            "stage %s: call failed (%s); re-running %d batch(es) from the first stage", name, exc, len(positions)
        )
        group.wanted.update(positions)
        if call.group is not None or not group.queued:  # a group already on its way re-runs once, for all
            group.queued, group.stage, group.data = True, 0, None
            self.retry_groups.append(group)


def run_ray(
    stages: Sequence[StageSpec],
    groups: Iterable[Sequence[pa.Table]],
    *,
    split_after: int = 0,
    wait_for_actors: bool = False,
    timeline: dict[str, Any] | None = None,
) -> Iterator[pa.Table]:
    """Ray Core actor pools per stage (`RayStagePipeline`); Ray must be connected (`connect_ray`).

    ``timeline`` (optional) receives monotonic timestamps (``started``, ``actors_ready``,
    ``first_dispatch``, ``first_result``) and per-stage ``busy_seconds`` and ``calls``.
    ``wait_for_actors`` holds all work until every actor has loaded its model (benchmarks).
    """
    pipeline = RayStagePipeline(stages, split_after=split_after, wait_for_actors=wait_for_actors, timeline=timeline)
    try:
        yield from pipeline.run(groups)
    finally:
        pipeline.close()
