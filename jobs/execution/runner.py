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
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from jobs.execution.capacity import ask_for_capacity, withdraw_capacity
from jobs.execution.completions import Completions
from jobs.execution.contract import Event, SinkSpec, StageSpec, Task, check_split
from jobs.execution.pool import Actor, Pool, keep_actors, release_kept
from jobs.execution.scaling import ActorPools, Elasticity
from jobs.execution.watchdog import Deadlines, Watchdog
from jobs.execution.work_state import Call, Group, Item, RunnerMeasures, TaskState
from jobs.planning.machine import ray_nodes
from schemas.loggers import logger_for
from schemas.work import to_ipc

logger = logger_for(__name__)
__all__ = ["Deadlines", "RayStagePipeline", "RunnerMeasures", "run_ray"]


class RayStagePipeline(Completions):
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
        elasticity: Elasticity | None = None,
        keep_actors: bool = False,
    ) -> None:
        check_split(stages, split_after)
        self.keep_actors = keep_actors
        self.stages, self.sink = list(stages), sink
        self.specs = [*self.stages, sink]
        self.split_after = split_after
        self.calls_per_actor = calls_per_actor
        self.measures = measures or RunnerMeasures(names=[spec.name for spec in self.specs])
        self.pools = ActorPools(
            self.stages, sink, probe=self._probe, elasticity=elasticity, started=self.measures.started
        )
        # Work is buffered for the actors after the split (their pools may grow: the bound follows them).
        self._later = {self.pools.stage_pool[s] for s in range(split_after, len(self.stages))}
        self._max_buffered = max_buffered
        self._max_tasks = max_tasks
        self.max_attempts = max_attempts
        self.wait_for_actors = wait_for_actors
        self.watchdog = Watchdog(
            self.specs, deadlines or Deadlines(), started=self.measures.started, stall_warning_s=stall_warning_s
        )
        self.calls: dict[Any, Call] = {}
        # Actors kept by an earlier run that this run's pools cannot use would hold GPUs and CPUs it needs.
        release_kept(keep={pool.key for pool in self.pools.model_pools})
        self._start_pool(self.pools.sink)  # model stages start with the first task that has batches
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
            demand = self._demand()
            self.pools.scale(demand=demand, nodes=ray_nodes, kill=self._retire)
            self.watchdog.check(self.pools, probe=self._probe, demand=demand)
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

    @property
    def max_buffered(self) -> int:
        """Batches in the system at most: two calls per actor after the split (at least one actor's worth)."""
        if self._max_buffered:
            return self._max_buffered
        actors = sum(max(len(self.pools[p].actors), self.pools[p].resources.num_actors, 1) for p in self._later)
        return 2 * self.calls_per_actor * actors

    @property
    def max_tasks(self) -> int:
        """Tasks (shards) open at most: the one given, else 2 per sink actor and at least as many as it takes to fill
        the batch buffer (so small shards still feed every actor a grown pool has)."""
        if self._max_tasks:
            return self._max_tasks
        return max(2 * max(len(self.pools.sink.actors), self.sink.resources.num_actors), self.max_buffered)

    def _demand(self) -> dict[int, int]:
        """Pool index -> calls waiting for its actors."""
        demand: dict[int, int] = {}
        for stage, queue in enumerate(self.ready):
            if queue:
                pool = self.pools.stage_pool[stage]
                demand[pool] = demand.get(pool, 0) + len(queue)
        return demand

    def _start_pool(self, pool: Pool) -> None:
        self.watchdog.started_pool(pool.index)
        self.pools.start(pool, nodes=ray_nodes())

    def _retire(self, actor: Actor) -> None:
        import ray

        ray.kill(actor.handle, no_restart=True)

    def close(self) -> None:
        """Kill every actor (frees their GPUs for the next job in this Ray session), or with ``keep_actors`` keep the
        model actors that are up for the next run in this process (`jobs.execution.pool.keep_actors`), and withdraw
        capacity asks. After Ray is shut down (a signal ended the run first) there is nothing left to kill, and any
        Ray call would start a new local Ray (Ray's auto-init) only to fail."""
        import ray

        if not ray.is_initialized():
            self.measures.pools = self.pools.stats()
            self.calls = {}
            return
        if self.keep_actors:
            kept = keep_actors(list(self.pools))
            logger.info("kept %d model actor(s) for the next run in this process", kept)
        else:
            for pool in self.pools:
                for actor in pool.actors:
                    ray.kill(actor.handle)
        self.measures.pools = self.pools.stats()
        withdraw_capacity(self.pools)
        self.calls = {}

    # ------------------------------------------------------------------ tasks

    def _open_tasks(self, pending: Iterator[Task], exhausted: bool) -> bool:
        """Start tasks while there is room; returns True once ``pending`` is used up."""
        while len(self.open) < self.max_tasks and not self.ready[0] and self.num_buffered < self.max_buffered:
            if self.wait_for_actors and self.pools[0].started and not self.pools.all_ready():
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
        if state.task.num_batches and not self.pools[0].started:
            for pool in self.pools.model_pools:
                self._start_pool(pool)
            ask_for_capacity(self.pools)
        state.sink, state.remaining, state.finalizing = sink, state.task.num_batches, False
        sink.open_tasks += 1
        self.open.append(state)
        for batches in state.task.groups:
            group = Group(task=state, attempt=state.attempt, batches=batches, wanted=set(range(len(batches))))
            self.ready[0].append(group)
        if state.remaining == 0:
            self._finalize(state)

    def _free_sink(self) -> Actor | None:
        candidates = [a for a in self.pools.sink.actors if a.ready]
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
        call = Call(
            actor=state.sink,
            kind="finalize",
            stage=len(self.stages),
            outputs=[ref[0]],
            task=state,
            attempt=state.attempt,
        )
        self._track(call, ref[1])

    # ------------------------------------------------------------------ dispatch

    def _free_actor(self, stage: int) -> Actor | None:
        return self.pools.free_actor(stage, self.calls_per_actor)

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
                    self._submit_item(work, actor, stage)

    def _submit_group(self, group: Group, actor: Actor) -> None:
        if group.stage == 0:
            group.queued = True
            self.num_buffered += len(group.wanted)
            payload = to_ipc(pa.concat_tables(group.batches))
        else:
            payload = group.data
        rows = [table.num_rows for table in group.batches]
        sizes = rows if group.stage == self.split_after else [sum(rows)]
        name = self.stages[group.stage].name
        refs = actor.handle.run.options(num_returns=len(sizes) + 1).remote(name, payload, sizes)
        call = Call(actor=actor, kind="group", stage=group.stage, outputs=refs[:-1], group=group, attempt=group.attempt)
        call.num_batches = len(group.wanted)
        self._track(call, refs[-1])

    def _submit_item(self, item: Item, actor: Actor, stage: int) -> None:
        size = item.group.batches[item.position].num_rows
        data, info = actor.handle.run.options(num_returns=2).remote(self.stages[stage].name, item.data, [size])
        call = Call(actor=actor, kind="item", stage=stage, outputs=[data], item=item, attempt=item.group.attempt)
        self._track(call, info)

    def _submit_add(self, item: Item) -> None:
        state = item.group.task
        info = state.sink.handle.add.remote(state.task.tag, item.data)
        call = Call(
            actor=state.sink, kind="add", stage=len(self.stages), item=item, task=state, attempt=item.group.attempt
        )
        self._track(call, info)

    def _track(self, call: Call, info: Any) -> None:
        call.actor.inflight += 1
        call.actor.submitted.append((time.monotonic(), call.stage))
        self.measures.mark("first_dispatch")
        self.calls[info] = call

    def _probe(self, actor: Actor) -> None:
        actor.reprobe_at = None
        self.calls[actor.handle.ready.remote(reset=actor.kept)] = Call(actor=actor, kind="probe")


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
