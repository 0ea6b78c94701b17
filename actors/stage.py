"""The stage contract: how a model stage groups rows into calls, falls back row by row, times calls, keeps rows.

A stage (prior, decoder, depth, ...) is one file holding a subclass of `Stage` that says only what is
particular to its model: its ``name``, its ``call_key`` (columns equal across one model call), which
rows it serves (`wants`), how it loads a row's inputs (`load`), one model call (`run`) and how its
outputs become the output table (`finish`). Everything else is written once, here:

- rows already carrying an ``error`` pass through, as do rows the stage does not serve;
- served rows are grouped by ``call_key`` (rows a stage marks `alone` get a call each), in a
  deterministic order, and cut into calls of at most ``max_batch_size`` rows;
- an input that cannot be loaded makes that row an ``input_error``;
- a call that runs out of accelerator memory is split in halves and retried, and the smaller size
  is kept for the rest of the run, before any row is given up;
- any other failing call is retried row by row, so only the bad row becomes ``render_failed``;
- each row's ``seconds`` is its share of its call's wall time;
- the output must have exactly the input's rows, in order (checked).

Fixed-size list columns (embeddings) reach `run` as 2-D numpy arrays (``arrays``), never as
per-float Python objects; every other column reaches it as the row dicts of `Call.rows`. Binary
columns a stage names in ``buffer_columns`` (decoded ``pixels``: 1.77 MB per 768x768 image) reach
the hooks' row dicts as read-only uint8 numpy views of the Arrow buffers (None where null) instead of
``bytes`` copies. A call that fails for one row makes that row a ``failure_kind`` error.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from schemas.manifest import EMBEDDING_TYPE
from schemas.results import ERROR_INPUT, ERROR_RENDER
from schemas.text import exception_text
from schemas.work import binary_views, embeds_numpy

logger = logging.getLogger(__name__)


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (``torch.cuda.OutOfMemoryError`` and kin)."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


class Stage:
    """Base of every stage; see the module docstring. Subclasses set ``name`` and override the hooks."""

    name: ClassVar[str] = "stage"
    call_key: ClassVar[tuple[str, ...]] = ()
    buffer_columns: ClassVar[tuple[str, ...]] = ()  # binary columns handed over as numpy views, not bytes
    failure_kind: ClassVar[str] = ERROR_RENDER  # error_kind of a row the stage's call fails on

    def __init__(self, *, max_batch_size: int | None = None, worker: str = "") -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.worker = worker

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

    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[Any]:
        """One model call for ``call``'s rows (equal ``call_key``); one output per row, in order."""
        raise NotImplementedError

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """The output table for ``table`` (same rows, same order) given what the calls produced."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the contract

    def __call__(self, table: pa.Table) -> pa.Table:
        """Map ``table`` through the stage (see the module docstring)."""
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

    def _serve(self, call: Call, arrays: dict[str, np.ndarray], outcome: Outcome) -> None:
        """Run one call; on out-of-memory split it, on any other failure fall back to one row per call."""
        started = time.perf_counter()
        try:
            outputs = self.run(call, arrays)
        except Exception as exc:
            if is_out_of_memory(exc) and len(call.positions) > 1:
                half = (len(call.positions) + 1) // 2
                if self.max_batch_size is None or self.max_batch_size > half:
                    logger.warning(
                        "stage %s: a call of %d rows ran out of memory; batch size %d from now on",
                        self.name,
                        len(call.positions),
                        half,
                    )
                    self.max_batch_size = half
                for part in (slice(0, half), slice(half, None)):
                    self._serve(_part(call, part), arrays, outcome)
                return
            if len(call.positions) == 1:
                message = f"{self.name} failed: {describe_exception(exc)}"
                outcome.errors[call.positions[0]] = (self.failure_kind, message)
                return
            logger.warning(
                "stage %s: a call of %d rows failed (%s); retrying them one by one",
                self.name,
                len(call.positions),
                describe_exception(exc),
            )
            for k in range(len(call.positions)):
                self._serve(_part(call, slice(k, k + 1)), arrays, outcome)
            return
        if len(outputs) != len(call.positions):
            raise RuntimeError(f"stage {self.name}: a call returned {len(outputs)} outputs for {len(call.positions)}")
        share = (time.perf_counter() - started) / len(call.positions)
        for i, output in zip(call.positions, outputs):
            outcome.outputs[i], outcome.seconds[i] = output, share


def _part(call: Call, part: slice) -> Call:
    return Call(positions=call.positions[part], rows=call.rows[part], inputs=call.inputs[part])


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
