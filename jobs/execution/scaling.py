"""The runner's actor pools as a whole: starting them, their readiness probes, and elasticity.

Each pool (a group of stages, or the sink) starts its ``num_actors`` at once. An elastic pool
(``max_actors`` above that) grows by one actor at a time while work waits for it, no actor of it is
still coming up, and a live node that is not being drained can hold one more (or an autoscaler can
add such a node: the pending actor is its demand); it shrinks when an actor above ``num_actors``
stays idle for ``idle_timeout_s`` while nothing waits. An actor on a node being drained (Ray's
drain notice: idle termination, spot preemption) gets no new calls; once its calls are done it is
retired, and its pool may grow again elsewhere. An actor that dies with its node is restarted by
Ray wherever there is room (`jobs.execution.pool`); the pool counts it lost until it answers again.
Every change of a pool's size is kept (`history`) for stats.json, and logged once the pool has been whole (its
coming up is one phase line).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.nodes import NodeShape, fits, unplaceable
from cluster.resources import StageGroup
from jobs.execution.contract import SinkSpec, StageSpec, stage_groups
from jobs.execution.pool import Actor, Pool, record_probe
from schemas.loggers import logger_for

logger = logger_for("jobs.execution.runner")  # its lines are the runner's


@dataclass(frozen=True, kw_only=True)
class Elasticity:
    """How pools follow the cluster: how often nodes are read, when idle actors go, whether an autoscaler runs."""

    interval_s: float = 2.0
    idle_timeout_s: float = 60.0
    autoscaler: bool = False


@dataclass(kw_only=True)
class PoolRecord:
    """What stats.json says of one pool: its bounds, sizes over time and what changed them."""

    name: str
    min_actors: int
    max_actors: int
    history: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, actors up)
    whole: bool = False  # every actor of the pool has been up at once
    grown: int = 0
    shrunk: int = 0
    joined: int = 0  # actors that came up (again) after the pool's start
    lost: int = 0  # actors lost with their node or restarted
    drained: int = 0  # actors retired from nodes being drained

    def as_dict(self) -> dict[str, Any]:
        """The stats.json form."""
        sizes = [n for _, n in self.history] or [0]
        return {
            "min": self.min_actors,
            "max": self.max_actors,
            "peak": max(sizes),
            "end": sizes[-1],
            "grown": self.grown,
            "shrunk": self.shrunk,
            "joined": self.joined,
            "lost": self.lost,
            "drained": self.drained,
            "history": [[round(t, 2), n] for t, n in self.history],
        }


class ActorPools:
    """The pools of a runner: one per group of ``stages`` (in order), the ``sink``'s last.

    ``probe`` is the runner's way to send an actor its readiness probe (the answer comes back
    through the runner's wait loop and is handed to `answered`).
    """

    def __init__(
        self,
        stages: Sequence[StageSpec],
        sink: SinkSpec,
        *,
        probe: Callable[[Actor], None],
        elasticity: Elasticity | None = None,
        started: float | None = None,
    ) -> None:
        groups = stage_groups(stages)
        self.pools = [
            Pool(index=i, name=name, specs=[stages[s] for s in members], stages=tuple(members))
            for i, (name, members) in enumerate(groups.items())
        ]
        self.pools.append(Pool(index=len(self.pools), name=sink.name, specs=[sink], stages=(len(stages),)))
        self.stage_pool = [next(p.index for p in self.pools if s in p.stages) for s in range(len(stages) + 1)]
        self.probe = probe
        self.elasticity = elasticity or Elasticity()
        self.started = time.monotonic() if started is None else started
        self.records = [
            PoolRecord(
                name=pool.name,
                min_actors=pool.resources.num_actors,
                max_actors=pool.resources.max_actors or pool.resources.num_actors,
            )
            for pool in self.pools
        ]
        self._next_scale = 0.0

    def __iter__(self) -> Iterator[Pool]:
        return iter(self.pools)

    def __getitem__(self, index: int) -> Pool:
        return self.pools[index]

    @property
    def sink(self) -> Pool:
        """The sink's pool."""
        return self.pools[-1]

    @property
    def model_pools(self) -> list[Pool]:
        """Every pool but the sink's."""
        return self.pools[:-1]

    def start(self, pool: Pool, *, nodes: list[NodeShape] | None = None) -> list[Actor]:
        """Start a pool's actors (and probe them); the new actors.

        With ``nodes`` (the live nodes) and no autoscaler, a pool none of whose actors any node could
        hold even empty is refused at once (ValueError naming the node shapes), not waited for.
        """
        if nodes and not self.elasticity.autoscaler:
            group = StageGroup(name=pool.label, stages=tuple(s.name for s in pool.specs), resources=pool.resources)
            problems = unplaceable([group], nodes)
            if problems:
                raise ValueError(f"{problems[0]}. Ask for less (--STAGE-gpus, --STAGE-cpus) or add such nodes")
        actors = pool.start()
        for actor in actors:
            self.probe(actor)
        self._record(pool)
        return actors

    def free_actor(self, stage: int, calls_per_actor: int) -> Actor | None:
        """The least busy ready actor that serves ``stage`` (the sink's index: a writer) with room for a call."""
        return self.pools[self.stage_pool[stage]].free_actor(calls_per_actor)

    def all_ready(self) -> bool:
        """Whether every pool has actors and all are up."""
        return all(pool.actors and all(a.ready for a in pool.actors) for pool in self.pools)

    def answered(self, actor: Actor, value: Any, error: BaseException | None) -> None:
        """An actor answered its readiness probe (``value``: what it said; ``error``: why it did not)."""
        pool = self.pools[actor.pool]
        was_ready, had_answered = actor.ready, actor.answered
        record_probe(actor, pool, error)
        if actor.ready and isinstance(value, dict):
            actor.node_id = value.get("node_id") or actor.node_id
        if actor.ready and not was_ready:
            actor.answered = True
            if had_answered:  # back after a loss: a restart, or a new node
                self.records[pool.index].joined += 1
            self._record(pool)

    def lost(self, actor: Actor) -> None:
        """An actor stopped answering (it died, its node went): no work until it answers again."""
        if actor.ready:
            actor.ready = False
            self.records[actor.pool].lost += 1
            self._record(self.pools[actor.pool])

    def up(self, pool: Pool) -> int:
        """Actors of ``pool`` up now."""
        return sum(actor.ready for actor in pool.actors)

    def _record(self, pool: Pool) -> None:
        record = self.records[pool.index]
        size = self.up(pool)
        if record.history and record.history[-1][1] == size:
            return
        record.history.append((time.monotonic() - self.started, size))
        # Coming up is the phase line's (`jobs.execution.watch`); from the first time the pool is whole, each change
        # (a lost node, growth onto a new one) is a line of its own.
        if record.whole:
            logger.info("stage %s: %d actor(s) up (of %d)", pool.label, size, len(pool.actors))
        record.whole = record.whole or size >= len(pool.actors)

    # ------------------------------------------------------------------ elasticity

    def scale(self, *, demand: dict[int, int], nodes: Callable[[], list[NodeShape]], kill: Callable) -> None:
        """Follow the cluster, at most every `Elasticity.interval_s`: drain, grow, shrink (see module docstring).

        ``demand``: pool index -> calls waiting for its actors; ``nodes`` reads the live nodes;
        ``kill(actor)`` retires an actor for good.
        """
        now = time.monotonic()
        if now < self._next_scale or not any(p.started for p in self.model_pools):
            return
        self._next_scale = now + self.elasticity.interval_s
        elastic = [p for p in self.model_pools if p.started and p.resources.elastic]
        if not elastic and not any(p.started for p in self.model_pools):
            return
        shapes = nodes()
        draining = {node.node_id for node in shapes if node.draining}
        for pool in self.model_pools:
            for actor in list(pool.actors):
                if actor.node_id in draining and not actor.draining:
                    actor.draining = True
                    logger.info("stage %s: an actor's node is being drained: it gets no new calls", pool.label)
                if actor.draining and actor.inflight == 0:
                    self._retire(pool, actor, kill)
                    self.records[pool.index].drained += 1
        free = {node.node_id: dict(node.free) for node in shapes}
        for pool in elastic:
            waiting = demand.get(pool.index, 0)
            if waiting and self._may_grow(pool, shapes, free):
                actor = pool.add_actor()
                self.probe(actor)
                self.records[pool.index].grown += 1
                logger.info("stage %s: work waits and a node can hold another actor: starting one", pool.label)
            elif not waiting:
                self._shrink_idle(pool, now, kill)

    def _may_grow(self, pool: Pool, shapes: list[NodeShape], free: dict[str, dict[str, float]]) -> bool:
        live = [a for a in pool.actors if not a.draining]
        if len(live) >= (pool.resources.max_actors or pool.resources.num_actors):
            return False
        if any(not actor.ready for actor in live):  # one coming up (or pending for a node) at a time
            return False
        for node in shapes:
            if fits(pool.resources, node, free=free[node.node_id]):
                free[node.node_id]["GPU"] = free[node.node_id].get("GPU", 0.0) - pool.resources.num_gpus
                free[node.node_id]["CPU"] = free[node.node_id].get("CPU", 0.0) - pool.resources.num_cpus
                return True
        return self.elasticity.autoscaler  # a pending actor is demand the autoscaler adds a node for

    def _shrink_idle(self, pool: Pool, now: float, kill: Callable) -> None:
        above = len(pool.actors) - pool.resources.num_actors
        idle = [
            a
            for a in pool.actors
            if a.ready and a.inflight == 0 and now - max(a.last_done, a.ready_since) > self.elasticity.idle_timeout_s
        ]
        if above > 0 and idle:
            self._retire(pool, idle[0], kill)
            self.records[pool.index].shrunk += 1
            logger.info(
                "stage %s: an actor stayed idle %.0f s: retiring it", pool.label, self.elasticity.idle_timeout_s
            )

    def _retire(self, pool: Pool, actor: Actor, kill: Callable) -> None:
        pool.actors.remove(actor)
        kill(actor)
        self._record(pool)

    def stats(self) -> dict[str, Any]:
        """stats.json's ``pools``: per group, its bounds, sizes over time and what changed them."""
        return {record.name: record.as_dict() for record in self.records}
