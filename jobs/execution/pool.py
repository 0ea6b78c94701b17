"""The runner's actor pools, one per group of stages (and one for the sink): starting actors, knowing when each
is up, telling a restart from a failure, and choosing the least busy.

A group's actors are started with ``max_restarts=-1``: Ray brings a dead actor back (reloading its
models) on any node that has room. The driver gives an actor work only once it has answered its
readiness probe; a probe that meets a restarting actor (``ActorUnavailableError``) or one that died
is sent again with backoff, because on a GPU cluster a restart reloads gigabytes of weights and
often takes minutes. Only an actor whose constructor raised (``actor_init_failed``) is a failed start.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from actors.weights import CheckpointSyncError
from cluster.resources import StageLayout
from jobs.execution.contract import SinkSpec, StageSpec
from jobs.execution.workers import SinkWorker, StageWorker
from schemas.loggers import logger_for

logger = logger_for(__name__)

MAX_PROBE_BACKOFF_S = 30.0


@dataclass(eq=False, kw_only=True)
class Actor:
    """One actor as the driver tracks it."""

    pool: int  # index into the runner's pools; the sink's pool is last
    handle: Any
    ready: bool = False
    inflight: int = 0
    failures: int = 0
    probe_failures: int = 0
    reprobe_at: float | None = None
    open_tasks: int = 0  # sink actors: tasks assigned to this actor and not yet published
    node_id: str = ""  # the node it last answered from
    kept: bool = False  # an actor an earlier run in this process kept (`--keep-actors`): reset before use
    draining: bool = False  # its node is being drained: no new calls
    answered: bool = False  # it has been up once
    ready_since: float = 0.0
    # (monotonic time, stage) of each call in flight, oldest first; with `last_done` they bound when the
    # running call started (calls run one at a time, in order).
    submitted: deque[tuple[float, int]] = field(default_factory=deque)
    last_done: float = 0.0

    def running(self) -> tuple[float, int] | None:
        """(when it began at the latest, its stage) of the call this actor is running, or None when it has none."""
        if not self.submitted:
            return None
        at, stage = self.submitted[0]
        return max(at, self.last_done), stage


@dataclass(eq=False, kw_only=True)
class Pool:
    """The actors of one group: the stages they serve (indices into the runner's stages) and what each reserves."""

    index: int
    name: str
    specs: list[StageSpec] | list[SinkSpec]
    stages: tuple[int, ...]
    actors: list[Actor] = field(default_factory=list)
    started: bool = False

    @property
    def sink(self) -> bool:
        """Whether this is the sink's pool."""
        return isinstance(self.specs[0], SinkSpec)

    @property
    def label(self) -> str:
        """How messages name it: ``decoder``, or ``clip (prior, score)`` for a group of several stages."""
        names = [spec.name for spec in self.specs]
        return self.name if names == [self.name] else f"{self.name} ({', '.join(names)})"

    @property
    def resources(self) -> StageLayout:
        """What the group asks for: actors, and each one's GPUs, CPUs and placement."""
        return self.specs[0].resources

    def start(self) -> list[Actor]:
        """Start the group's actors (taking kept ones first, `claim_kept`); the new actors (not yet probed)."""
        self.started = True
        self.actors = [claim_kept(self) or start_actor(self) for _ in range(self.resources.num_actors)]
        return list(self.actors)

    def add_actor(self) -> Actor:
        """Start one more actor (an elastic pool growing); it is not yet probed."""
        actor = claim_kept(self) or start_actor(self)
        self.actors.append(actor)
        return actor

    @property
    def key(self) -> str:
        """What makes two pools' actors interchangeable: the stages they build (class, arguments, batch size) and
        what each actor reserves. A kept actor serves a later pool only when the keys are equal."""
        specs = [
            (spec.name, f"{spec.cls.__module__}.{spec.cls.__qualname__}", getattr(spec, "batch_size", None))
            + (json.dumps(spec.kwargs, sort_keys=True, default=repr),)
            for spec in self.specs
        ]
        return json.dumps([self.name, specs, repr(self.resources)], default=repr)

    def free_actor(self, calls_per_actor: int) -> Actor | None:
        """The least busy ready actor (not on a draining node) with room for another call, or None."""
        candidates = [a for a in self.actors if a.ready and not a.draining and a.inflight < calls_per_actor]
        return min(candidates, key=lambda a: a.inflight) if candidates else None

    @property
    def any_ready(self) -> bool:
        """Whether some actor is up."""
        return any(actor.ready for actor in self.actors)


# Model actors a run left alive for the next run in this process (``--keep-actors``), by the Ray job they belong
# to and their pool's key. Sinks are never kept: their arguments name the run.
_KEPT: dict[tuple[str, str], list[Any]] = {}


def _ray_job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def claim_kept(pool: Pool) -> Actor | None:
    """A kept actor interchangeable with ``pool``'s (`Pool.key`), taken out of the keep, or None."""
    if pool.sink:
        return None
    handles = _KEPT.get((_ray_job(), pool.key))
    if not handles:
        return None
    logger.info("stage %s: reusing an actor kept by an earlier run (reset before its first call)", pool.label)
    return Actor(pool=pool.index, handle=handles.pop(), kept=True)


def keep_actors(pools: list[Pool]) -> int:
    """Keep the ready actors of the model ``pools`` for a later run in this process; kill the rest. The number kept."""
    import ray

    job, kept = _ray_job(), 0
    for pool in pools:
        for actor in pool.actors:
            if pool.sink or not actor.ready or actor.draining or actor.inflight:
                ray.kill(actor.handle)
                continue
            _KEPT.setdefault((job, pool.key), []).append(actor.handle)
            kept += 1
    return kept


def release_kept(*, keep: set[str] = frozenset()) -> int:
    """Kill the kept actors whose pool key is not in ``keep`` (they hold GPUs and CPUs a run may need), and
    forget those of other Ray jobs (gone with them); the number killed."""
    import ray

    killed = 0
    job = _ray_job() if ray.is_initialized() else None
    for (owner, key), handles in list(_KEPT.items()):
        if owner == job and key in keep:
            continue
        del _KEPT[(owner, key)]
        if owner == job:
            for handle in handles:
                ray.kill(handle)
                killed += 1
    return killed


def start_actor(pool: Pool) -> Actor:
    """One Ray actor of ``pool``, restarted by Ray when it dies, named after its group."""
    import ray

    from cluster.resources import ray_remote_args

    body = SinkWorker if pool.sink else StageWorker
    # A subclass per group so Ray (dashboard, state API, logs) names actors after what they run.
    remote = ray.remote(type(f"{pool.name.title()}Stage", (body,), {}))
    args = {"spec": pool.specs[0]} if pool.sink else {"specs": pool.specs}
    handle = remote.options(
        **ray_remote_args(pool.resources),  # num_gpus, num_cpus, accelerator type, node labels
        max_concurrency=max_concurrency(pool),
        max_restarts=-1,  # a dead actor comes back (model reloaded) ...
        max_task_retries=0,  # ... and the driver re-runs its work, from the first stage
    ).remote(**args)
    return Actor(pool=pool.index, handle=handle)


def constructing(actor: Actor) -> bool:
    """Whether ``actor`` runs its constructor now: placed on a node (it has a process) and not yet created. Such an
    actor is loading (or compiling) its models, not waiting for room. From the GCS's actor table (Ray's
    ``ray._private.state``: the public state API needs the dashboard, which private Rays do not start); when the
    table cannot be read, False (the actor counts as waiting)."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor.handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - an internal table: no answer means no evidence of progress
        return False
    return isinstance(info, dict) and info.get("State") == "PENDING_CREATION" and bool(info.get("Pid"))


def max_concurrency(pool: Pool) -> int:
    """Calls one actor of ``pool`` runs at once: the most any of its stages asks for on the pool's device
    (`actors.stage.Stage.concurrency`: 2 for a GPU decoder, whose host work overlaps the other call's
    denoising); 1 for the sink and for CPU actors."""
    if pool.sink:
        return 1
    device = "cuda" if pool.resources.num_gpus > 0 else "cpu"
    return max(getattr(spec.cls, "concurrency", lambda _device, **_: 1)(device, **spec.kwargs) for spec in pool.specs)


def probe_outcome(exc: BaseException | None) -> str:
    """``ready``, ``failed`` (its constructor raised, or could not sync a checkpoint: it will never serve) or
    ``retry`` (restarting, dead, lost)."""
    if exc is None:
        return "ready"
    if getattr(exc, "actor_init_failed", False) or isinstance(start_failure(exc), CheckpointSyncError):
        return "failed"
    return "retry"


def start_failure(exc: BaseException) -> BaseException | None:
    """What an actor's readiness probe raised itself (`jobs.execution.workers`), unwrapped from Ray's task error."""
    return getattr(exc, "cause", None)


def ray_result(ref: Any) -> tuple[Any, BaseException | None]:
    """(value, None) for a ``ref`` that succeeded, (None, the Ray error) for one whose actor died, restarts or is
    unreachable."""
    import ray

    try:
        return ray.get(ref), None
    except ray.exceptions.RayError as exc:
        return None, exc


def record_probe(actor: Actor, pool: Pool, error: BaseException | None) -> None:
    """What the answer to ``actor``'s readiness probe means: it is up; it failed to start (removed from
    ``pool`` and killed; RuntimeError once no actor of the pool can start); or it is not up yet (asked
    again after `probe_backoff`)."""
    import ray

    name = pool.label
    outcome = probe_outcome(error)
    if outcome == "ready":
        if not actor.ready:
            actor.ready_since = time.monotonic()
        actor.ready, actor.probe_failures = True, 0
        return
    if outcome == "failed":
        pool.actors.remove(actor)
        ray.kill(actor.handle)
        failure = start_failure(error)
        if isinstance(failure, CheckpointSyncError):  # its own line, not Ray's traceback with terminal colours
            logger.warning("stage %s: an actor failed to start: %s", name, failure)
            if not pool.actors:
                raise CheckpointSyncError(f"stage {name}: no actor could start: {failure}") from None
            return
        logger.warning("stage %s: an actor failed to start: %s", name, error)
        if not pool.actors:
            raise RuntimeError(f"stage {name}: no actor could start: {error}") from error
        return
    actor.probe_failures += 1
    actor.reprobe_at = time.monotonic() + probe_backoff(actor)
    logger.info("stage %s: an actor is not up yet (%s); asking again", name, type(error).__name__)


def probe_backoff(actor: Actor) -> float:
    """Seconds before probing ``actor`` again: doubling from 0.5 s, at most `MAX_PROBE_BACKOFF_S`."""
    return min(MAX_PROBE_BACKOFF_S, 0.5 * 2 ** min(actor.probe_failures, 10))


def describe_resources(pool: Pool) -> str:
    """What one actor of ``pool`` asks of a node, and what the cluster has free now, in words."""
    import ray

    resources = pool.resources
    want = f"{resources.num_gpus:g} GPU and {resources.num_cpus:g} CPU"
    placement = resources.placement
    if placement.accelerator_type:
        want += f" of accelerator type {placement.accelerator_type}"
    if placement.label_selector:
        want += " on nodes labelled " + ", ".join(f"{k}={v}" for k, v in placement.label_selector.items())
    try:
        free, total = ray.available_resources(), ray.cluster_resources()
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception as exc:  # noqa: BLE001 - only for the message
        return f"each actor needs {want} (cluster resources unknown: {exc})"
    return (
        f"each actor needs {want}; the cluster ({alive} live node(s)) has {free.get('GPU', 0):g} of "
        f"{total.get('GPU', 0):g} GPUs and {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPUs free"
    )
