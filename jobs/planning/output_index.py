"""What an output holds, read at start-up in O(shards): its pinned settings and its shards' completion markers.

A run lists ``shards/`` and reads every marker (concurrently, a few hundred bytes to a few KB each);
it never reads results rows to know what is done. `OutputIndex` keeps only what the run needs of
them: which shards are done, their errors and fingerprints, the output's totals and the gallery's
sample. Markers are written by `jobs.publishing.markers`, last for each shard.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.scores import empty_scores, merge_scores
from actors.storage import Storage
from schemas.results import RESULTS_SCHEMA, final_results
from schemas.shards import DATASET_FILE, SHARDS_DIR, DatasetSettings, Fingerprint, Marker, Part, part_attempt
from schemas.summary import Counts, FailedImages, ImageKey, Sample

logger = logging.getLogger(__name__)

READ_CHUNK = 256  # markers fetched per concurrent request batch


def read_settings(storage: Storage) -> DatasetSettings | None:
    """The output's pinned settings, or None for a new output."""
    try:
        return DatasetSettings.from_json(storage.read_bytes(DATASET_FILE))
    except FileNotFoundError:
        return None


def read_markers(storage: Storage) -> Iterator[Marker]:
    """Every marker under ``shards/`` (listed once, fetched ``READ_CHUNK`` at a time); unreadable ones are skipped."""
    keys = storage.list_files(SHARDS_DIR, suffix=".json")
    for start in range(0, len(keys), READ_CHUNK):
        chunk = keys[start : start + READ_CHUNK]
        for key, data in zip(chunk, storage.read_many(chunk)):
            if data is None:
                continue
            try:
                yield Marker.from_json(data)
            except ValueError as exc:
                logger.warning("ignoring %s: %s (its shard will be rendered again)", key, exc)


@dataclass(kw_only=True)
class OutputIndex:
    """What a run knows about its output from the markers: done shards, totals, the gallery's sample.

    Per done shard it keeps only its fingerprint, or its whole marker when it has error images (what
    ``--retry-errors`` needs), so memory stays small per shard.
    """

    done: set[str] = field(default_factory=set)  # names of the shards with a marker
    files: dict[str, Fingerprint] = field(default_factory=dict)  # relative path -> fingerprint when rendered
    with_errors: dict[str, Marker] = field(default_factory=dict)  # shards with error images (without samples)
    totals: Counts = field(default_factory=Counts)
    sample: Sample = field(default_factory=Sample)
    scores: dict[str, Any] = field(default_factory=empty_scores)  # CLIP scores of the output's ok images
    failed: FailedImages = field(default_factory=FailedImages)  # the first failed images per error kind

    @classmethod
    def read(cls, storage: Storage) -> OutputIndex:
        """From every marker of the output."""
        index = cls()
        for marker in read_markers(storage):
            index.record(marker)
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


SHARD_RESULT_COLUMNS = ("id", "image_index", "status", "error", "error_kind", "mode", "attempt", "finished_at")


def read_part_results(storage: Storage, part: Part, *, columns: Sequence[str] | None = None) -> pa.Table:
    """One part's results (``columns`` of `RESULTS_SCHEMA`, default all), typed as `RESULTS_SCHEMA` says.

    Columns a part written by an earlier version lacks read as nulls (``attempt``: the part's own).
    """
    names = list(columns or RESULTS_SCHEMA.names)
    parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(part.results)))
    present = [name for name in names if name in parquet.schema_arrow.names]
    table = parquet.read(columns=present)
    arrays = []
    for name in names:
        field = RESULTS_SCHEMA.field(name)
        if name in present:
            arrays.append(table.column(name).cast(field.type))
        elif name == "attempt":
            arrays.append(pa.array(np.full(table.num_rows, part_attempt(part.name)), field.type))
        else:
            arrays.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema([RESULTS_SCHEMA.field(name) for name in names]))


def read_shard_results(storage: Storage, marker: Marker, *, columns: Sequence[str] = SHARD_RESULT_COLUMNS) -> pa.Table:
    """The final results of one shard over every part (`schemas.results.final_results`), sorted by image."""
    return final_results(pa.concat_tables([read_part_results(storage, part, columns=columns) for part in marker.parts]))
