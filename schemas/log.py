"""The completion log's records: a checkpoint's rows (one per done shard) and the pointer to the latest checkpoint.

Markers stay the truth: a shard is done when its marker exists (`schemas.shards.Marker`). The log is
a cache of them that a reader trusts in O(markers written since): like Delta Lake's ``_delta_log``, a
small pointer (``_log/_last_checkpoint.json``, `LogPointer`) names the latest checkpoint
(``_log/checkpoint-<n>.parquet``, rows of `CHECKPOINT_SCHEMA` sorted by relative path and start, so
a planner walks it beside the manifest's shards holding one batch), the marker segments it covers
whole, and what the output adds up to (counts, the gallery's sample, scores, first failures, the
manifest files' fingerprints): a summary needs the pointer alone. docs/completion-log.md has the design.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.keys import LOG_DIR
from schemas.records import from_json, from_mapping
from schemas.results import SCORE_BINS
from schemas.shards import (
    OUTPUT_FORMATS,
    SEGMENT_NAME,
    Fingerprint,
    Marker,
    Part,
    ScoreSummary,
    data_key,
    entry_ok,
    part_attempt,
    part_name,
    results_key,
)
from schemas.summary import Counts

LOG_VERSION = 1
COMPACT_EVERY = 10_000  # markers a long run publishes between two compactions (default of --compact-every)
# Parts are checked against a listing at every start-up while each folder to list holds at most this many objects
# (10 listing requests on object stores); above, only when asked (--verify-parts, status --verify).
VERIFY_MAX_OBJECTS = 10_000
PART_SIZES = pa.struct(
    [
        pa.field("results_size", pa.int64()),  # bytes published (null: a marker of an earlier version)
        pa.field("has_data", pa.bool_(), nullable=False),
        pa.field("data_size", pa.int64()),
    ]
)
# One row per done shard. Part i of a shard is `part_name(shard, i)`: its keys follow from the row.
CHECKPOINT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("segment", pa.string(), nullable=False),  # where its marker is ("": the flat layout)
        pa.field("relpath", pa.string(), nullable=False),
        pa.field("start", pa.int64(), nullable=False),
        pa.field("stop", pa.int64(), nullable=False),
        pa.field("num_images", pa.int64(), nullable=False),
        pa.field("num_errors", pa.int64(), nullable=False),
        pa.field("counts", pa.string(), nullable=False),  # `Counts.as_dict` as JSON: the shard's final counts
        pa.field("parts", pa.list_(PART_SIZES), nullable=False),
    ]
)
SORT_KEYS = [("relpath", "ascending"), ("start", "ascending")]
ROW_GROUP_ROWS = 65_536


def segment_name(sequence: int, run_id: str) -> str:
    """The name of a segment of markers: its sequence number (what orders segments), then the run that wrote it."""
    name = f"{sequence:010d}-{run_id}"
    if not SEGMENT_NAME.fullmatch(name):
        raise ValueError(f"segment {name!r}: a run id holds at most 64 of [A-Za-z0-9_-]")
    return name


def segment_sequence(segment: str) -> int:
    """The sequence number of a segment (-1: the flat markers of outputs written before the log)."""
    return int(segment.split("-", 1)[0]) if segment else -1


def checkpoint_key(number: int) -> str:
    """Key of the completion log's checkpoint ``number`` (its rows, one per done shard)."""
    return f"{LOG_DIR}/checkpoint-{number:010d}.parquet"


def shard_row(marker: Marker, segment: str) -> dict[str, Any]:
    """The checkpoint row of ``marker``, found in ``segment``."""
    return {
        "shard": marker.shard,
        "segment": segment,
        "relpath": marker.relpath,
        "start": marker.start,
        "stop": marker.stop,
        "num_images": marker.num_images,
        "num_errors": marker.num_errors,
        "counts": json.dumps(marker.counts.as_dict(), sort_keys=True),
        "parts": part_sizes(marker.parts),
    }


# A checkpoint's entry for an attempt that a shard's parts no longer hold (a shard republished without the rows a
# correction superseded starts its parts past attempt 0: `jobs.publishing.republish`): entry i stays attempt i.
GONE_PART = {"results_size": -1, "has_data": False, "data_size": None}


def part_sizes(parts: Iterable[Part]) -> list[dict[str, Any]]:
    """The checkpoint's ``parts`` entries of a marker's parts: entry i is attempt i (`GONE_PART` where none is)."""
    by_attempt = {part_attempt(part.name): part for part in parts}
    return [
        {"results_size": part.results_size, "has_data": part.data is not None, "data_size": part.data_size}
        if (part := by_attempt.get(attempt)) is not None
        else dict(GONE_PART)
        for attempt in range(max(by_attempt, default=-1) + 1)
    ]


def rows_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Checkpoint rows as a table sorted by (relpath, start)."""
    table = pa.Table.from_pylist(list(rows), schema=CHECKPOINT_SCHEMA)
    return table.sort_by(SORT_KEYS) if table.num_rows > 1 else table


def row_counts(row: dict[str, Any]) -> Counts:
    """The final counts a checkpoint row holds."""
    return Counts.from_dict(json.loads(row["counts"]))


def row_parts(row: dict[str, Any], output_format: str) -> tuple[Part, ...]:
    """The parts a checkpoint row names, as `Part` records of their keys and sizes (their run and counts are the
    marker's to tell: empty here)."""
    parts = []
    for attempt, sizes in enumerate(row["parts"]):
        if sizes["results_size"] == GONE_PART["results_size"]:
            continue
        name = part_name(row["shard"], attempt)
        parts.append(
            Part(
                name=name,
                run_id="",
                results=results_key(name),
                data=data_key(name, output_format) if sizes["has_data"] else None,
                num_images=0,
                by_status={},
                results_size=sizes["results_size"],
                data_size=sizes["data_size"],
            )  # fmt: skip
        )
    return tuple(parts)


def part_objects(parts: Iterable[Part]) -> list[tuple[str, int | None]]:
    """(key, bytes published or None) of every object ``parts`` name: results and data files."""
    found: list[tuple[str, int | None]] = []
    for part in parts:
        found.append((part.results, part.results_size))
        if part.data is not None:
            found.append((part.data, part.data_size))
    return found


def flat_digest(names: Iterable[str]) -> str:
    """sha256 over the sorted names of flat markers (outputs before the log): tells whether the set changed."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class LogPointer:
    """``_log/_last_checkpoint.json``: the latest checkpoint, what it covers, and what the output adds up to.

    ``segments``: the marker segments whose every marker the checkpoint holds; ``flat_markers`` and
    ``flat_digest``: the flat markers it holds (outputs written before the log). The rest is the
    output's summary over the checkpoint's shards: ``totals`` (`Counts.as_dict`), the gallery's
    ``sample`` (`schemas.summary.Sample` entries), ``scores`` (`actors.scores`), ``failed``
    (`schemas.summary.FailedImages.as_dict`) and ``files``, each manifest file's fingerprint.
    """

    version: int
    number: int
    checkpoint: str  # key of its rows: `checkpoint_key(number)`
    checkpoint_size: int
    output_format: str
    num_shards: int
    num_parts: int
    num_with_errors: int
    segments: tuple[str, ...]
    flat_markers: int
    flat_digest: str
    run_id: str
    written_at: str
    totals: dict[str, Any]
    sample: tuple[dict[str, Any], ...] = ()
    scores: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, list[list[Any]]] = field(default_factory=dict)
    files: dict[str, Fingerprint] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The file's bytes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LogPointer:
        """Inverse of `to_json`; ValueError for a file that is not a pointer the job wrote (of this version)."""
        pointer = from_json(cls, data, what="not the completion log's pointer")
        problem = pointer._problem()
        if problem:
            raise ValueError(f"not the completion log's pointer: {problem}")
        return pointer

    def _problem(self) -> str | None:
        if self.version != LOG_VERSION:
            return f"version {self.version}, this job reads {LOG_VERSION}"
        if self.number < 1 or self.checkpoint != checkpoint_key(self.number):
            return f"checkpoint {self.checkpoint!r} is not checkpoint number {self.number}"
        if self.output_format not in OUTPUT_FORMATS:
            return f"output format {self.output_format!r}"
        if not all(SEGMENT_NAME.fullmatch(segment) for segment in self.segments):
            return "a segment name is not one the job writes"
        if min(self.checkpoint_size, self.num_shards, self.num_parts, self.num_with_errors, self.flat_markers) < 0:
            return "a negative count"
        try:
            Counts.from_dict(self.totals)
            scores = from_mapping(ScoreSummary, self.scores, what="scores") if self.scores else None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return f"totals or scores: {exc}"
        if scores is not None and len(scores.histogram) != SCORE_BINS:
            return f"scores.histogram has {len(scores.histogram)} bins, not {SCORE_BINS}"
        entries = [*self.sample, *(scores.lowest if scores else []), *(scores.highest if scores else [])]
        if not all(entry_ok(entry, None) for entry in entries):
            return "a gallery entry does not name one of the output's images"
        for kind, keys in self.failed.items():
            if not all(len(key) == 2 and isinstance(key[0], str) and type(key[1]) is int for key in keys):
                return f"failed images of {kind!r} are not [id, image_index] pairs"
        return None
