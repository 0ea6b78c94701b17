"""The stage contract: how a model stage groups rows into calls, falls back row by row, times calls, keeps rows.

A stage (prior, decoder, depth, ...) is one file holding a subclass of `Stage` that says only what is
particular to its model: its ``name``, its ``call_key`` (columns equal across one model call), which
rows it serves (`wants`), how it loads a row's inputs (`load`), one model call (`run`), how that
call's outputs reach the host (`collect`) and how the outputs become the output table (`finish`).
Everything else is written once, here:

- rows already carrying an ``error`` pass through, as do rows the stage does not serve;
- served rows are grouped by ``call_key`` (rows a stage marks `alone` get a call each), in a
  deterministic order, and cut into calls of at most ``max_batch_size`` rows;
- an input that cannot be loaded makes that row an ``input_error``;
- a call that runs out of memory (`is_out_of_memory`: every CUDA allocation failure torch, cuBLAS
  and cuDNN report) is dropped first (its exception and frames released, then `release_memory`) and
  retried once at the same size (a spike beside it may have passed); if it runs out again it is split
  in halves and retried, and calls keep the smaller size until `GROW_AFTER` calls in a row succeed,
  then the size doubles back, up to the configured one. A row that runs out of memory alone becomes
  ``render_failed`` saying so; the job goes on;
- a failure the stage can recover from by changing itself (`recover`: a failed ``torch.compile``
  falls back to eager) is retried once as it was;
- any other failing call is retried row by row, so only the bad row becomes ``failure_kind``;
- each row's ``seconds`` is its share of its call's device section (`run`): the time the stage is
  busy with it, which is what sizing the stages needs (a call waiting for another is not counted);
- the output must have exactly the input's rows, in order (checked).

Overlap: a stage whose instance is `overlapping` (the decoder on a GPU) holds its device lock only
around `run`, so an actor that accepts two calls at once (`concurrency`) loads the inputs of call
N+1 and finishes call N (the copy's wait, the output table, the caller's IPC) while the device
works. Otherwise the lock covers the whole call: one call at a time, as on the CPU.

Fixed-size list columns (embeddings) reach `run` as 2-D numpy arrays (``arrays``), never as
per-float Python objects; every other column reaches it as the row dicts of `Call.rows`. Binary
columns a stage names in ``buffer_columns`` (decoded ``pixels``: 1.77 MB per 768x768 image) reach
the hooks' row dicts as read-only uint8 numpy views of the Arrow buffers (None where null) instead of
``bytes`` copies.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from schemas.loggers import logger_for
from schemas.manifest import EMBEDDING_TYPE
from schemas.results import ERROR_INPUT, ERROR_RENDER
from schemas.text import exception_text
from schemas.work import binary_views, embeds_numpy

logger = logger_for(__name__)
GROW_AFTER = 20  # good calls in a row before a batch size cut by out-of-memory splits doubles back

# How each library reports a failed device (or host) allocation, as torch raises it. torch's caching
# allocator raises torch.OutOfMemoryError ("CUDA out of memory. Tried to allocate ..."; ROCm: "HIP
# out of memory"); a CUDA runtime or driver call that cannot allocate raises "CUDA error: out of
# memory" / "CUDA driver error: out of memory" (torch.AcceleratorError); cuBLAS handle or workspace
# creation "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"; cuDNN 8
# "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", cuDNN 9 "..._INTERNAL_ERROR_HOST_ALLOCATION_FAILED" and
# "..._INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"; the CPU allocator "DefaultCPUAllocator: can't
# allocate memory". (cuDNN has no NOT_ENOUGH_WORKSPACE status: torch retries other algorithms
# itself when a workspace allocation fails, and raises OutOfMemoryError when none fits.)
OUT_OF_MEMORY_MARKERS = (
    "CUDA out of memory",
    "HIP out of memory",
    "MPS backend out of memory",
    "CUDA error: out of memory",
    "CUDA driver error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "HIPBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",
    "MIOPEN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
)


class InputError(ValueError):
    """An input that cannot be used for a row; the message names the column and the reason."""


@dataclass(frozen=True, kw_only=True)
class Call:
    """The rows of one model call: their positions in the stage's input table, their scalar values, their inputs."""

    positions: list[int]
    rows: list[dict[str, Any]]
    inputs: list[Any]


@dataclass(kw_only=True)
class Outcome:
    """What a stage call produced for its input table, per row position (None where nothing was produced)."""

    outputs: list[Any]
    errors: dict[int, tuple[str, str]]  # position -> (error_kind, message)
    seconds: list[float | None]


@dataclass(frozen=True, kw_only=True)
class _Failure:
    """What is kept of a failed call once its exception (and the frames and tensors it holds) is gone."""

    text: str  # `describe_exception`
    out_of_memory: bool
    recovered: bool  # the stage changed itself (`Stage.recover`): the same call may succeed now


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation: ``torch.OutOfMemoryError`` and kin, `MemoryError`, or a
    RuntimeError carrying one of `OUT_OF_MEMORY_MARKERS` (cuBLAS, cuDNN, CUDA runtime and driver)."""
    if isinstance(exc, MemoryError) or any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc)
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)


class Stage:
    """Base of every stage; see the module docstring. Subclasses set ``name`` and override the hooks."""

    name: ClassVar[str] = "stage"
    call_key: ClassVar[tuple[str, ...]] = ()
    buffer_columns: ClassVar[tuple[str, ...]] = ()  # binary columns handed over as numpy views, not bytes
    failure_kind: ClassVar[str] = ERROR_RENDER  # error_kind of a row the stage's call fails on
    # Whether the stage's device work can overlap its host work (see `concurrency`); the instance
    # decides for its device in `overlapping`.
    overlaps_host_work: ClassVar[bool] = False
    memory_name: str = "memory"  # what `run` allocates: "GPU memory" on CUDA (messages only)

    def __init__(self, *, max_batch_size: int | None = None, worker: str = "") -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self._configured_batch_size = max_batch_size  # what `reset` goes back to after out-of-memory splits
        self._good_calls = 0  # calls in a row that succeeded since the batch size was last cut
        self.worker = worker
        self._device_lock = threading.Lock()
        # Two calls' inputs load one call at a time (the loaders' caches are not thread-safe); either
        # may load while the other holds the device.
        self._load_lock = threading.Lock()

    @classmethod
    def concurrency(cls, device: str, **kwargs: Any) -> int:
        """How many calls one actor of this stage should run at once on a ``device`` ("cuda", "cpu"...), built with
        ``kwargs``.

        2 for a stage that `overlaps_host_work` on an accelerator (the actor's ``max_concurrency``:
        one call on the device while the other does host work), else 1. Safe to over-ask: an
        instance that does not overlap runs its calls one at a time whatever the actor accepts.
        """
        return 2 if cls.overlaps_host_work and device != "cpu" else 1

    @property
    def overlapping(self) -> bool:
        """Whether only `run` holds the device lock (see the module docstring); `ModelStage`: on CUDA."""
        return False

    # ------------------------------------------------------------------ hooks

    def wants(self, row: dict[str, Any]) -> bool:
        """Whether this stage works on ``row`` (rows with an ``error`` are never served)."""
        return True

    def alone(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` needs a model call of its own."""
        return False

    def load(self, row: dict[str, Any]) -> Any:
        """The inputs ``row`` needs (images...), loaded before its call; raises `InputError`."""
        return None

    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> Any:
        """One model call for ``call``'s rows (equal ``call_key``), under the device lock.

        Returns one output per row, in order, or something `collect` turns into that list (e.g.
        outputs still being copied off the device, so the lock is released before the copy ends).
        """
        raise NotImplementedError

    def collect(self, call: Call, produced: Any) -> list[Any]:
        """One output per row of ``call`` from what `run` returned; runs outside the device lock."""
        return produced

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """The output table for ``table`` (same rows, same order) given what the calls produced."""
        raise NotImplementedError

    def release_memory(self) -> None:
        """After an out-of-memory failure, once the failed call is gone: give cached memory back (GPU stages)."""

    def reset(self) -> None:
        """Forget what earlier calls left (an actor kept for the next run must render as a fresh one): the batch
        size goes back to the configured one; stages with caches empty them."""
        self.max_batch_size = self._configured_batch_size
        self._good_calls = 0

    def recover(self, exc: BaseException) -> bool:
        """Whether the stage changed itself so that the call that raised ``exc`` may now succeed
        (e.g. a failed compile -> eager); such a call is retried once as it was. Logs what it did."""
        return False

    def _grow_back(self) -> None:
        """After `GROW_AFTER` good calls in a row at a size cut by out-of-memory splits, double it back (up to the
        configured size)."""
        configured, current = self._configured_batch_size, self.max_batch_size
        if configured is None or current is None or current >= configured:
            return
        self._good_calls += 1
        if self._good_calls >= GROW_AFTER:
            self.max_batch_size, self._good_calls = min(configured, 2 * current), 0
            logger.info("stage %s: %d good calls in a row; batch size %d again", self.name, GROW_AFTER,
                        self.max_batch_size)  # fmt: skip

    # ------------------------------------------------------------------ the contract

    def __call__(self, table: pa.Table) -> pa.Table:
        """Map ``table`` through the stage (see the module docstring)."""
        with contextlib.nullcontext() if self.overlapping else self._device_lock:
            return self._map(table)

    def _map(self, table: pa.Table) -> pa.Table:
        arrays = {
            name: embeds_numpy(table.column(name))
            for name, field in zip(table.column_names, table.schema)
            if pa.types.is_fixed_size_list(field.type)
        }
        buffers = [name for name in self.buffer_columns if name in table.column_names]
        # Given embeddings (list<float32>) stay in the table for `finish`: never one Python float per value.
        lists = [field.name for field in table.schema if field.type == EMBEDDING_TYPE]
        rows = table.drop_columns([*arrays, *buffers, *lists]).to_pylist()
        for name in buffers:
            for row, view in zip(rows, binary_views(table.column(name))):
                row[name] = view
        n = len(rows)
        outcome = Outcome(outputs=[None] * n, errors={}, seconds=[None] * n)
        inputs: dict[int, Any] = {}
        with self._load_lock:
            for i, row in enumerate(rows):
                if row.get("error") is not None or not self.wants(row):
                    continue
                try:
                    inputs[i] = self.load(row)
                except InputError as exc:
                    outcome.errors[i] = (ERROR_INPUT, str(exc))
        for positions in self._calls(rows, sorted(inputs)):
            call = Call(positions=positions, rows=[rows[i] for i in positions], inputs=[inputs[i] for i in positions])
            self._serve(call, arrays, outcome)
        output = self.finish(table, outcome)
        if output.num_rows != n:
            raise RuntimeError(f"stage {self.name} returned {output.num_rows} rows for {n}; it must keep rows")
        return output

    def _calls(self, rows: list[dict[str, Any]], served: list[int]) -> list[list[int]]:
        """Positions of each model call: rows grouped by ``call_key``, cut to ``max_batch_size``."""

        def key(i: int) -> tuple:
            return (*(rows[i][name] for name in self.call_key), i if self.alone(rows[i]) else -1)

        calls = []
        for _, group in itertools.groupby(sorted(served, key=key), key=key):
            positions = list(group)
            size = self.max_batch_size or len(positions)
            calls.extend(positions[start : start + size] for start in range(0, len(positions), size))
        return calls

    def _attempt(self, call: Call, arrays: dict[str, np.ndarray]) -> tuple[list[Any], float] | _Failure:
        """(outputs, seconds the device section took) of one call, or what is kept of its failure."""
        try:
            with self._device_lock if self.overlapping else contextlib.nullcontext():
                started = time.perf_counter()
                produced = self.run(call, arrays)
                busy = time.perf_counter() - started
            outputs = self.collect(call, produced)
        except Exception as exc:
            # Only text and flags leave this block: the exception, its traceback and the failed call's
            # tensors are freed when it ends, before any retry allocates again.
            return _Failure(
                text=describe_exception(exc), out_of_memory=is_out_of_memory(exc), recovered=self.recover(exc)
            )
        if len(outputs) != len(call.positions):
            raise RuntimeError(f"stage {self.name}: a call returned {len(outputs)} outputs for {len(call.positions)}")
        return outputs, busy

    def _serve(self, call: Call, arrays: dict[str, np.ndarray], outcome: Outcome, *, retried: bool = False) -> None:
        """Run one call; on out-of-memory split it, on any other failure fall back to one row per call."""
        result = self._attempt(call, arrays)
        if not isinstance(result, _Failure):
            outputs, busy = result
            share = busy / len(call.positions)
            for i, output in zip(call.positions, outputs):
                outcome.outputs[i], outcome.seconds[i] = output, share
            self._grow_back()
            return
        failure, size = result, len(call.positions)
        if failure.recovered and not retried:
            self._serve(call, arrays, outcome, retried=True)
            return
        if failure.out_of_memory:
            self.release_memory()
            self._good_calls = 0
            if not retried:  # once more at the same size: the memory may have been another's passing spike
                logger.warning("stage %s: a call of %d rows ran out of %s; trying it once more", self.name, size,
                               self.memory_name)  # fmt: skip
                self._serve(call, arrays, outcome, retried=True)
                return
            if size > 1:
                half = (size + 1) // 2
                if self.max_batch_size is None or self.max_batch_size > half:
                    logger.warning(
                        "stage %s: a call of %d rows ran out of %s; batch size %d from now on",
                        self.name,
                        size,
                        self.memory_name,
                        half,
                    )
                    self.max_batch_size = half
                for part in (slice(0, half), slice(half, None)):
                    self._serve(_part(call, part), arrays, outcome)
                return
            message = f"{self.name} ran out of {self.memory_name} rendering this row alone: {failure.text}"
            outcome.errors[call.positions[0]] = (self.failure_kind, message)
            return
        if size == 1:
            outcome.errors[call.positions[0]] = (self.failure_kind, f"{self.name} failed: {failure.text}")
            return
        logger.warning(
            "stage %s: a call of %d rows failed (%s); retrying them one by one", self.name, size, failure.text
        )
        for k in range(size):
            self._serve(_part(call, slice(k, k + 1)), arrays, outcome)


def _part(call: Call, part: slice) -> Call:
    return Call(positions=call.positions[part], rows=call.rows[part], inputs=call.inputs[part])


def worker_name(extra: str = "") -> str:
    """``host:pid`` plus ``extra`` (the job adds the Ray GPU ids); recorded in every results row."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    return f"{name} {extra}".strip()


def describe_exception(exc: BaseException) -> str:
    """One line naming the exception type and message, for results rows (`schemas.text.exception_text`)."""
    return exception_text(exc)


def with_errors(table: pa.Table, errors: dict[int, tuple[str, str]]) -> pa.Table:
    """Return ``table`` with ``error``/``error_kind`` set at the given row positions."""
    if not errors:
        return table
    error = table.column("error").to_pylist()
    kind = table.column("error_kind").to_pylist()
    for position, (error_kind, message) in errors.items():
        error[position], kind[position] = message, error_kind
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(error, pa.string()))
    return table.set_column(table.schema.get_field_index("error_kind"), "error_kind", pa.array(kind, pa.string()))
