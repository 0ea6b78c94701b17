"""What the Ray runner tells whoever watches it: phase lines, a one-line status, and the pools' metrics.

The runner's loop calls `PipelineWatch.observe` (through `RunnerMeasures.tick`) at most once a second
with itself; everything here is read from its state (pools, queues, calls), so the runner needs no
hook per event. A change of a pool's state becomes a phase line (a stage starting its actors, its
first actor up, every actor up, a stage still waiting for capacity with what it lacks); the status
line and the gauges (pool sizes, queue depths) are refreshed; actor failures and restarts, counted
by the runner on its actors, become counters. Pools that grow later (elastic pools) show up the same way.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from jobs.execution.metrics import MetricsRecorder
from jobs.execution.pool import describe_resources

CAPACITY_WAIT_S = 10.0  # a stage with no actor up for this long is said to wait for capacity
DESCRIBE_EVERY_S = 30.0  # what a waiting stage lacks is asked of Ray at most this often


class Watcher(Protocol):
    """Receives phase lines (something happened) and the current status (shown by periodic lines)."""

    def phase(self, text: str) -> None:
        """Something happened: say it now."""

    def status(self, text: str) -> None:
        """What is going on now (no line of its own)."""


class PipelineWatch:
    """Turns the runner's state into phase lines, a status line and metrics (see the module docstring)."""

    def __init__(self, watcher: Watcher | None, metrics: MetricsRecorder | None) -> None:
        self.watcher = watcher
        self.metrics = metrics
        self.started_at: dict[int, float] = {}  # pool -> when it started
        self.said: set[tuple[int, str]] = set()
        self.ready_actors: dict[int, bool] = {}  # id(actor) -> ready at the last look
        self.failures: dict[int, int] = {}  # id(actor) -> failures counted already
        self.lacks: dict[int, tuple[float, str]] = {}  # pool -> (when asked, what it lacks)

    def observe(self, pipeline: Any) -> None:
        """Look at ``pipeline`` (a `jobs.execution.runner.RayStagePipeline`) once: each of its actor pools (one
        per group of stages, the sink's last)."""
        now = time.monotonic()
        parts = []
        for pool in pipeline.pools:
            if not pool.actors:  # not started, or an elastic pool at zero
                continue
            number, name = pool.index, pool.name
            ready = sum(actor.ready for actor in pool.actors)
            self._transitions(pool, now=now)
            part = f"{name} {ready}/{len(pool.actors)} up"
            if not ready and now - self.started_at[number] > CAPACITY_WAIT_S:
                part += f" ({now - self.started_at[number]:.0f} s: {self._lacks(pool, now)})"
            parts.append(part)
            queued = 0 if pool.sink else sum(len(pipeline.ready[stage]) for stage in pool.stages)
            if self.metrics is not None:
                self.metrics.set("pool_actors", len(pool.actors), stage=name, state="total")
                self.metrics.set("pool_actors", ready, stage=name, state="ready")
                self.metrics.set("queue_depth", queued + sum(a.inflight for a in pool.actors), stage=name)
        if self.watcher is not None and parts:
            running = sum(1 for call in pipeline.calls.values() if call.kind not in ("probe", "abandon"))
            queued = sum(len(queue) for queue in pipeline.ready)
            self.watcher.status(f"{', '.join(parts)}; {running} call(s) running, {queued} waiting")

    def _transitions(self, pool: Any, *, now: float) -> None:
        """One phase line per stage coming up (when all its actors are), or, when none is up after
        `CAPACITY_WAIT_S`, one saying what it waits for; the status line shows the counts meanwhile."""
        number, name, actors = pool.index, pool.label, pool.actors
        self.started_at.setdefault(number, now)
        ready = [actor for actor in actors if actor.ready]
        waited = now - self.started_at[number]
        if len(ready) == len(actors):
            self._say(number, "up", f"stage {name}: {len(actors)} actor(s) up after {waited:.1f} s")
        elif waited > CAPACITY_WAIT_S:
            lacks = self._lacks(pool, now)
            up = f"{len(ready)} of {len(actors)} actor(s) up" if ready else "no actor up"
            self._say(number, "waiting", f"stage {name}: {up} after {CAPACITY_WAIT_S:.0f} s: {lacks}")
        for actor in actors:
            was = self.ready_actors.get(id(actor))
            if was and not actor.ready and self.metrics is not None:  # died or killed: Ray restarts it
                self.metrics.add("actor_restarts", stage=pool.name)
            self.ready_actors[id(actor)] = actor.ready
            new = actor.failures - self.failures.get(id(actor), 0)
            if new and self.metrics is not None:
                self.metrics.add("retries", new, stage=pool.name, kind="shard" if pool.sink else "call")
            self.failures[id(actor)] = actor.failures

    def _lacks(self, pool: Any, now: float) -> str:
        """How many of the pool's actors are placed on a node (loading) and, for the others, what one needs and
        what the cluster has free (asked of Ray at most every `DESCRIBE_EVERY_S`)."""
        asked = self.lacks.get(pool.index)
        if asked is None or now - asked[0] > DESCRIBE_EVERY_S:
            placed = _placed(pool.actors)
            if placed is not None and placed == len(pool.actors):
                text = f"{placed} actor(s) placed on a node, loading their model"
            else:
                text = f"{placed} placed and loading, the rest " if placed else ""
                text += f"waiting for capacity: {describe_resources(pool)}"
            asked = (now, text)
            self.lacks[pool.index] = asked
        return asked[1]

    def _say(self, number: int, what: str, text: str) -> None:
        if (number, what) not in self.said:
            self.said.add((number, what))
            if self.watcher is not None:
                self.watcher.phase(text)


def _placed(actors: list) -> int | None:
    """Of ``actors``, those that Ray placed in a worker process (their constructor runs); None when it cannot tell."""
    try:
        from ray._private import state  # the GCS actor table: also served without a dashboard

        return sum(1 for actor in actors if state.actors(actor.handle._actor_id.hex()).get("Pid"))
    except Exception:  # noqa: BLE001 - a private API: when it moves, say only what is known
        return None
