"""Ray actors of one runner: building them, knowing when each is up, and telling a restart from a failure.

A stage's actors are started with ``max_restarts=-1``: Ray brings a dead actor back (reloading its
model) on any node that has room. The driver gives an actor work only once it has answered its
readiness probe; a probe that meets a restarting actor (``ActorUnavailableError``) or one that died
is sent again with backoff, because on a GPU cluster a restart reloads gigabytes of weights and
often takes minutes. Only an actor whose constructor raised (``actor_init_failed``) is a failed start.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from jobs.execution.contract import SinkSpec, StageSpec, split_rows
from schemas.work import from_ipc, to_ipc

logger = logging.getLogger(__name__)

MAX_PROBE_BACKOFF_S = 30.0


def ray_worker_tag() -> str:
    """``gpus=<ray gpu ids> cuda=<CUDA_VISIBLE_DEVICES>`` of the current Ray worker."""
    import ray

    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    return f"gpus={gpu_ids or '-'} cuda={os.environ.get('CUDA_VISIBLE_DEVICES') or '-'}"


class _Worker:
    """What every actor body shares: its stage (or sink) built once in the constructor, a probe, its pid."""

    def __init__(self, *, spec: StageSpec | SinkSpec) -> None:
        self.name = spec.name
        self.instance = spec.build(worker=ray_worker_tag())

    def ready(self) -> str:
        """Answers once the constructor (model loading) is done."""
        return self.name

    def pid(self) -> int:
        """The actor's process id (tests, diagnostics)."""
        return os.getpid()


class StageWorker(_Worker):
    """Body of one model-stage actor: maps Arrow IPC payloads through its stage."""

    def run(self, payload: bytes, sizes: list[int]) -> tuple[Any, ...]:
        """Map one payload; return one payload per entry of ``sizes`` plus a small info dict, last."""
        started = time.perf_counter()
        table = self.instance(from_ipc(payload))
        pieces = [to_ipc(piece) for piece in split_rows(table, sizes)]
        return (*pieces, {"rows": table.num_rows, "seconds": time.perf_counter() - started})


class SinkWorker(_Worker):
    """Body of one sink actor: takes batches of tasks and publishes each task when told to."""

    def add(self, tag: str, payload: bytes) -> dict[str, Any]:
        """Give one batch of task ``tag`` to the sink; its info dict plus the call's seconds."""
        started = time.perf_counter()
        info = dict(self.instance.add(tag, from_ipc(payload)) or {})
        return info | {"seconds": time.perf_counter() - started}

    def finalize(self, tag: str, args: Any) -> tuple[Any, dict[str, Any]]:
        """Publish task ``tag``; (what the sink returned, info with the call's seconds)."""
        started = time.perf_counter()
        result = self.instance.finalize(tag, args)
        return result, {"seconds": time.perf_counter() - started}

    def abandon(self, tag: str) -> None:
        """Drop what the sink holds for task ``tag`` (it will be redone elsewhere)."""
        self.instance.abandon(tag)


@dataclass(eq=False, kw_only=True)
class Actor:
    """One actor as the driver tracks it."""

    stage: int  # index into the runner's stages; len(stages) is the sink
    handle: Any
    ready: bool = False
    inflight: int = 0
    failures: int = 0
    probe_failures: int = 0
    reprobe_at: float | None = None
    open_tasks: int = 0  # sink actors: tasks assigned to this actor and not yet published
    # Monotonic times the driver submitted each in-flight call, oldest first; with `last_done` they
    # bound when the running call started (calls run one at a time, in order).
    submitted: deque[float] = field(default_factory=deque)
    last_done: float = 0.0

    def running_since(self) -> float | None:
        """When the call this actor is running began (at the latest), or None when it has none."""
        return max(self.submitted[0], self.last_done) if self.submitted else None


def start_actor(spec: StageSpec | SinkSpec, *, stage: int, sink: bool) -> Actor:
    """One Ray actor for ``spec``, restarted by Ray when it dies, named after its stage."""
    import ray

    from cluster.resources import ray_remote_args

    body = SinkWorker if sink else StageWorker
    # A subclass per stage so Ray (dashboard, state API, logs) names actors after their stage.
    remote = ray.remote(type(f"{spec.name.title()}Stage", (body,), {}))
    handle = remote.options(
        **ray_remote_args(spec.resources),  # num_gpus, num_cpus, accelerator type, node labels
        max_restarts=-1,  # a dead actor comes back (model reloaded) ...
        max_task_retries=0,  # ... and the driver re-runs its work, from the first stage
    ).remote(spec=spec)
    return Actor(stage=stage, handle=handle)


def probe_outcome(exc: BaseException | None) -> str:
    """``ready``, ``failed`` (its constructor raised: it will never serve) or ``retry`` (restarting, dead, lost)."""
    if exc is None:
        return "ready"
    if getattr(exc, "actor_init_failed", False):
        return "failed"
    return "retry"


def ray_error(ref: Any) -> BaseException | None:
    """The Ray error ``ref`` resolved to (an actor that died, restarts, is unreachable...), None if it succeeded."""
    import ray

    try:
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        return exc
    return None


def record_probe(actor: Actor, pool: list[Actor], error: BaseException | None, *, name: str) -> None:
    """What the answer to ``actor``'s readiness probe means: it is up; it failed to start (removed from
    ``pool`` and killed; RuntimeError once no actor of stage ``name`` can start); or it is not up yet
    (asked again after `probe_backoff`)."""
    import ray

    outcome = probe_outcome(error)
    if outcome == "ready":
        actor.ready, actor.probe_failures = True, 0
        return
    if outcome == "failed":
        pool.remove(actor)
        ray.kill(actor.handle)
        logger.warning("stage %s: an actor failed to start: %s", name, error)
        if not pool:
            raise RuntimeError(f"stage {name}: no actor could start: {error}") from error
        return
    actor.probe_failures += 1
    actor.reprobe_at = time.monotonic() + probe_backoff(actor)
    logger.info("stage %s: an actor is not up yet (%s); asking again", name, type(error).__name__)


def probe_backoff(actor: Actor) -> float:
    """Seconds before probing ``actor`` again: doubling from 0.5 s, at most `MAX_PROBE_BACKOFF_S`."""
    return min(MAX_PROBE_BACKOFF_S, 0.5 * 2 ** min(actor.probe_failures, 10))


def describe_resources(spec: StageSpec | SinkSpec) -> str:
    """What one actor of ``spec`` asks of a node, and what the cluster has free now, in words."""
    import ray

    want = f"{spec.resources.num_gpus:g} GPU and {spec.resources.num_cpus:g} CPU"
    placement = spec.resources.placement
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
