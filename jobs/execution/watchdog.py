"""The runner's clock: re-probes that are due, per-call deadlines, stage waits and stall warnings.

- A call running longer than its deadline gets its actor killed (``ray.kill(no_restart=False)``: Ray
  restarts it); its calls then fail and the runner re-runs their work. The deadline is
  ``call_timeout_s`` when set, else ``call_timeout_factor x`` the stage's slowest call so far, at
  least ``call_timeout_floor_s`` (600 s: a first call may load, compile or warm up for minutes) or,
  for a model actor that has already finished a call since it last started, at least
  ``call_timeout_warm_floor_s`` (60 s): a wedged GPU then costs a minute or two, not ten. Writer
  calls (batches, or publishing a whole shard) keep the long floor.
- A stage with no actor up for ``stage_wait_s`` (a lost node took them and nothing else can hold
  them) stops the job with a message naming the stage and the resources it lacks. Time an actor spends
  in its constructor on a node (loading or compiling its models: `jobs.execution.pool.constructing`) is
  progress, not waiting: it does not count, up to ``max_load_s`` (a constructor that hangs longer gets
  its actor killed and restarted, as a call past its deadline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from jobs.execution.contract import SinkSpec, StageSpec
from jobs.execution.pool import Actor, Pool, constructing, describe_resources
from schemas.loggers import logger_for

logger = logger_for("jobs.execution.runner")  # its warnings are the runner's
LOOK_EVERY_S = 2.0  # how often a waiting pool's actors are looked up in the actor table


@dataclass(frozen=True, kw_only=True)
class Deadlines:
    """Per-call deadlines: ``call_timeout_s`` if set, else ``max(floor, factor x slowest call of the stage)``,
    where the floor is ``call_timeout_warm_floor_s`` for a model actor past its first call (see the module)."""

    call_timeout_s: float | None = None
    call_timeout_floor_s: float = 600.0
    call_timeout_warm_floor_s: float = 60.0
    call_timeout_factor: float = 5.0
    stage_wait_s: float = 600.0

    @property
    def max_load_s(self) -> float:
        """The longest a model actor's constructor (loading, compiling) may run before it is restarted: 3 x the
        first-call floor (30 minutes by default)."""
        return 3 * self.call_timeout_floor_s


class Watchdog:
    """Time checks over the runner's pools (the sink's last); `check` runs once per loop turn.

    Deadlines are per stage (``specs``: the runner's stages, then the sink); waits are per pool.
    """

    def __init__(
        self, specs: Sequence[StageSpec | SinkSpec], deadlines: Deadlines, *, started: float, stall_warning_s: float
    ) -> None:
        self.specs = specs
        self.deadlines = deadlines
        self.started = started
        self.stall_warning_s = stall_warning_s
        self.slowest = [0.0] * len(specs)
        self.up_since: dict[int, float] = {}  # pool index -> when it last had an actor up
        self._loading_since: dict[Actor, float] = {}  # actors seen in their constructor -> since when
        self._next_look = 0.0  # when the actor table may be read again (it is a GCS request per actor)
        self._last_warning = time.monotonic()
        # Per actor: (its failure count, its last call's end) when it was last seen down or failing; a call
        # finished since then (and no failure) means it is past its first call: warm.
        self._cold_at: dict[Actor, tuple[int, float]] = {}

    def started_pool(self, pool: int) -> None:
        """A pool just started: its wait counts from now."""
        self.up_since[pool] = time.monotonic()

    def finished_call(self, stage: int, seconds: float) -> None:
        """A call of ``stage`` took ``seconds`` (its deadline follows the slowest)."""
        self.slowest[stage] = max(self.slowest[stage], seconds)

    def warm(self, stage: int, actor: Actor) -> bool:
        """Whether ``actor`` of ``stage`` is a model actor that has finished a call since it last (re)started."""
        if isinstance(self.specs[stage], SinkSpec):
            return False
        seen = self._cold_at.get(actor)
        if seen is None or not actor.ready or actor.failures != seen[0]:
            self._cold_at[actor] = seen = (actor.failures, actor.last_done)
        return actor.last_done > seen[1]

    def _loading(self, pool: Pool, now: float) -> bool:
        """Whether some actor of ``pool`` (none up) is in its constructor on a node, within `Deadlines.max_load_s`; an
        actor whose constructor ran longer is killed (Ray restarts it) and does not count."""
        import ray

        loading = False
        for actor in pool.actors:
            if not constructing(actor):
                self._loading_since.pop(actor, None)
                continue
            since = self._loading_since.setdefault(actor, now)
            if now - since <= self.deadlines.max_load_s:
                loading = True
                continue
            logger.warning(
                "stage %s: an actor has been loading for %.0f s, past %.0f s (3 x --call-timeout-floor): "
                "killing it (Ray restarts it)",
                pool.label,
                now - since,
                self.deadlines.max_load_s,
            )
            del self._loading_since[actor]
            ray.kill(actor.handle, no_restart=False)
        return loading

    def deadline(self, stage: int, actor: Actor | None = None) -> float:
        """Seconds a call of ``stage`` (on ``actor``, when given) may run."""
        if self.deadlines.call_timeout_s:
            return self.deadlines.call_timeout_s
        warm = actor is not None and self.warm(stage, actor)
        floor = self.deadlines.call_timeout_warm_floor_s if warm else self.deadlines.call_timeout_floor_s
        return max(floor, self.deadlines.call_timeout_factor * self.slowest[stage])

    def check(
        self, pools: Iterable[Pool], *, probe: Callable[[Actor], None], demand: Mapping[int, int] | None = None
    ) -> None:
        """Send due re-probes, kill actors past their call deadline (then probe them), enforce stage waits.

        A pool waits while it has no actor up but has actors, or (an elastic pool at zero) work waiting for it.
        """
        import ray

        now = time.monotonic()
        demand = demand or {}
        pools = list(pools)
        look = now >= self._next_look
        if look:
            self._next_look = now + LOOK_EVERY_S
        for pool in pools:
            if pool.any_ready or not (pool.actors or demand.get(pool.index)):  # not started: nothing to wait for
                self.up_since[pool.index] = now
            elif look and self._loading(pool, now):  # a constructor running is progress, not a wait
                self.up_since[pool.index] = now
            elif now - self.up_since.setdefault(pool.index, now) > self.deadlines.stage_wait_s:
                waited = now - self.up_since[pool.index]
                raise RuntimeError(
                    f"stage {pool.label}: no actor has been up for {waited:.0f} s "
                    f"(--stage-wait {self.deadlines.stage_wait_s:g}); {describe_resources(pool)}. "
                    "Add nodes with these resources or ask for less; a rerun finishes the work."
                )
            for actor in pool.actors:
                if actor.reprobe_at is not None and now >= actor.reprobe_at:
                    probe(actor)
                running = actor.running()
                deadline = self.deadline(running[1], actor) if running is not None else 0.0
                if actor.ready and running is not None and now - running[0] > deadline:
                    logger.warning(
                        "stage %s: a call has run %.0f s, past its deadline of %.0f s: killing the actor "
                        "(Ray restarts it) and re-running its work",
                        self.specs[running[1]].name,
                        now - running[0],
                        deadline,
                    )
                    actor.ready = False
                    actor.submitted.clear()
                    ray.kill(actor.handle, no_restart=False)
                    probe(actor)
        if now - self._last_warning > self.stall_warning_s:
            self._last_warning = now
            for pool in pools:
                if pool.actors and not pool.any_ready:
                    logger.warning(
                        "stage %s: no actor is up after %.0f s: still loading its model, restarting, or the "
                        "cluster lacks the resources (%s)",
                        pool.label,
                        now - self.started,
                        describe_resources(pool),
                    )
