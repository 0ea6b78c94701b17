"""Building an output's `OutputIndex`: from the completion log when it can be trusted, else from every marker.

The fast path (a start-up, a ``status``): the pointer, one listing of ``shards/``, and the segments
written after the checkpoint, O(markers since). The checkpoint is trusted only while it agrees with
what that listing shows (every segment it covers is there, the flat markers are the ones it holds);
anything else reads every marker, as outputs did before the log (`_rebuild`): an output written
before the log, a pointer that is missing or unreadable, a disagreement, a damaged shard.

Parts are checked against a listing of ``results/`` and the data files when that listing is cheap
(at most `VERIFY_MAX_OBJECTS` objects per folder, as the pointer counts them) and on every rebuild.
A damaged shard found so makes the index a rebuild: the output's summary is then exact again. When
asked (``verify``: ``render --verify-parts``, ``status --verify``) nothing is trusted: every marker is
read, every part listed and each results file's Parquet footer read (`results_footer_problem`: a file
overwritten at its published size is found so), O(parts) requests. docs/completion-log.md says why.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.planning.output_index import OutputIndex, results_footer_problem, without_sample
from jobs.planning.output_log import (
    MAX_MARKER_BYTES,
    READ_CHUNK,
    CheckpointError,
    MarkerFolders,
    PartListing,
    RowsSource,
    read_markers,
    read_pointer,
    segment_keys,
    segment_of,
)
from schemas.log import CHECKPOINT_SCHEMA, SORT_KEYS, VERIFY_MAX_OBJECTS, LogPointer, part_objects, row_parts, shard_row
from schemas.loggers import logger_for
from schemas.shards import FORMAT_FILES, Marker, Part, marker_key

logger = logger_for(__name__)

ROWS_FILE = "rows.parquet"  # a rebuild's rows, in the index's spool folder
_CHUNK_ROWS = 4_096
FOOTER_THREADS = 16  # results footers read at once on object stores (verification)


class RebuildNeeded(Exception):  # noqa: N818 - a signal, not an error: the caller reads every marker instead
    """The checkpoint cannot be trusted as it is; the message says why."""


def read_index(
    storage: Storage, *, output_format: str | None, verify: bool = False, distrust: str | None = None
) -> OutputIndex:
    """The index of the output in ``storage`` (``output_format``: its pinned format, to know where its data files
    are; None: parts are not checked). ``verify``: trust nothing, read every marker and list every part (what a
    start-up cost before the log); the index's ``agrees`` says whether the checkpoint held the same. ``distrust``:
    why the checkpoint is not to be used (every marker is read)."""
    folders = MarkerFolders.read(storage)
    pointer, problem = read_pointer(storage)
    if pointer is not None and output_format is not None and pointer.output_format != output_format:
        problem = f"the checkpoint is of format {pointer.output_format}, the output {output_format}"
    problem = distrust or problem or ("asked to verify" if verify else None)
    if pointer is not None and problem is None:
        problem = folders.problem(pointer)
        if problem is None:
            try:
                return _fast(storage, pointer, folders, output_format)
            except (RebuildNeeded, CheckpointError) as exc:
                problem = str(exc)
    if problem is None and (folders.segments or folders.flat):
        problem = "no checkpoint (an output written before the completion log)"
    if problem is not None:
        logger.info("reading every marker of %s: %s", storage.url, problem)
    number = pointer.number if pointer else 0
    index = _rebuild(storage, folders, output_format, reason=problem, number=number, verify=verify)
    if verify:
        index.agrees = pointer is not None and not folders.uncovered(pointer) and _same(pointer, index)
    return index


def _same(pointer: LogPointer, index: OutputIndex) -> bool:
    """Whether ``pointer``'s checkpoint holds what every marker says (shards, parts, counts, manifest files)."""
    found = (index.num_done, index.num_parts, index.num_with_errors, index.totals.as_dict(), index.files)
    return found == (pointer.num_shards, pointer.num_parts, pointer.num_with_errors, pointer.totals, pointer.files)


def _cheap(pointer: LogPointer, output_format: str | None) -> bool:
    """Whether listing the parts' folders is cheap (`VERIFY_MAX_OBJECTS`)."""
    data = pointer.num_parts + (pointer.totals.get("num_images", 0) if output_format == FORMAT_FILES else 0)
    return max(pointer.num_parts, data) <= VERIFY_MAX_OBJECTS


def _fast(storage: Storage, pointer: LogPointer, folders: MarkerFolders, output_format: str | None) -> OutputIndex:
    """The checkpoint, and the markers of the segments it does not cover (RebuildNeeded when it cannot be trusted)."""
    index = OutputIndex.from_pointer(pointer, storage)
    index.output_format, index.folders, index.flat = output_format or pointer.output_format, folders, folders.flat
    if output_format is not None and _cheap(pointer, output_format):
        index.listing = PartListing.read(storage, output_format)
    found: list[tuple[str, Marker]] = []
    for segment in folders.uncovered(pointer):
        for _, marker in read_markers(storage, segment_keys(storage, segment)):
            problem = index.listing.marker_problem(marker.parts) if index.listing else None
            if problem is not None:
                raise RebuildNeeded(f"shard {marker.shard} is damaged ({problem})")
            found.append((segment, marker))
        index.covered.append(segment)
    earlier = _earlier_rows(index, {marker.shard for _, marker in found})
    for segment, marker in found:
        if marker.shard in index.recent or marker.shard in earlier:
            before = index.recent[marker.shard][0] if marker.shard in index.recent else earlier[marker.shard]
            index.replace(_read_marker(storage, marker_key(marker.shard, before)), marker)
            index.hidden.add(marker.shard)
        else:
            index.count(marker)
        index.recent[marker.shard] = (segment, without_sample(marker))
    if index.listing is not None:
        _check_parts(index)
    return index


def _earlier_rows(index: OutputIndex, shards: set[str]) -> dict[str, str]:
    """shard -> segment of the checkpoint rows of ``shards`` (one pass over the rows' names, when there are any)."""
    found: dict[str, str] = {}
    source = index.rows() if shards else None
    if source is None:
        return found
    wanted = pa.array(sorted(shards), pa.string())
    for batch in source.batches(["shard", "segment"]):
        table = pa.Table.from_batches([batch])
        table = table.filter(pc.is_in(table.column("shard"), value_set=wanted))
        found.update(zip(table.column("shard").to_pylist(), table.column("segment").to_pylist()))
    return found


def _read_marker(storage: Storage, key: str) -> Marker:
    """The marker at ``key``, read whole (RebuildNeeded when it is gone or unreadable: the log disagrees)."""
    try:
        return Marker.from_json(storage.read_bytes(key, max_bytes=MAX_MARKER_BYTES))
    except (FileNotFoundError, ValueError) as exc:
        raise RebuildNeeded(f"{key}, which the checkpoint holds, cannot be read ({exc})") from None


def _check_parts(index: OutputIndex) -> None:
    """Every checkpoint row's parts against the listing (RebuildNeeded at the first damaged shard)."""
    listing, output_format = index.listing, index.output_format or ""
    for table in index.done_rows(["shard", "parts"]):
        for row in table.to_pylist():
            problem = listing.problem(part_objects(row_parts(row, output_format))) if listing else None
            if problem is not None:
                raise RebuildNeeded(f"shard {row['shard']} is damaged ({problem})")


def _with_footers(
    storage: Storage, index: OutputIndex, markers: Iterator[tuple[str, Marker]], seen: set[str], *, verify: bool
) -> Iterator[tuple[str, Marker, str | None]]:
    """(key, marker, why a results file of its parts is damaged, or None) of each of ``markers``.

    Only when ``verify``: the footers of the markers that count (the first of a shard not in ``seen``, the
    caller's set as it grows, whose parts the listing shows as published) are read, `READ_CHUNK` markers at a
    time, concurrently on object stores (`results_footer_problem`). Otherwise nothing more is read.
    """
    if not verify or index.listing is None:
        yield from ((key, marker, None) for key, marker in markers)
        return
    while chunk := list(itertools.islice(markers, READ_CHUNK)):
        problems = _footer_problems(storage, index.listing, chunk, seen)
        yield from ((key, marker, problems.get(key)) for key, marker in chunk)


def _footer_problems(
    storage: Storage, listing: PartListing, chunk: list[tuple[str, Marker]], seen: set[str]
) -> dict[str, str]:
    """marker key -> the first problem `results_footer_problem` finds in its parts' results, over the markers of
    ``chunk`` that count (see `_with_footers`)."""
    first: dict[str, tuple[str, Marker]] = {}
    for key, marker in chunk:
        if marker.shard not in seen and marker.shard not in first:
            first[marker.shard] = (key, marker)
    checks = [
        (key, part)
        for key, marker in first.values()
        if listing.marker_problem(marker.parts) is None
        for part in marker.parts
    ]

    def check(item: tuple[str, Part]) -> tuple[str, str | None]:
        key, part = item
        return key, results_footer_problem(storage, part, size=listing.sizes[part.results])

    if storage.is_local or len(checks) < 2:
        found = [check(item) for item in checks]
    else:
        with ThreadPoolExecutor(max_workers=FOOTER_THREADS, thread_name_prefix="footers") as pool:
            found = list(pool.map(check, checks))
    problems: dict[str, str] = {}
    for key, problem in found:
        if problem is not None:
            problems.setdefault(key, problem)
    return problems


def _rebuild(
    storage: Storage,
    folders: MarkerFolders,
    output_format: str | None,
    *,
    reason: str | None,
    number: int,
    verify: bool = False,
) -> OutputIndex:
    """Every marker, newest first (a later marker of a shard replaces an earlier one), checked against a listing
    of the parts (``verify``: and against their results files' footers, `results_footer_problem`); the rows go to
    a local file, sorted, that stands for the checkpoint."""
    index = OutputIndex(output_format=output_format, number=number, folders=folders, rebuilt=reason)
    if output_format is not None:
        index.listing = PartListing.read(storage, output_format)
    seen: set[str] = set()
    chunks: list[pa.Table] = []
    rows: list[dict] = []
    remaining: dict[str, int] = {}
    for segment in [*reversed(folders.segments), ""]:
        keys = segment_keys(storage, segment) if segment else folders.flat
        remaining[segment] = len(keys)
        for key, marker, footer in _with_footers(storage, index, read_markers(storage, keys), seen, verify=verify):
            if marker.shard in seen:
                if marker.shard in index.damaged:
                    index.damaged_keys.append(key)
                continue
            seen.add(marker.shard)
            problem = index.listing.marker_problem(marker.parts) if index.listing else None
            problem = problem or footer
            if problem is not None:
                index.damaged[marker.shard] = problem
                index.damaged_keys.append(key)
                continue
            index.count(marker)
            rows.append(shard_row(marker, segment))
            if len(rows) >= _CHUNK_ROWS:
                chunks.append(pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA))
                rows = []
    chunks.append(pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA))
    for key in index.damaged_keys:  # what remains once the damaged shards' markers are deleted
        remaining[segment_of(key)] -= 1
    index.covered = [segment for segment in folders.segments if remaining[segment] > 0]
    index.flat = sorted(set(folders.flat) - set(index.damaged_keys))
    for shard, problem in list(index.damaged.items())[:5]:
        logger.warning("shard %s is damaged (%s): it will be rendered again", shard, problem)
    table = pa.concat_tables(chunks)
    if table.num_rows:
        index.spool = tempfile.TemporaryDirectory(prefix="kandinsky-log-")
        spool = Storage(index.spool.name)
        pq.write_table(table.sort_by(SORT_KEYS), spool.path(ROWS_FILE))
        index.source = RowsSource(spool, ROWS_FILE, size=spool.list_sizes("")[ROWS_FILE])
    return index
