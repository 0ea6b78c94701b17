"""Results tables read back: every shard part under OUTPUT/results/ as one table.

The writers publish one results Parquet per shard part (`actors.writer`); a run itself never reads
them all (it reads markers). This serves ``kandinsky-render calibrate``, tests and users;
`schemas.results.final_results` reduces the table to the final row per image (for large outputs,
`jobs.reporting.status.iter_final` does that shard by shard).
"""

from __future__ import annotations

import io

import pyarrow as pa

from actors.storage import Storage
from schemas.keys import RESULTS_DIR
from schemas.loggers import logger_for
from schemas.results import RESULTS_SCHEMA, read_conformed
from schemas.shards import is_own_key

logger = logger_for(__name__)


def read_results(storage: Storage, *, columns: list[str] | None = None, absolute_uris: bool = True) -> pa.Table:
    """Every results part under the output, concatenated (all runs and retry parts).

    ``absolute_uris``: ``uri`` joined to the output's location, ready to open (``False``: relative, as stored).
    """
    keys = [key for key in storage.list_files(RESULTS_DIR, suffix=".parquet") if is_own_key(key)]
    names = columns or RESULTS_SCHEMA.names
    schema = pa.schema([RESULTS_SCHEMA.field(name) for name in names])
    tables = [read_conformed(io.BytesIO(storage.read_bytes(key)), schema) for key in keys]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return with_absolute_uris(table, storage) if absolute_uris else table


def with_absolute_uris(table: pa.Table, storage: Storage) -> pa.Table:
    """``table`` with its ``uri`` column (relative to the output, as stored) joined to the output's location."""
    if "uri" not in table.column_names:
        return table
    uris = [None if uri is None else storage.uri(uri) for uri in table.column("uri").to_pylist()]
    index = table.schema.get_field_index("uri")
    return table.set_column(index, table.schema.field(index), pa.array(uris, pa.string()))
