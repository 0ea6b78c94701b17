"""The Ray runner: Ray Core actors per stage and a sink pool, outputs passed by reference from stage to stage.

The driver only moves ObjectRefs and reads small info dicts; data between stages, and from the last
model stage to the sink, stays in the object store. Scheduling, per stage:
- an actor gets work only once it has answered its readiness probe (`jobs.execution.pool`), and
  holds at most ``calls_per_actor`` calls (one running, the next already waiting);
- a call is submitted only when its input exists, to the least busy actor; work further along goes
  first; tasks (shards) open lazily, at most ``max_tasks`` at a time, each pinned to one sink actor;
- batches enter only while fewer than ``max_buffered`` are in the system (bounded memory).
Failures: an exception raised by a stage or the sink is a bug (or storage that stays down) and is
raised at once. Infrastructure failures re-run work, a bounded ``max_attempts`` times:
- a model call whose actor died, hung past its deadline, or whose input object was lost re-runs its
  batches from the first stage, with the same composition (outputs are idempotent);
- a sink actor that died takes its open tasks with it: each re-runs whole, on a sink that is up (the
  old sink is told to drop what it held of them, in case it was only unreachable).
Call deadlines (a hung actor is killed: its calls fail as above) and stage waits: `jobs.execution.watchdog`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from jobs.execution.contract import BatchDone, Event, SinkSpec, StageSpec, Task, TaskDone, check_split
from jobs.execution.pool import Actor, ray_error, record_probe, start_actor
from jobs.execution.watchdog import Deadlines, Watchdog
from jobs.execution.work_state import Call, Group, Item, RunnerMeasures, TaskState
from schemas.work import to_ipc

logger = logging.getLogger(__name__)
__all__ = ["Deadlines", "RayStagePipeline", "RunnerMeasures", "run_ray"]


class RayStagePipeline:
    """Ray Core actor pools for ``stages`` plus a ``sink`` pool; see the module docstring."""

    def __init__(
        self,
        stages: Sequence[StageSpec],
        sink: SinkSpec,
        *,
        split_after: int = 0,
        calls_per_actor: int = 2,
        max_buffered: int | None = None,
        max_tasks: int | None = None,
        max_attempts: int = 3,
        deadlines: Deadlines | None = None,
        wait_for_actors: bool = False,
        measures: RunnerMeasures | None = None,
        stall_warning_s: float = 120.0,
    ) -> None:
        check_split(stages, split_after)
        self.stages, self.sink = list(stages), sink
        self.specs = [*self.stages, sink]
        self.split_after = split_after
        self.calls_per_actor = calls_per_actor
        later = sum(spec.resources.num_actors for spec in self.stages[split_after + 1 :])
        later = later or self.stages[split_after].resources.num_actors
        self.max_buffered = max_buffered or 2 * calls_per_actor * later
        self.max_tasks = max_tasks or 2 * sink.resources.num_actors
        self.max_attempts = max_attempts
        self.wait_for_actors = wait_for_actors
        self.measures = measures or RunnerMeasures(names=[spec.name for spec in self.specs])
        self.watchdog = Watchdog(
            self.specs, deadlines or Deadlines(), started=self.measures.started, stall_warning_s=stall_warning_s
        )
        self.calls: dict[Any, Call] = {}
        self.pools: list[list[Actor]] = [[] for _ in self.specs]
        self._start_pool(len(self.stages))  # the sink; model stages start with the first task that has batches
        self.ready: list[collections.deque[Any]] = [collections.deque() for _ in self.stages]
        self.reopen: collections.deque[TaskState] = collections.deque()  # tasks to (re)start, first
        self.open: list[TaskState] = []
        self.num_buffered = 0
        self.num_failures = 0

    # ------------------------------------------------------------------ main loop

    def run(self, tasks: Iterable[Task]) -> Iterator[Event]:
        """Yield a `BatchDone` per batch and a `TaskDone` per task, in order of completion."""
        import ray

        pending = iter(tasks)
        exhausted = False
        while True:
            exhausted = self._open_tasks(pending, exhausted)
            self._dispatch()
            if exhausted and not self.open and not self.reopen:
                return
            self.watchdog.check(self.pools, probe=self._probe)
            self.measures.tick(self)  # status, phase lines and metrics (jobs.execution.watch)
            refs = list(self.calls)
            if not refs:
                time.sleep(0.05)  # only re-probes are due: nothing to wait on yet
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=1.0, fetch_local=False)
            if done:
                more, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                for ref in dict.fromkeys(done + more):
                    yield from self._complete(ref)

    def _start_pool(self, number: int) -> None:
        spec = self.specs[number]
        self.pools[number] = [
            start_actor(spec, stage=number, sink=spec is self.sink) for _ in range(spec.resources.num_actors)
        ]
        self.watchdog.started_pool(number)
        for actor in self.pools[number]:
            self._probe(actor)

    def close(self) -> None:
        """Kill every actor (frees their GPUs for the next job in this Ray session)."""
        import ray

        for pool in self.pools:
            for actor in pool:
                ray.kill(actor.handle)
        self.pools, self.calls = [], {}

    # ------------------------------------------------------------------ tasks

    def _open_tasks(self, pending: Iterator[Task], exhausted: bool) -> bool:
        """Start tasks while there is room; returns True once ``pending`` is used up."""
        while len(self.open) < self.max_tasks and not self.ready[0] and self.num_buffered < self.max_buffered:
            if self.wait_for_actors and self.pools[0] and not all(a.ready for pool in self.pools for a in pool):
                return exhausted
            sink = self._free_sink()
            if sink is None:
                return exhausted
            if self.reopen:
                state = self.reopen.popleft()
            elif exhausted:
                return True
            else:
                task = next(pending, None)
                if task is None:
                    return True
                state = TaskState(task=task)
            self._start(state, sink)
        return exhausted

    def _start(self, state: TaskState, sink: Actor) -> None:
        if state.task.num_batches and not self.pools[0]:
            for number in range(len(self.stages)):
                self._start_pool(number)
        state.sink, state.remaining, state.finalizing = sink, state.task.num_batches, False
        sink.open_tasks += 1
        self.open.append(state)
        for batches in state.task.groups:
            group = Group(task=state, attempt=state.attempt, batches=batches, wanted=set(range(len(batches))))
            self.ready[0].append(group)
        if state.remaining == 0:
            self._finalize(state)

    def _free_sink(self) -> Actor | None:
        candidates = [a for a in self.pools[-1] if a.ready]
        return min(candidates, key=lambda a: a.open_tasks) if candidates else None

    def _restart_task(self, state: TaskState, reason: BaseException) -> None:
        """A task's sink died (or its finalize failed): run the whole task again, on a sink that is up."""
        if state not in self.open:
            return
        self.open.remove(state)
        if state.sink is not None:
            state.sink.open_tasks -= 1
            # An unreachable sink may still be alive, holding the task's batches: it drops them before any
            # batch of the new attempt could reach it (calls to one actor run in submission order).
            ref = state.sink.handle.abandon.remote(state.task.tag)
            self.calls[ref] = Call(actor=state.sink, kind="abandon")
        state.attempt += 1
        if state.attempt >= self.max_attempts:
            raise RuntimeError(f"task {state.task.tag} failed {state.attempt} times, last: {reason}") from reason
        logger.warning("task %s: its sink failed (%s); running it again", state.task.tag, reason)
        self.reopen.append(state)

    def _finalize(self, state: TaskState) -> None:
        state.finalizing = True
        ref = state.sink.handle.finalize.options(num_returns=2).remote(state.task.tag, state.task.args)
        self._track(
            Call(actor=state.sink, kind="finalize", outputs=[ref[0]], task=state, attempt=state.attempt), ref[1]
        )

    # ------------------------------------------------------------------ dispatch

    def _free_actor(self, stage: int) -> Actor | None:
        candidates = [a for a in self.pools[stage] if a.ready and a.inflight < self.calls_per_actor]
        return min(candidates, key=lambda a: a.inflight) if candidates else None

    def _dispatch(self) -> None:
        """Submit every model call that has an input and a free actor (later stages first)."""
        for stage in reversed(range(len(self.stages))):
            while self.ready[stage]:
                work = self.ready[stage][0]
                group = work if isinstance(work, Group) else work.group
                if group.attempt != group.task.attempt:  # its task restarted: this copy is stale
                    self.ready[stage].popleft()
                    if isinstance(work, Item):
                        self.num_buffered -= 1
                    elif stage > 0:
                        self.num_buffered -= len(work.wanted)
                    continue
                if stage == 0 and self.num_buffered >= self.max_buffered:
                    break
                actor = self._free_actor(stage)
                if actor is None:
                    break
                self.ready[stage].popleft()
                if isinstance(work, Group):
                    self._submit_group(work, actor)
                else:
                    self._submit_item(work, actor)

    def _submit_group(self, group: Group, actor: Actor) -> None:
        if group.stage == 0:
            group.queued = True
            self.num_buffered += len(group.wanted)
            payload = to_ipc(pa.concat_tables(group.batches))
        else:
            payload = group.data
        rows = [table.num_rows for table in group.batches]
        sizes = rows if group.stage == self.split_after else [sum(rows)]
        refs = actor.handle.run.options(num_returns=len(sizes) + 1).remote(payload, sizes)
        call = Call(actor=actor, kind="group", outputs=refs[:-1], group=group, attempt=group.attempt)
        call.num_batches = len(group.wanted)
        self._track(call, refs[-1])

    def _submit_item(self, item: Item, actor: Actor) -> None:
        size = item.group.batches[item.position].num_rows
        data, info = actor.handle.run.options(num_returns=2).remote(item.data, [size])
        self._track(Call(actor=actor, kind="item", outputs=[data], item=item, attempt=item.group.attempt), info)

    def _submit_add(self, item: Item) -> None:
        state = item.group.task
        info = state.sink.handle.add.remote(state.task.tag, item.data)
        self._track(Call(actor=state.sink, kind="add", item=item, task=state, attempt=item.group.attempt), info)

    def _track(self, call: Call, info: Any) -> None:
        call.actor.inflight += 1
        call.actor.submitted.append(time.monotonic())
        self.measures.mark("first_dispatch")
        self.calls[info] = call

    def _probe(self, actor: Actor) -> None:
        actor.reprobe_at = None
        self.calls[actor.handle.ready.remote()] = Call(actor=actor, kind="probe")

    # ------------------------------------------------------------------ completions

    def _complete(self, ref: Any) -> Iterator[Event]:
        import ray

        call = self.calls.pop(ref)
        if call.kind in ("probe", "abandon"):  # an abandon is best effort: a dead sink held nothing
            error = ray_error(ref)
            if call.kind == "probe":
                self._probed(call.actor, error)
            return
        actor = call.actor
        actor.inflight -= 1
        if actor.submitted:
            actor.submitted.popleft()
        actor.last_done = time.monotonic()
        try:
            info = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise  # the stage or sink itself raised: a bug, or storage that stays down; never retried
        except ray.exceptions.RayError as exc:
            self._failed(call, exc)
            return
        seconds = info["seconds"]
        self.measures.count_call(actor.stage, seconds, info.get("rows", 0))
        self.watchdog.finished_call(actor.stage, seconds)
        if call.kind == "add":
            yield from self._added(call, info)
        elif call.kind == "finalize":
            yield from self._finalized(call)
        else:
            self._advance(call)

    def _advance(self, call: Call) -> None:
        """A model call finished: pass its outputs on (or to the sink after the last model stage)."""
        stage = call.actor.stage
        group = call.group if call.group is not None else call.item.group
        if group.attempt != group.task.attempt:
            self.num_buffered -= call.num_batches if call.group is not None else 1
            return
        last = stage == len(self.stages) - 1
        if call.group is not None and stage < self.split_after:
            group.stage, group.data = stage + 1, call.outputs[0]
            self.ready[stage + 1].append(group)
            return
        if call.group is not None:  # the split: one item per batch still wanted
            items = [Item(group=group, position=p, data=d) for p, d in enumerate(call.outputs) if p in group.wanted]
            group.wanted.clear()
            group.queued, group.stage, group.data = False, 0, None
        else:
            call.item.data = call.outputs[0]
            items = [call.item]
        for item in items:
            if last:
                self._submit_add(item)
            else:
                self.ready[stage + 1].append(item)

    def _added(self, call: Call, info: dict[str, Any]) -> Iterator[Event]:
        self.num_buffered -= 1
        state = call.task
        if call.attempt != state.attempt or state not in self.open:
            return
        self.measures.mark("first_result")
        state.remaining -= 1
        yield BatchDone(tag=state.task.tag, info=info)
        if state.remaining == 0:
            self._finalize(state)

    def _finalized(self, call: Call) -> Iterator[Event]:
        import ray

        state = call.task
        if call.attempt != state.attempt or state not in self.open:
            return
        self.open.remove(state)
        state.sink.open_tasks -= 1
        yield TaskDone(tag=state.task.tag, result=ray.get(call.outputs[0]))

    def _probed(self, actor: Actor, error: BaseException | None) -> None:
        record_probe(actor, self.pools[actor.stage], error, name=self.specs[actor.stage].name)
        if actor.ready:
            self.measures.mark(f"{self.specs[actor.stage].name}_ready")
        if actor.ready and all(pool and all(a.ready for a in pool) for pool in self.pools):
            self.measures.mark("actors_ready")

    def _failed(self, call: Call, exc: Exception) -> None:
        """Infrastructure failure of one call: re-run its work, a bounded number of times."""
        import ray

        self.num_failures += 1
        actor = call.actor
        actor.failures += 1
        name = self.specs[actor.stage].name
        if isinstance(exc, ray.exceptions.RayActorError) and actor.ready:
            actor.ready = False  # dead or restarting: no work until it answers again
            self._probe(actor)
        if call.kind in ("add", "finalize"):
            if isinstance(exc, ray.exceptions.RayActorError) or call.kind == "finalize":
                for state in [s for s in self.open if s.sink is actor] or [call.task]:
                    self._restart_task(state, exc)
                if call.kind == "add":
                    self.num_buffered -= 1
                return
            self.num_buffered -= 1  # the batch's input was lost: re-run its group below
            group, positions = call.item.group, {call.item.position}
        elif call.group is not None:
            group, positions = call.group, set(call.group.wanted)
            self.num_buffered -= call.num_batches
        else:
            group, positions = call.item.group, {call.item.position}
            self.num_buffered -= 1
        if group.attempt != group.task.attempt:
            return
        group.failures += 1
        if group.failures >= self.max_attempts:
            raise RuntimeError(f"stage {name}: a batch failed {group.failures} times, last: {exc}") from exc
        logger.warning(
            "stage %s: call failed (%s); re-running %d batch(es) from the first stage", name, exc, len(positions)
        )
        group.wanted.update(positions)
        if call.group is not None or not group.queued:  # a group already on its way re-runs once, for all
            group.queued, group.stage, group.data = False, 0, None
            self.ready[0].appendleft(group)


def run_ray(
    stages: Sequence[StageSpec],
    sink: SinkSpec,
    tasks: Iterable[Task],
    *,
    split_after: int = 0,
    wait_for_actors: bool = False,
    measures: RunnerMeasures | None = None,
    **options: Any,
) -> Iterator[Event]:
    """Ray Core actor pools per stage and for the sink (`RayStagePipeline`); Ray must be connected.

    ``measures`` (optional) receives monotonic moments (``<stage>_ready`` when a stage's first actor
    is up, ``actors_ready``, ``first_dispatch``, ``first_result``) and per-stage busy seconds and calls.
    ``wait_for_actors`` holds all work until every actor is up (benchmarks).
    """
    pipeline = RayStagePipeline(
        stages, sink, split_after=split_after, wait_for_actors=wait_for_actors, measures=measures, **options
    )
    try:
        yield from pipeline.run(tasks)
    finally:
        pipeline.close()
