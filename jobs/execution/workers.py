"""The bodies of the Ray actors: a group of stages (one model process) or the sink, built once per actor."""

from __future__ import annotations

import os
import time
from typing import Any

from actors.weights import CheckpointSyncError
from jobs.execution.contract import SinkSpec, StageSpec, split_rows
from schemas.work import from_ipc, to_ipc


def ray_worker_tag() -> str:
    """``gpus=<ray gpu ids> cuda=<CUDA_VISIBLE_DEVICES>`` of the current Ray worker."""
    import ray

    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    return f"gpus={gpu_ids or '-'} cuda={os.environ.get('CUDA_VISIBLE_DEVICES') or '-'}"


class _Worker:
    """What every actor body shares: a readiness probe (it answers once the constructor is done) and its pid."""

    name = ""

    start_failure: CheckpointSyncError | None = None  # why the constructor could not load the models

    def ready(self, *, reset: bool = False) -> dict[str, str]:
        """Answers once the constructor (model loading) is done: what it runs and on which node. ``reset``: an
        actor kept from an earlier run first forgets what that run left (`reset`). Raises the constructor's
        `CheckpointSyncError`: the driver gets the exception itself, one line (`jobs.execution.pool.record_probe`),
        not Ray's creation-task traceback."""
        import ray

        if self.start_failure is not None:
            raise self.start_failure
        if reset:
            self.reset()
        return {"name": self.name, "node_id": ray.get_runtime_context().get_node_id()}

    def reset(self) -> None:
        """Make the actor as a fresh one would be (its models stay loaded)."""

    def pid(self) -> int:
        """The actor's process id (tests, diagnostics)."""
        return os.getpid()


class StageWorker(_Worker):
    """Body of one model actor: builds each stage of its group once (in chain order, so stages that share weights
    find them loaded), then maps Arrow IPC payloads through the stage a call names."""

    def __init__(self, *, specs: list[StageSpec]) -> None:
        tag = ray_worker_tag()
        self.name = specs[0].group_name
        try:
            self.instances = {spec.name: spec.build(worker=tag) for spec in specs}
        except CheckpointSyncError as exc:  # kept for `ready`: Ray would restart the actor into the same failure
            self.instances, self.start_failure = {}, exc

    def reset(self) -> None:
        """Each stage as just built: caches emptied, batch sizes as configured (`actors.stage.Stage.reset`)."""
        for instance in self.instances.values():
            instance.reset()

    def run(self, stage: str, payload: bytes, sizes: list[int]) -> tuple[Any, ...]:
        """Map one payload through ``stage``; one payload per entry of ``sizes``, then a small info dict."""
        started = time.perf_counter()
        table = self.instances[stage](from_ipc(payload))
        pieces = [to_ipc(piece) for piece in split_rows(table, sizes)]
        return (*pieces, {"rows": table.num_rows, "seconds": time.perf_counter() - started})


class SinkWorker(_Worker):
    """Body of one sink actor: takes batches of tasks and publishes each task when told to."""

    def __init__(self, *, spec: SinkSpec) -> None:
        self.name = spec.name
        self.instance = spec.build(worker=ray_worker_tag())

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
