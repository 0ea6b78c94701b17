"""Stand-in model stages for the benchmarks: a prior and a decoder that sleep a fixed time per image and emit
payloads of the real size (1280-float embeddings, a 5056-byte generator state, ``image_size`` pixels), in the real
chain (`simulated_chain`), so that figures measure the wiring, the driver and the writers, not a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from actors.stage import Call, Outcome, Stage, with_errors
from schemas.work import (
    CALL_KEY,
    DECODED_FIELDS,
    DECODER_DROPS,
    PRIOR_CALL_KEY,
    embed_fields,
    embed_schema,
    embeds_array,
)

GENERATOR_STATE_BYTES = 5056  # a CPU torch.Generator's state, what the prior hands the decoder per image


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


@contextlib.contextmanager
def _logical_gpu(enabled: bool) -> Iterator[None]:
    """While held, no other stand-in on this actor's logical GPU (Ray's CUDA_VISIBLE_DEVICES) computes: actors that
    share a GPU time-slice it, as co-located CLIP and decoder actors would (without the real GPU's switching loss)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not enabled or not gpu:
        yield
        return
    path = os.path.join(tempfile.gettempdir(), f"kandinsky-simulated-gpu-{os.environ.get('KR_SIM_SESSION', '')}-{gpu}")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compute(seconds: float, *, gpu_lock: bool) -> None:
    with _logical_gpu(gpu_lock):
        _sleep_until(time.perf_counter() + seconds)


class SimulatedPrior(Stage):
    """Stand-in prior: each call lasts ``seconds_per_image`` per row and emits real-size embeddings."""

    name = "prior"
    call_key = PRIOR_CALL_KEY

    def __init__(self, *, seconds_per_image: float, embed_dim: int = 1280, gpu_lock: bool = False, **base: Any) -> None:
        super().__init__(**base)
        self.seconds_per_image, self.embed_dim, self.gpu_lock = seconds_per_image, embed_dim, gpu_lock

    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[bool]:
        _compute(self.seconds_per_image * len(call.rows), gpu_lock=self.gpu_lock)
        return [True] * len(call.rows)

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        n, dim = table.num_rows, self.embed_dim
        columns = [
            embeds_array(None, num_rows=n, dim=dim),
            embeds_array(None, num_rows=n, dim=dim),
            pa.array([bytes(GENERATOR_STATE_BYTES)] * n, pa.binary()),
            pa.array([f"simulated-prior {self.worker}"] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        result = with_errors(table, outcome.errors)
        for field, column in zip(embed_fields(dim), columns):
            result = result.append_column(field, column)
        return result.cast(embed_schema(dim))


def natural_image(size: int, *, seed: int = 0) -> np.ndarray:
    """A ``size`` x ``size`` RGB image that PNG-encodes like a photo: smooth light, shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    image = np.stack([0.6 * x + 0.2, 0.5 * y + 0.3, 0.8 - 0.4 * x * y], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


class SimulatedDecoder(Stage):
    """Stand-in decoder: each call lasts ``seconds_per_image`` per row and emits ``image_size`` pixels per row."""

    name = "decoder"
    call_key = CALL_KEY

    def __init__(self, *, seconds_per_image: float, image_size: int = 64, gpu_lock: bool = False, **base: Any) -> None:
        super().__init__(**base)
        self.seconds_per_image, self.image_size, self.gpu_lock = seconds_per_image, image_size, gpu_lock
        self.pixels = [natural_image(image_size, seed=k).tobytes() for k in range(8)]

    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[bytes]:
        _compute(self.seconds_per_image * len(call.rows), gpu_lock=self.gpu_lock)
        return [self.pixels[row["image_index"] % len(self.pixels)] for row in call.rows]

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        n, size = table.num_rows, self.image_size
        kept = with_errors(table.drop_columns([c for c in DECODER_DROPS if c in table.column_names]), outcome.errors)
        ok = [pixels is not None for pixels in outcome.outputs]
        columns = [
            pa.array(outcome.outputs, pa.binary()),
            pa.array([size if good else None for good in ok], pa.int32()),
            pa.array([size if good else None for good in ok], pa.int32()),
            pa.array([f"simulated-decoder {self.worker}"] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        for field, column in zip(DECODED_FIELDS, columns):
            kept = kept.append_column(field, column)
        return kept


def simulated_chain(*, prior_seconds: float, decoder_seconds: float, image_size: int, gpu_lock: bool = False) -> Any:
    """A `jobs.execution.chain.build_chain` stand-in: the real chain (groups, resources, writers) with sleeping
    prior and decoder stages; ``gpu_lock``: stages on one logical GPU sleep one at a time (they time-slice it)."""
    import dataclasses

    from jobs.execution.chain import build_chain

    stand_ins = {
        "prior": (SimulatedPrior, {"seconds_per_image": prior_seconds, "gpu_lock": gpu_lock}),
        "decoder": (
            SimulatedDecoder,
            {"seconds_per_image": decoder_seconds, "image_size": image_size, "gpu_lock": gpu_lock},
        ),
    }

    def build(config: Any, **chain: Any) -> Any:
        stages, sink = build_chain(config, **chain)
        replaced = []
        for spec in stages:
            cls, kwargs = stand_ins[spec.name]
            replaced.append(dataclasses.replace(spec, cls=cls, kwargs=kwargs))
        return replaced, sink

    return build
