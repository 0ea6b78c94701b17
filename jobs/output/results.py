"""Results tables read back: every shard part under OUTPUT/results/ as one table, and the final row per image.

The writers publish one results Parquet per shard part (`actors.writer`); a run itself never reads
them all (it reads markers). These helpers serve ``kandinsky-render calibrate``, tests and users.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage
from schemas.keys import RESULTS_DIR
from schemas.results import RESULTS_SCHEMA, STATUS_OK

logger = logging.getLogger(__name__)


def read_results(storage: Storage, *, columns: list[str] | None = None) -> pa.Table:
    """Every results part under the output, concatenated (all runs and retry parts)."""
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
