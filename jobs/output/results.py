"""Results bookkeeping: buffered Parquet parts under OUTPUT/results/, read back as one table."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage
from schemas.keys import RESULTS_DIR
from schemas.results import RESULTS_SCHEMA, STATUS_OK

logger = logging.getLogger(__name__)


class ResultsWriter:
    """Appends results rows and publishes them as ``results/part-<run_id>-<n>.parquet`` objects.

    A part is written (atomically) every ``flush_rows`` rows or ``flush_seconds`` seconds and at
    `close`. Rows are only handed to the writer after their images are durable, so a results row
    never points at a missing image; a crash loses at most the unflushed rows, whose images are
    then rendered again (to the same keys) by the next run.
    """

    def __init__(self, storage: Storage, *, run_id: str, flush_rows: int = 1000, flush_seconds: float = 30.0) -> None:
        self.storage = storage
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._pending: list[pa.Table] = []
        self._num_pending = 0
        self._num_parts = 0
        self._last_flush = time.monotonic()
        self.num_written = 0

    def add(self, table: pa.Table) -> None:
        """Queue results rows (a `RESULTS_SCHEMA` table); flush when a threshold is reached."""
        if table.num_rows:
            self._pending.append(table.cast(RESULTS_SCHEMA))
            self._num_pending += table.num_rows
        if self._num_pending >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Publish the queued rows as one part; no-op when nothing is queued."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        key = f"{RESULTS_DIR}/part-{self.run_id}-{self._num_parts:06d}.parquet"
        self.storage.write_bytes(key, buffer.getvalue())
        self._num_parts += 1
        self.num_written += table.num_rows
        self._pending, self._num_pending = [], 0

    def close(self) -> None:
        """Flush what is left."""
        self.flush()


def read_results(storage: Storage, *, columns: list[str] | None = None) -> pa.Table:
    """Every results part under the output, concatenated (all runs, duplicates included)."""
    keys = storage.list_files(RESULTS_DIR, suffix=".parquet")
    names = columns or RESULTS_SCHEMA.names
    schema = pa.schema([RESULTS_SCHEMA.field(name) for name in names])
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(key)), columns=names).cast(schema) for key in keys]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def final_results(table: pa.Table) -> pa.Table:
    """One row per (id, image_index): the ``ok`` row if any, else the latest error row."""
    if table.num_rows == 0:
        return table
    rank = pc.if_else(pc.equal(table.column("status"), STATUS_OK), 1, 0)
    ranked = table.append_column("_ok", rank).sort_by(
        [("id", "ascending"), ("image_index", "ascending"), ("_ok", "descending"), ("finished_at", "descending")]
    )
    ids = ranked.column("id").to_numpy(zero_copy_only=False)
    index = ranked.column("image_index").to_numpy()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (ids[1:] != ids[:-1]) | (index[1:] != index[:-1])
    return ranked.filter(pa.array(first)).drop_columns(["_ok"])
