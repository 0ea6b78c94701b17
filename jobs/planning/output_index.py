"""What an output holds, as a run or ``status`` knows it from the completion log: done shards, totals, the sample.

`OutputIndex` starts from the log's checkpoint (its pointer holds the output's totals, the gallery's
sample, scores and first failures; its rows, streamed, say which shards are done) and adds the markers
written after it; `jobs.planning.index_reader.read_index` builds it. A run records each marker it
publishes here (`OutputIndex.record`), and the log's compaction writes it back (`jobs.publishing.log`).
Nothing here reads results rows to know what is done.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.retry import StorageUnavailableError, retry
from actors.scores import empty_scores, merge_scores, replace_scores
from actors.storage import Storage, UnsafeObjectError
from jobs.planning.output_log import MAX_MARKER_BYTES, MarkerFolders, PartListing, RowsSource, merged_rows
from schemas.log import LogPointer, rows_table, shard_row
from schemas.loggers import logger_for
from schemas.results import RESULTS_SCHEMA, STATUS_ERROR, STATUS_OK, final_results
from schemas.shards import DATASET_FILE, DatasetSettings, Fingerprint, Marker, Part, part_attempt, part_shard
from schemas.summary import Counts, FailedImages, ImageKey, Sample
from schemas.text import one_line

logger = logger_for(__name__)


def read_settings(storage: Storage) -> DatasetSettings | None:
    """The output's pinned settings, or None for a new output (or a path that is a file, not a folder).

    ValueError naming the file when ``_dataset.json`` is there but is not the settings the job writes.
    """
    try:
        data = storage.read_bytes(DATASET_FILE, max_bytes=MAX_MARKER_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except UnsafeObjectError as exc:
        raise ValueError(f"{exc}; move it away, or choose another --output") from None
    try:
        return DatasetSettings.from_json(data)
    except ValueError as exc:
        raise ValueError(
            f"{storage.uri(DATASET_FILE)}: {exc}. This is not a kandinsky-render output as written: restore the "
            "file, or choose another --output"
        ) from None


def without_sample(marker: Marker) -> Marker:
    """``marker`` less what only the output's summary needs (gallery sample, score extremes, failures): what the
    index keeps of a recent marker."""
    return Marker(**{**marker.__dict__, "sample": (), "failed": {}, "extra": {}})


@dataclass(kw_only=True)
class OutputIndex:
    """What a run knows of its output: the log's checkpoint, the markers after it, and what they add up to.

    The done shards are the checkpoint's rows (``source``, streamed) less ``hidden`` (rows a later marker
    replaces, and damaged shards), plus ``recent``: the markers read or written since, kept without their
    samples so memory follows the markers since the last compaction, not the done shards.
    """

    output_format: str | None = None
    pointer: LogPointer | None = None  # the checkpoint trusted (None: none, or every marker was read)
    number: int = 0  # the latest checkpoint's number (its successor is the next one's)
    source: RowsSource | None = None  # rows of the shards done before `recent`
    recent: dict[str, tuple[str, Marker]] = field(default_factory=dict)  # shard -> (segment, marker less its sample)
    hidden: set[str] = field(default_factory=set)  # shards of `source` whose row does not count (replaced, damaged)
    covered: list[str] = field(default_factory=list)  # marker segments whose every marker is counted here
    flat: list[str] = field(default_factory=list)  # the flat markers counted here (outputs before the log)
    folders: MarkerFolders | None = None  # shards/ as listed at start-up
    listing: PartListing | None = None  # the parts' objects as listed at start-up (None: not listed)
    rebuilt: str | None = None  # why every marker was read (None: the checkpoint was trusted, or there was none)
    agrees: bool | None = None  # verified: whether the checkpoint held what every marker says (None: not verified)
    damaged: dict[str, str] = field(default_factory=dict)  # shards whose marker names a missing part -> what is wrong
    damaged_keys: list[str] = field(default_factory=list)  # every marker of the damaged shards (deleted by a run)
    files: dict[str, Fingerprint] = field(default_factory=dict)  # relative path -> fingerprint when rendered
    totals: Counts = field(default_factory=Counts)
    sample: Sample = field(default_factory=Sample)
    scores: dict[str, Any] = field(default_factory=empty_scores)  # CLIP scores of the output's ok images
    failed: FailedImages = field(default_factory=FailedImages)  # the first failed images per error kind
    num_done: int = 0
    num_with_errors: int = 0
    num_parts: int = 0
    spool: tempfile.TemporaryDirectory | None = None  # holds rows a rebuild or a compaction wrote locally

    @classmethod
    def from_pointer(cls, pointer: LogPointer, storage: Storage) -> OutputIndex:
        """The index of ``pointer``'s checkpoint alone."""
        return cls(
            output_format=pointer.output_format,
            pointer=pointer,
            number=pointer.number,
            source=RowsSource(storage, pointer.checkpoint, pointer.checkpoint_size),
            covered=list(pointer.segments),
            files=dict(pointer.files),
            totals=Counts.from_dict(pointer.totals),
            sample=Sample(pointer.sample),
            scores=pointer.scores or empty_scores(),
            failed=FailedImages(pointer.failed),
            num_done=pointer.num_shards,
            num_with_errors=pointer.num_with_errors,
            num_parts=pointer.num_parts,
        )

    @property
    def dirty(self) -> bool:
        """Whether the checkpoint lags what this index knows (a compaction would write a new one)."""
        return bool(self.rebuilt or self.recent or self.hidden or self.damaged)

    def count(self, marker: Marker) -> None:
        """Add a shard's marker to the totals, sample, scores, failures and counts (a shard not counted yet)."""
        self.totals.add(marker.counts)
        self.scores = merge_scores(self.scores, marker.extra.get("scores", {}))
        self.sample.add_entries(marker.sample)
        self.failed.merge(FailedImages(marker.failed))
        self.files.setdefault(marker.relpath, marker.fingerprint)
        self.num_done += 1
        self.num_with_errors += bool(marker.num_errors)
        self.num_parts += len(marker.parts)

    def replace(self, old: Marker, new: Marker) -> None:
        """Count ``new`` instead of ``old``, an earlier marker of its shard read back whole (a retry's marker found
        at start-up). Counts and scores are exact; ``old``'s gallery entries and failures give way to ``new``'s."""
        self.totals.add(old.counts, sign=-1)
        self.totals.add(new.counts)
        self.scores = replace_scores(self.scores, new.shard, old.extra.get("scores", {}), new.extra.get("scores", {}))
        # only the shard's own entries: an image a correction moved to another shard keeps that shard's entry
        self.sample.drop(
            {(entry["id"], entry["image_index"]) for entry in old.sample},
            only=lambda entry: _shard_of(entry) == new.shard,
        )
        self.sample.add_entries(new.sample)
        self.failed.drop({(row_id, index) for keys in old.failed.values() for row_id, index in keys})
        self.failed.merge(FailedImages(new.failed))
        self.num_with_errors += bool(new.num_errors) - bool(old.num_errors)
        self.num_parts += len(new.parts) - len(old.parts)

    def record(
        self,
        marker: Marker,
        segment: str,
        *,
        previous: Marker | None = None,
        added_scores: dict[str, Any] | None = None,
        replaced: Iterable[ImageKey] = (),
    ) -> None:
        """Count a marker a run published in ``segment``. A retried shard's marker replaces ``previous``:
        ``added_scores`` are its new part's scores and ``replaced`` the images it rendered again (their earlier
        gallery entries go)."""
        if previous is None:
            self.count(marker)
        else:
            self.totals.add(previous.counts, sign=-1)
            self.totals.add(marker.counts)
            self.scores = merge_scores(self.scores, added_scores)
            self.sample.drop(set(replaced))
            self.sample.add_entries(marker.sample)
            self.failed.drop(set(replaced))
            self.failed.merge(FailedImages(marker.failed))
            self.num_with_errors += bool(marker.num_errors) - bool(previous.num_errors)
            self.num_parts += len(marker.parts) - len(previous.parts)
            self.hidden.add(marker.shard)
        self.recent[marker.shard] = (segment, without_sample(marker))

    def rows(self) -> RowsSource | None:
        """The checkpoint's rows, downloaded into the index's spool folder the first time when on an object store (a
        summary never needs them; a run walks them several times)."""
        if self.source is not None and not self.source.storage.is_local:
            if self.spool is None:
                self.spool = tempfile.TemporaryDirectory(prefix="kandinsky-log-")
            self.source = self.source.copied_to(self.spool.name)
        return self.source

    def recent_rows(self) -> pa.Table:
        """The checkpoint rows of the recent markers, sorted."""
        return rows_table(shard_row(marker, segment) for segment, marker in self.recent.values())

    def done_rows(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Every done shard's checkpoint row, sorted by (relpath, start), one batch at a time."""
        return merged_rows(
            self.rows(), hidden=self.hidden | set(self.damaged) | set(self.recent), extra=self.recent_rows(),
            columns=columns,
        )  # fmt: skip


STATUSES = (STATUS_OK, STATUS_ERROR)


class UnreadablePartError(ValueError):
    """A part's results file is there but is not what the job wrote (another schema, not Parquet)."""


SHARD_RESULT_COLUMNS = ("id", "image_index", "status", "error", "error_kind", "mode", "attempt", "finished_at")
REQUIRED_RESULT_COLUMNS = ("id", "image_index", "status")  # what a results file the job wrote always has


def _shard_of(entry: Any) -> str:
    """The shard whose part a gallery entry's image is in (its ``results`` key: ``results/<part>.parquet``)."""
    return part_shard(str(entry.get("results", "")).rsplit("/", 1)[-1].removesuffix(".parquet"))


def read_part_results(storage: Storage, part: Part, *, columns: Sequence[str] | None = None) -> pa.Table:
    """One part's results (``columns`` of `RESULTS_SCHEMA`, default all), typed as `RESULTS_SCHEMA` says.

    Columns a part written by an earlier version lacks read as nulls (``attempt``: the part's own).
    """
    names = list(columns or RESULTS_SCHEMA.names)
    data = storage.read_bytes(part.results)
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        present = [name for name in names if name in parquet.schema_arrow.names]
        table = parquet.read(columns=present)
        columns = {name: table.column(name).cast(RESULTS_SCHEMA.field(name).type) for name in present}
        problem = _results_problem(parquet.schema_arrow.names, columns)
    except (pa.ArrowException, OSError) as exc:
        problem = f"{type(exc).__name__}: {one_line(str(exc), 200)}"
    if problem:
        raise UnreadablePartError(f"{storage.uri(part.results)}: not the results the job wrote ({problem})")
    arrays = []
    for name in names:
        field = RESULTS_SCHEMA.field(name)
        if name in present:
            arrays.append(columns[name])
        elif name == "attempt":
            arrays.append(pa.array(np.full(table.num_rows, part_attempt(part.name)), field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema([RESULTS_SCHEMA.field(name) for name in names]))


def _results_problem(names: list[str], columns: dict[str, pa.ChunkedArray]) -> str | None:
    """What makes a results table impossible for the job to have written: no id, index or status, or a status that
    is neither ok nor error."""
    missing = [name for name in REQUIRED_RESULT_COLUMNS if name not in names]
    if missing:
        return f"no column {', '.join(missing)}"
    status = columns.get("status")
    if status is not None and pc.all(pc.is_in(status, value_set=pa.array(STATUSES))).as_py() not in (True, None):
        return "a status other than ok or error"
    return None


def results_footer_problem(storage: Storage, part: Part, *, size: int) -> str | None:
    """Why ``part``'s results file (listed at ``size`` bytes) is not what its marker published, as its Parquet
    footer tells: not Parquet (overwritten, truncated), no id, index or status column, or another row count than
    the part's ``num_images``; None when the footer agrees.

    Reads the footer only (a ranged read or two on object stores), for ``--verify-parts`` and ``status --verify``:
    a file of the published size whose bytes changed is found so, which a listing cannot tell. Rows are not read,
    so damage inside a row group that leaves the footer whole goes unseen. `StorageUnavailableError` (the store
    kept failing) is raised, not reported: an outage must not make a done shard render again.
    """
    key = part.results
    if size <= 0:  # never a Parquet file (and a FIFO or a device lists so: it is not opened)
        return f"{key} is empty, not the results published"
    try:
        with storage.open_input(key, size=size) as handle:
            metadata = retry(lambda: pq.read_metadata(handle), what=f"read the footer of {storage.uri(key)}")
            names = metadata.schema.to_arrow_schema().names
    except StorageUnavailableError:
        raise
    except FileNotFoundError:
        return f"{key} is missing"
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: UnsafeObjectError, ArrowInvalid
        return f"{key} is not the Parquet file published ({type(exc).__name__}: {one_line(str(exc), 200)})"
    missing = [name for name in REQUIRED_RESULT_COLUMNS if name not in names]
    if missing:
        return f"{key} is not the results published (no column {', '.join(missing)})"
    if metadata.num_rows != part.num_images:
        return f"{key} holds {metadata.num_rows} results rows, {part.num_images} were published"
    return None


def read_shard_results(
    storage: Storage, parts: Sequence[Part], *, columns: Sequence[str] = SHARD_RESULT_COLUMNS
) -> pa.Table:
    """The final results of one shard over its ``parts`` (`schemas.results.final_results`), sorted by image."""
    return final_results(pa.concat_tables([read_part_results(storage, part, columns=columns) for part in parts]))
