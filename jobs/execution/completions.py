"""What the Ray runner does when a call finishes: pass its outputs on, count what reached the sink, publish a task,
mark actors up, and re-run the work of calls that failed for infrastructure reasons (`Completions`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from jobs.execution.contract import BatchDone, Event, TaskDone
from jobs.execution.pool import Actor, ray_result
from jobs.execution.work_state import Call, Item
from schemas.loggers import logger_for

logger = logger_for("jobs.execution.runner")  # its lines are the runner's


class Completions:
    """The completion half of `jobs.execution.runner.RayStagePipeline` (a mixin: it works on the pipeline's
    ``calls``, ``pools``, ``ready``, ``open`` tasks, ``measures`` and ``watchdog``)."""

    def _complete(self, ref: Any) -> Iterator[Event]:
        import ray

        call = self.calls.pop(ref)
        if call.kind in ("probe", "abandon"):  # an abandon is best effort: a dead sink held nothing
            value, error = ray_result(ref)
            if call.kind == "probe":
                self._probed(call.actor, value, error)
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
        self.measures.count_call(call.stage, seconds, info.get("rows", 0))
        self.watchdog.finished_call(call.stage, seconds)
        if call.kind == "add":
            yield from self._added(call, info)
        elif call.kind == "finalize":
            yield from self._finalized(call)
        else:
            self._advance(call)

    def _advance(self, call: Call) -> None:
        """A model call finished: pass its outputs on (or to the sink after the last model stage)."""
        stage = call.stage
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

    def _probed(self, actor: Actor, value: Any, error: BaseException | None) -> None:
        pool = self.pools[actor.pool]
        was_ready = actor.ready
        self.pools.answered(actor, value, error)
        if actor.ready and not was_ready:
            self.measures.came_up()
        if actor.ready:
            for stage in pool.stages:
                self.measures.mark(f"{self.specs[stage].name}_ready")
        if actor.ready and self.pools.all_ready():
            self.measures.mark("actors_ready")

    def _failed(self, call: Call, exc: Exception) -> None:
        """Infrastructure failure of one call: re-run its work, a bounded number of times."""
        import ray

        self.num_failures += 1
        actor = call.actor
        actor.failures += 1
        name = self.specs[call.stage].name
        if isinstance(exc, ray.exceptions.RayActorError) and actor.ready:
            self.pools.lost(actor)  # dead or restarting: no work until it answers again
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
