"""Ray-facing wrappers of the model actors: Arrow IPC payloads in, Arrow IPC payloads out.

Ray Data runs these as callable classes in actor pools (model loaded once in ``__init__``, one
planned batch per ``__call__`` row). Each wrapper records which Ray GPU ids its actor holds.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa
import ray

from actors.decoder import DecoderActor
from actors.prior import PriorActor
from schemas.work import from_ipc, to_ipc

PAYLOAD = "payload"


def ray_worker_tag() -> str:
    """``gpus=<ray gpu ids> cuda=<CUDA_VISIBLE_DEVICES>`` of the current Ray worker."""
    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())
    return f"gpus={gpu_ids or '-'} cuda={os.environ.get('CUDA_VISIBLE_DEVICES') or '-'}"


def _map_payloads(fn: Any, batch: pa.Table) -> pa.Table:
    if PAYLOAD not in batch.column_names:
        raise KeyError(f"{type(fn).__name__}: input batch lacks the {PAYLOAD!r} column (Arrow IPC of a planned batch)")
    outputs = [to_ipc(fn(from_ipc(payload))) for payload in batch.column(PAYLOAD).to_pylist()]
    return pa.table({PAYLOAD: pa.array(outputs, pa.large_binary())})


class PriorStage:
    """Payload: `WORK_SCHEMA` batch -> `EMBED_SCHEMA` batch (see `actors.prior.PriorActor`)."""

    def __init__(self, *, model: str, dtype: str) -> None:
        self.actor = PriorActor(model, dtype=dtype, worker=ray_worker_tag())

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_payloads(self.actor, batch)


class DecoderStage:
    """Payload: `EMBED_SCHEMA` batch -> `RESULTS_SCHEMA` batch, images written (see `DecoderActor`)."""

    def __init__(self, *, models: dict[str, str], output: str, run_id: str, storage_options: dict, dtype: str) -> None:
        self.actor = DecoderActor(
            models,
            output=output,
            run_id=run_id,
            storage_options=storage_options,
            dtype=dtype,
            worker=ray_worker_tag(),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_payloads(self.actor, batch)
