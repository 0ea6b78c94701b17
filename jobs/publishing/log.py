"""Publishing into the completion log: markers in segments, compacted into a checkpoint and its pointer.

A run writes each shard's marker last, as before, into a segment of its own (``shards/<segment>/``,
`schemas.log.segment_name`: sequences grow under the output's lease, so segments sort in the order
they were written). Compaction (`CompletionLog.compact`) runs at the end of a run, every
``--compact-every`` markers of a long one, and first thing in a run whose index had to read every
marker (an output written before the log, a checkpoint that disagreed, a damaged shard). It

1. writes the checkpoint's rows: the current ones, streamed, less the shards a later marker replaced
   or that are damaged, with the new markers' rows merged in; uploaded whole as ``_log/checkpoint-<n>.parquet``;
2. writes the pointer naming it and the segments it covers: the commit (a reader sees the old
   checkpoint or the new one, never half of one);
3. closes the run's segment (later markers go to a new one) and deletes checkpoints older than the
   previous one (a ``status`` may still be streaming that).

Markers stay the truth: a crash before step 2 leaves markers in segments the pointer does not cover,
which the next reader reads; a crash after it leaves a stale file the next compaction deletes.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex, without_sample
from jobs.planning.output_log import RowsSource
from schemas.keys import LAST_CHECKPOINT_FILE, LOG_DIR
from schemas.log import (
    CHECKPOINT_SCHEMA,
    COMPACT_EVERY,
    LOG_VERSION,
    ROW_GROUP_ROWS,
    LogPointer,
    checkpoint_key,
    flat_digest,
    segment_name,
    segment_sequence,
)
from schemas.loggers import logger_for
from schemas.shards import CHECKPOINT_NAME, Marker, is_own_key, marker_key
from schemas.summary import ImageKey

logger = logger_for(__name__)


class CompletionLog:
    """One run's side of the log: publishes markers into its segment and compacts ``index`` into a checkpoint."""

    def __init__(
        self,
        storage: Storage,
        index: OutputIndex,
        *,
        run_id: str,
        compact_every: int = COMPACT_EVERY,
        spool_dir: str | None = None,
    ) -> None:
        self.storage = storage
        self.index = index
        self.run_id = run_id
        self.compact_every = compact_every
        self.spool_dir = spool_dir
        self.segment: str | None = None  # the open segment (None: the next marker opens one)
        self.written: list[str] = []  # segments this run opened
        self.since = 0  # markers published since the last compaction

    def marker_key(self, shard: str) -> str:
        """Where the marker of ``shard`` goes now: in the open segment (opened here if none is)."""
        if self.segment is None:
            listed = self.index.folders.segments if self.index.folders is not None else []
            sequences = [segment_sequence(name) for name in (*listed, *self.index.covered, *self.written)]
            self.segment = segment_name(max(sequences, default=0) + 1, self.run_id)
            self.written.append(self.segment)
        return marker_key(shard, self.segment)

    def publish(
        self,
        marker: Marker,
        *,
        previous: Marker | None = None,
        added_scores: dict[str, Any] | None = None,
        replaced: Iterable[ImageKey] = (),
    ) -> str:
        """Write ``marker`` (its shard's parts are durable: the shard is done), count it, and compact every
        ``compact_every`` markers; returns its key. ``previous`` etc.: see `OutputIndex.record`."""
        key = self.marker_key(marker.shard)
        self.storage.write_bytes(key, marker.to_json())
        self.published(marker, previous=previous, added_scores=added_scores, replaced=replaced)
        return key

    def published(
        self,
        marker: Marker,
        *,
        previous: Marker | None = None,
        added_scores: dict[str, Any] | None = None,
        replaced: Iterable[ImageKey] = (),
    ) -> None:
        """Count ``marker``, written by the caller at `marker_key` (benchmarks write many at once)."""
        if self.segment is None:
            raise RuntimeError("a marker is written at marker_key (which opens its segment) before it is counted")
        self.index.record(marker, self.segment, previous=previous, added_scores=added_scores, replaced=replaced)
        self.since += 1
        if self.since >= self.compact_every:
            self.compact()

    def replace(self, marker: Marker, previous: Marker) -> str:
        """Write ``marker`` in place of ``previous``, its shard's marker read back whole (a shard republished without
        the rows a correction superseded: `jobs.publishing.republish`), and count it instead; returns its key."""
        key = self.marker_key(marker.shard)
        self.storage.write_bytes(key, marker.to_json())
        self.index.replace(previous, marker)
        self.index.hidden.add(marker.shard)
        self.index.recent[marker.shard] = (self.segment, without_sample(marker))
        return key

    def compact(self) -> LogPointer | None:
        """Write a new checkpoint and its pointer when the index knows more than the checkpoint (see the module
        docstring); returns the pointer, or None when there was nothing to write."""
        index = self.index
        if not index.dirty or index.output_format is None:
            return None
        number = index.number + 1
        if index.spool is None:
            index.spool = tempfile.TemporaryDirectory(prefix="kandinsky-log-", dir=self.spool_dir)
        name = checkpoint_key(number).rsplit("/", 1)[-1]
        local = os.path.join(index.spool.name, name)
        with pq.ParquetWriter(local, CHECKPOINT_SCHEMA, compression="zstd") as writer:
            for table in index.done_rows():
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self.storage.put_file(checkpoint_key(number), local)
        segments = [*index.covered, *(s for s in self.written if s not in index.covered)]
        pointer = LogPointer(
            version=LOG_VERSION,
            number=number,
            checkpoint=checkpoint_key(number),
            checkpoint_size=os.path.getsize(local),
            output_format=index.output_format,
            num_shards=index.num_done,
            num_parts=index.num_parts,
            num_with_errors=index.num_with_errors,
            segments=tuple(segments),
            flat_markers=len(index.flat),
            flat_digest=flat_digest(index.flat),
            run_id=self.run_id,
            written_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            totals=index.totals.as_dict(),
            sample=tuple(index.sample.entries()),
            scores=index.scores,
            failed=index.failed.as_dict(),
            files=dict(index.files),
        )
        self.storage.write_bytes(LAST_CHECKPOINT_FILE, pointer.to_json())
        previous = index.source
        rows = RowsSource(Storage(index.spool.name), name, size=pointer.checkpoint_size)
        index.pointer, index.number, index.source = pointer, number, rows
        index.recent, index.hidden, index.covered, index.rebuilt = {}, set(), list(segments), None
        if previous is not None and previous.storage.is_local and previous.storage.root == index.spool.name:
            os.remove(previous.storage.path(previous.key))  # the local copy of the checkpoint before
        self.segment, self.since = None, 0
        self._delete_stale(number)
        logger.info(
            "completion log: checkpoint %d of %s holds %d done shard(s)", number, self.storage.url, pointer.num_shards
        )
        return pointer

    def _delete_stale(self, number: int) -> None:
        """Delete the checkpoints before ``number - 1``, and any a compaction that never committed left."""
        stale = [
            key
            for key in self.storage.list_files(LOG_DIR)
            if is_own_key(key) and CHECKPOINT_NAME.fullmatch(key.rsplit("/", 1)[-1])
            and key not in (checkpoint_key(number), checkpoint_key(number - 1))
        ]  # fmt: skip
        self.storage.delete_keys(stale)
