"""The runner's clock: re-probes that are due, per-call deadlines, stage waits and stall warnings.

- A call running longer than its stage's deadline (``max(call_timeout_floor_s, call_timeout_factor x
  the slowest call seen)``, or ``call_timeout_s``) gets its actor killed (``ray.kill(no_restart=False)``:
  Ray restarts it); its calls then fail and the runner re-runs their work.
- A stage with no actor up for ``stage_wait_s`` (a lost node took them and nothing else can hold
  them) stops the job with a message naming the stage and the resources it lacks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from jobs.execution.contract import SinkSpec, StageSpec
from jobs.execution.pool import Actor, Pool, describe_resources

logger = logging.getLogger("jobs.execution.runner")  # its warnings are the runner's


@dataclass(frozen=True, kw_only=True)
class Deadlines:
    """Per-call deadlines: ``call_timeout_s`` if set, else ``max(floor, factor x slowest call of the stage)``."""

    call_timeout_s: float | None = None
    call_timeout_floor_s: float = 600.0
    call_timeout_factor: float = 5.0
    stage_wait_s: float = 600.0


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
        self._last_warning = time.monotonic()

    def started_pool(self, pool: int) -> None:
        """A pool just started: its wait counts from now."""
        self.up_since[pool] = time.monotonic()

    def finished_call(self, stage: int, seconds: float) -> None:
        """A call of ``stage`` took ``seconds`` (its deadline follows the slowest)."""
        self.slowest[stage] = max(self.slowest[stage], seconds)

    def deadline(self, stage: int) -> float:
        """Seconds a call of ``stage`` may run."""
        if self.deadlines.call_timeout_s:
            return self.deadlines.call_timeout_s
        return max(self.deadlines.call_timeout_floor_s, self.deadlines.call_timeout_factor * self.slowest[stage])

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
        for pool in pools:
            if pool.any_ready or not (pool.actors or demand.get(pool.index)):  # not started: nothing to wait for
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
                if actor.ready and running is not None and now - running[0] > self.deadline(running[1]):
                    logger.warning(
                        "stage %s: a call has run %.0f s, past its deadline of %.0f s: killing the actor "
                        "(Ray restarts it) and re-running its work",
                        self.specs[running[1]].name,
                        now - running[0],
                        self.deadline(running[1]),
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
