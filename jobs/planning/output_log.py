"""Reading the completion log and the markers: the pointer, the marker segments, a checkpoint's rows, part listings.

What a start-up or ``status`` reads costs O(markers written since the last compaction), not O(done
shards) (`jobs.planning.output_index.read_index` puts it together):
- one GET of the pointer (`schemas.log.LogPointer`), which holds the output's summary;
- one listing of ``shards/`` one level deep (`MarkerFolders`): the marker segments, and the flat
  markers of outputs written before the log;
- a listing and the markers of each segment the checkpoint does not cover (`segment_keys`, `read_markers`).
A checkpoint's rows (`RowsSource`) are streamed, one batch at a time, only by those who walk every done
shard: planning (`DoneLookup`, a merge-join with the manifest's shards), compaction, ``status --all``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.retry import retry
from actors.storage import Storage, UnsafeObjectError
from schemas.keys import IMAGES_DIR, LAST_CHECKPOINT_FILE, RESULTS_DIR
from schemas.log import CHECKPOINT_SCHEMA, SORT_KEYS, LogPointer, flat_digest, part_objects
from schemas.loggers import logger_for
from schemas.results import STATUS_OK
from schemas.shards import (
    DATA_DIR,
    FORMAT_FILES,
    SEGMENT_NAME,
    SHARD_NAME,
    SHARDS_DIR,
    Marker,
    Part,
    is_own_key,
    marker_key,
    part_images_dir,
)
from schemas.text import one_line

logger = logger_for(__name__)

READ_CHUNK = 256  # markers fetched per concurrent request batch
BATCH_ROWS = 65_536  # checkpoint rows per streamed batch
COPY_CHUNK = 8 << 20  # bytes per read when a checkpoint is downloaded
# Caps on what is read of the output's own JSON files: a marker is a few KB; the pointer grows with the manifest's
# files (their fingerprints) and the segments it covers.
MAX_MARKER_BYTES = 16 << 20
MAX_POINTER_BYTES = 256 << 20


class CheckpointError(ValueError):
    """A checkpoint's rows are not what its pointer says (missing, another size, not the job's Parquet)."""


@dataclass(frozen=True)
class MarkerFolders:
    """What ``shards/`` holds one level deep: marker segments (sorted: the order they were written) and flat markers."""

    segments: list[str]
    flat: list[str]  # keys of the flat markers of outputs written before the log

    @classmethod
    def read(cls, storage: Storage) -> MarkerFolders:
        """One listing of ``shards/`` (one request per thousand entries on object stores)."""
        folders, files = storage.list_level(SHARDS_DIR)
        flat = [key for key in files if key.endswith(".json") and is_own_key(key)]
        return cls([name for name in folders if SEGMENT_NAME.fullmatch(name)], flat)

    def problem(self, pointer: LogPointer) -> str | None:
        """How these folders disagree with what ``pointer``'s checkpoint covers (a segment gone, flat markers
        added or gone), or None."""
        missing = sorted(set(pointer.segments) - set(self.segments))
        if missing:
            return f"the marker segment {missing[0]} it covers is gone"
        if len(self.flat) != pointer.flat_markers or flat_digest(self.flat) != pointer.flat_digest:
            return f"it covers {pointer.flat_markers} flat marker(s), shards/ holds {len(self.flat)} others"
        return None

    def uncovered(self, pointer: LogPointer | None) -> list[str]:
        """The segments ``pointer``'s checkpoint does not cover, in the order they were written."""
        covered = set(pointer.segments) if pointer is not None else set()
        return [segment for segment in self.segments if segment not in covered]


def read_pointer(storage: Storage) -> tuple[LogPointer | None, str | None]:
    """(the pointer, None), (None, None) when there is none, or (None, why it cannot be used)."""
    try:
        data = storage.read_bytes(LAST_CHECKPOINT_FILE, max_bytes=MAX_POINTER_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except UnsafeObjectError as exc:
        return None, str(exc)
    try:
        return LogPointer.from_json(data), None
    except ValueError as exc:
        return None, f"{LAST_CHECKPOINT_FILE}: {one_line(str(exc), 300)}"


def segment_of(key: str) -> str:
    """The segment of a marker key (``""``: a flat marker)."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 else ""


def segment_keys(storage: Storage, segment: str) -> list[str]:
    """The marker keys of ``segment`` (one listing; one request per thousand markers on object stores)."""
    keys = storage.list_files(f"{SHARDS_DIR}/{segment}", suffix=".json")
    return [key for key in keys if is_own_key(key) and segment_of(key) == segment]


def read_markers(storage: Storage, keys: Sequence[str]) -> Iterator[tuple[str, Marker]]:
    """(key, marker) of each of ``keys``, fetched ``READ_CHUNK`` at a time, concurrently; unreadable ones are skipped
    with a warning (their shard is rendered again), as are markers whose key is not their shard's."""
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start : start + READ_CHUNK]
        for key, data in zip(chunk, storage.read_many(list(chunk), max_bytes=MAX_MARKER_BYTES)):
            if data is None:
                continue
            try:
                if isinstance(data, Exception):
                    raise data
                marker = Marker.from_json(data)
                if marker_key(marker.shard, segment_of(key)) != key:
                    raise ValueError(f"it is the marker of shard {marker.shard}")
                yield key, marker
            except ValueError as exc:
                logger.warning("ignoring %s: %s (its shard will be rendered again)", key, one_line(str(exc), 300))


@dataclass(frozen=True)
class RowsSource:
    """A checkpoint's rows, sorted by (relpath, start): the object ``key`` of ``size`` bytes in ``storage`` (the
    pointer's checkpoint, or a local file a rebuild or a compaction wrote)."""

    storage: Storage
    key: str
    size: int

    def copied_to(self, folder: str) -> RowsSource:
        """This checkpoint downloaded whole into the local ``folder`` (one GET; streamed, never all in memory), so
        the walks a run makes of it (planning, checks, compaction) read it once."""
        name = self.key.rsplit("/", 1)[-1]
        local = Storage(folder)

        def download() -> None:  # idempotent: a retry writes the local copy again from its start
            with contextlib.closing(self.storage.open_input(self.key, size=self.size)) as remote:
                with open(local.path(name), "wb") as copy:
                    shutil.copyfileobj(remote, copy, COPY_CHUNK)

        try:
            retry(download, what=f"download {self.storage.uri(self.key)}")
        except (FileNotFoundError, UnsafeObjectError) as exc:
            raise CheckpointError(f"checkpoint {self.key}: {one_line(str(exc), 300)}") from None
        return RowsSource(local, name, size=self.size)

    def batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows, `BATCH_ROWS` at a time (``columns``: default all); `CheckpointError` when the object is not
        the checkpoint the pointer names."""
        try:
            handle = self.storage.open_input(self.key, size=self.size)
        except (FileNotFoundError, UnsafeObjectError) as exc:
            raise CheckpointError(f"checkpoint {self.key}: {one_line(str(exc), 300)}") from None
        with contextlib.closing(handle):
            try:
                parquet = pq.ParquetFile(handle)
                if parquet.schema_arrow.remove_metadata() != CHECKPOINT_SCHEMA:
                    raise CheckpointError(f"checkpoint {self.key}: not the schema the job writes")
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(columns) if columns else None):
                    _check_names(batch, self.key)
                    yield batch
            except (pa.ArrowException, OSError) as exc:
                raise CheckpointError(
                    f"checkpoint {self.key}: {type(exc).__name__}: {one_line(str(exc), 200)}"
                ) from None


_NAMES = {"shard": f"^{SHARD_NAME.pattern}$", "segment": f"^({SEGMENT_NAME.pattern})?$"}


def _check_names(batch: pa.RecordBatch, key: str) -> None:
    """`CheckpointError` unless every shard and segment name in ``batch`` is one the job makes (keys follow from
    them: a row must not name anything outside the output's own folders)."""
    for name, pattern in _NAMES.items():
        if name in batch.schema.names and not pc.all(pc.match_substring_regex(batch.column(name), pattern)).as_py():
            raise CheckpointError(f"checkpoint {key}: a {name} name the job does not make")


def merged_rows(
    source: RowsSource | None, *, hidden: set[str], extra: pa.Table, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """The rows of ``source`` less the shards in ``hidden``, with the rows of ``extra`` (sorted by (relpath, start),
    `CHECKPOINT_SCHEMA`) merged in: every table sorted, and all of them in order. Memory: one batch."""
    names = list(columns) if columns else CHECKPOINT_SCHEMA.names
    wanted = list(dict.fromkeys([*names, "shard", "relpath", "start"]))
    extra = extra.select(wanted)
    keys = list(zip(extra.column("relpath").to_pylist(), extra.column("start").to_pylist()))
    taken = 0
    hide = pa.array(sorted(hidden), pa.string())
    for batch in source.batches(wanted) if source is not None else ():
        table = pa.Table.from_batches([batch])
        if len(hide):
            table = table.filter(pc.invert(pc.is_in(table.column("shard"), value_set=hide)))
        if not table.num_rows:
            continue
        last = (table.column("relpath")[-1].as_py(), table.column("start")[-1].as_py())
        until = bisect.bisect_right(keys, last, lo=taken)
        if until > taken:
            table = pa.concat_tables([table, extra.slice(taken, until - taken)]).sort_by(SORT_KEYS)
            taken = until
        yield table.select(names)
    if taken < extra.num_rows:
        yield extra.slice(taken).select(names)


class DoneLookup:
    """Which manifest shards are done, asked in (relpath, start) order: a merge-join with the done rows (sorted the
    same way, streamed), so memory holds one batch whatever the number of done shards."""

    COLUMNS = ("shard", "segment", "relpath", "start", "num_errors")

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        self._tables = tables
        self._rows: list[tuple[str, int, str, str, int]] = []
        self._at = 0

    def _next(self) -> bool:
        for table in self._tables:
            if table.num_rows:
                columns = [table.column(name).to_pylist() for name in ("relpath", "start", "shard", "segment")]
                self._rows = list(zip(*columns, table.column("num_errors").to_pylist()))
                self._at = 0
                return True
        return False

    def find(self, relpath: str, start: int, shard: str) -> tuple[str, int] | None:
        """(segment of its marker, number of error images) of ``shard`` (rows ``start``... of ``relpath``) when it is
        done; None when it is not. Calls must come in (relpath, start) order."""
        while True:
            if self._at >= len(self._rows) and not self._next():
                return None
            row = self._rows[self._at]
            if (row[0], row[1]) < (relpath, start):
                self._at += 1
                continue
            if (row[0], row[1]) == (relpath, start) and row[2] == shard:
                return row[3], row[4]
            return None


@dataclass(frozen=True)
class PartListing:
    """The sizes of the objects an output's parts may name (results, data files), from one listing per folder; for
    the files format also how many PNGs each part's folder holds."""

    sizes: dict[str, int]
    pngs: dict[str, int] | None = None  # files format: part folder -> the PNGs it holds

    @classmethod
    def read(cls, storage: Storage, output_format: str) -> PartListing:
        """List ``results/`` and the format's data files (``data/``, or for the files format each part's
        ``metadata.parquet`` under ``images/``): O(objects / 1000) requests on object stores."""
        folders = [RESULTS_DIR, IMAGES_DIR if output_format == FORMAT_FILES else DATA_DIR]
        sizes: dict[str, int] = {}
        for folder in folders:
            sizes.update(storage.list_sizes(folder))
        if output_format != FORMAT_FILES:
            return cls(sizes)
        return cls(sizes, dict(collections.Counter(key.rsplit("/", 1)[0] for key in sizes if key.endswith(".png"))))

    def marker_problem(self, parts: Sequence[Part]) -> str | None:
        """`problem` of a marker's ``parts``, and for the files format a part folder holding fewer PNGs than the
        part's ok images (each is one PNG there, so one deleted is found)."""
        problem = self.problem(part_objects(parts))
        for part in parts if problem is None and self.pngs is not None else ():
            folder, published = part_images_dir(part.name), part.by_status.get(STATUS_OK, 0)
            if self.pngs.get(folder, 0) < published:
                return f"{folder}/ holds {self.pngs.get(folder, 0)} PNG(s), {published} were published"
        return problem

    def problem(self, objects: Sequence[tuple[str, int | None]]) -> str | None:
        """Why the (key, size published) ``objects`` of a shard's parts are not all there as published (a file
        missing, or of another size), or None."""
        for key, size in objects:
            found = self.sizes.get(key)
            if found is None:
                return f"{key} is missing"
            if size is not None and found != size:
                return f"{key} holds {found} bytes, {size} were published"
        return None
