"""What an output holds, read at start-up in O(shards): its pinned settings and its shards' completion markers.

A run lists ``shards/`` and reads every marker (concurrently, a few hundred bytes to a few KB each),
and lists ``results/`` and the data files to check that every part a marker names is there as it was
published; it never reads results rows to know what is done. `OutputIndex` keeps only what the run needs of
them: which shards are done, their errors and fingerprints, the output's totals and the gallery's
sample. Markers are written by `jobs.publishing.markers`, last for each shard.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.scores import empty_scores, merge_scores
from actors.storage import Storage, UnsafeObjectError
from schemas.keys import IMAGES_DIR, RESULTS_DIR
from schemas.logs import logger_for
from schemas.results import RESULTS_SCHEMA, STATUS_ERROR, STATUS_OK, final_results
from schemas.shards import (
    DATA_DIR,
    DATASET_FILE,
    FORMAT_FILES,
    SHARDS_DIR,
    DatasetSettings,
    Fingerprint,
    Marker,
    Part,
    is_own_key,
    marker_key,
    part_attempt,
)
from schemas.summary import Counts, FailedImages, ImageKey, Sample
from schemas.text import one_line

logger = logger_for(__name__)

READ_CHUNK = 256  # markers fetched per concurrent request batch


# Caps on what is read of the output's own JSON files: a marker or the settings are a few KB.
MAX_MARKER_BYTES = 16 << 20


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


def read_markers(storage: Storage) -> Iterator[Marker]:
    """Every marker under ``shards/`` (listed once, fetched ``READ_CHUNK`` at a time); unreadable ones are skipped
    with a warning (their shard is rendered again), files that are not the job's markers ignored."""
    keys = [key for key in storage.list_files(SHARDS_DIR, suffix=".json") if is_own_key(key)]
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start : start + READ_CHUNK]
        for key, data in zip(chunk, storage.read_many(chunk, max_bytes=MAX_MARKER_BYTES)):
            if data is None:
                continue
            try:
                if isinstance(data, Exception):
                    raise data
                marker = Marker.from_json(data)
                if marker_key(marker.shard) != key:
                    raise ValueError(f"it is the marker of shard {marker.shard}")
                yield marker
            except ValueError as exc:
                logger.warning("ignoring %s: %s (its shard will be rendered again)", key, one_line(str(exc), 300))


@dataclass(frozen=True)
class PartListing:
    """The sizes of the objects an output's parts may name (results, data files), from one listing per folder."""

    sizes: dict[str, int]

    @classmethod
    def read(cls, storage: Storage, output_format: str | None) -> PartListing:
        """List ``results/`` and the format's data files (``data/``, or for the files format each part's
        ``metadata.parquet`` under ``images/``): O(parts / 1000) requests on object stores."""
        folders = [RESULTS_DIR, IMAGES_DIR if output_format == FORMAT_FILES else DATA_DIR]
        sizes: dict[str, int] = {}
        for folder in folders:
            sizes.update(storage.list_sizes(folder))
        return cls(sizes)

    def problem(self, marker: Marker) -> str | None:
        """Why ``marker``'s parts are not all there as published (a file missing, or of another size), or None."""
        for part in marker.parts:
            for key, size in ((part.results, part.results_size), (part.data, part.data_size)):
                if key is None:
                    continue
                found = self.sizes.get(key)
                if found is None:
                    return f"{key} is missing"
                if size is not None and found != size:
                    return f"{key} holds {found} bytes, {size} were published"
        return None


@dataclass(kw_only=True)
class OutputIndex:
    """What a run knows about its output from the markers: done shards, totals, the gallery's sample.

    Per done shard it keeps only its fingerprint, or its whole marker when it has error images (what
    ``--retry-errors`` needs), so memory stays small per shard.
    """

    done: set[str] = field(default_factory=set)  # names of the shards with a marker whose parts are all there
    damaged: dict[str, str] = field(default_factory=dict)  # shards whose marker names a missing part -> what is wrong
    files: dict[str, Fingerprint] = field(default_factory=dict)  # relative path -> fingerprint when rendered
    with_errors: dict[str, Marker] = field(default_factory=dict)  # shards with error images (without samples)
    totals: Counts = field(default_factory=Counts)
    sample: Sample = field(default_factory=Sample)
    scores: dict[str, Any] = field(default_factory=empty_scores)  # CLIP scores of the output's ok images
    failed: FailedImages = field(default_factory=FailedImages)  # the first failed images per error kind

    @classmethod
    def read(cls, storage: Storage, *, output_format: str | None = None) -> OutputIndex:
        """From every marker of the output, each checked against the listing of the files it names: a shard whose
        part is missing (or has another size than published) is `damaged`, not done (``output_format``: the
        output's, to know where its data files are; None: markers are not checked)."""
        index = cls()
        listing = None if output_format is None else PartListing.read(storage, output_format)
        for marker in read_markers(storage):
            problem = None if listing is None else listing.problem(marker)
            if problem is None:
                index.record(marker)
            else:
                index.damaged[marker.shard] = problem
        for shard, problem in list(index.damaged.items())[:5]:
            logger.warning("shard %s is damaged (%s): it will be rendered again", shard, problem)
        return index

    def record(
        self,
        marker: Marker,
        *,
        previous: Marker | None = None,
        added_scores: dict[str, Any] | None = None,
        replaced: Iterable[ImageKey] = (),
    ) -> None:
        """Count a marker. A retried shard's marker replaces ``previous``: ``added_scores`` are its new part's
        scores and ``replaced`` the images it rendered again (their earlier gallery entries go)."""
        if previous is not None:
            self.totals.add(previous.counts, sign=-1)
        self.totals.add(marker.counts)
        self.scores = merge_scores(self.scores, marker.extra.get("scores", {}) if previous is None else added_scores)
        self.sample.drop(set(replaced))
        self.sample.add_entries(marker.sample)
        self.failed.drop(set(replaced))
        self.failed.merge(FailedImages(marker.failed))
        self.done.add(marker.shard)
        self.files.setdefault(marker.relpath, marker.fingerprint)
        self.with_errors.pop(marker.shard, None)
        if marker.num_errors:
            self.with_errors[marker.shard] = Marker(**{**marker.__dict__, "sample": ()})


STATUSES = (STATUS_OK, STATUS_ERROR)


class UnreadablePartError(ValueError):
    """A part's results file is there but is not what the job wrote (another schema, not Parquet)."""


SHARD_RESULT_COLUMNS = ("id", "image_index", "status", "error", "error_kind", "mode", "attempt", "finished_at")


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
    missing = [name for name in ("id", "image_index", "status") if name not in names]
    if missing:
        return f"no column {', '.join(missing)}"
    status = columns.get("status")
    if status is not None and pc.all(pc.is_in(status, value_set=pa.array(STATUSES))).as_py() not in (True, None):
        return "a status other than ok or error"
    return None


def read_shard_results(storage: Storage, marker: Marker, *, columns: Sequence[str] = SHARD_RESULT_COLUMNS) -> pa.Table:
    """The final results of one shard over every part (`schemas.results.final_results`), sorted by image."""
    return final_results(pa.concat_tables([read_part_results(storage, part, columns=columns) for part in marker.parts]))
