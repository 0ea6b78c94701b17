"""Completion markers: what is done in an output, read at start-up in O(shards), written last for each shard.

A run lists ``shards/`` and reads every marker (concurrently, a few hundred bytes to a few KB each);
it never reads results rows to know what is done. `OutputIndex` keeps only what the run needs of
them: which shards are done, their errors and fingerprints, the output's totals and the gallery's
candidates.
"""

from __future__ import annotations

import collections
import datetime as dt
import heapq
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.scores import empty_scores, merge_scores
from actors.storage import Storage
from schemas.keys import sample_rank
from schemas.results import RESULTS_SCHEMA, SAMPLE_ERRORS, SAMPLE_SIZE, STATUS_OK
from schemas.shards import DATASET_FILE, SHARDS_DIR, DatasetSettings, Fingerprint, Marker, Part, Shard, marker_key

logger = logging.getLogger(__name__)

READ_CHUNK = 256
STAGE_SECONDS = (
    "prior",
    "decoder",
    "score",
)  # the results' per-image busy seconds, per model stage  # markers fetched per concurrent request batch


def read_settings(storage: Storage) -> DatasetSettings | None:
    """The output's pinned settings, or None for a new output."""
    try:
        return DatasetSettings.from_json(storage.read_bytes(DATASET_FILE))
    except FileNotFoundError:
        return None


def write_settings(storage: Storage, settings: DatasetSettings) -> None:
    """Pin ``settings`` in the output."""
    storage.write_bytes(DATASET_FILE, settings.to_json())


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


def write_marker(storage: Storage, marker: Marker) -> None:
    """Publish ``marker`` (after the data and results it describes are durable)."""
    storage.write_bytes(marker_key(marker.shard), marker.to_json())


@dataclass(kw_only=True)
class Counts:
    """Image counts: total, by status, by mode and status, errors by kind (mergeable)."""

    num_images: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    by_mode: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    errors_by_kind: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, source: Marker | dict[str, Any], sign: int = 1) -> None:
        """Add (or, with ``sign=-1``, remove) the counts of a marker or a part summary."""
        get = (lambda name: getattr(source, name)) if isinstance(source, Marker) else source.__getitem__
        self.num_images += sign * get("num_images")
        self.by_status.update({k: sign * v for k, v in get("by_status").items()})
        for mode, counts in get("by_mode").items():
            self.by_mode[mode].update({k: sign * v for k, v in counts.items()})
        self.errors_by_kind.update({k: sign * v for k, v in get("errors_by_kind").items()})

    def as_dict(self) -> dict[str, Any]:
        """The stats.json form: zero counts left out."""
        return {
            "num_images": self.num_images,
            "by_status": {k: v for k, v in sorted(self.by_status.items()) if v},
            "by_mode": {
                m: {k: v for k, v in sorted(c.items()) if v} for m, c in sorted(self.by_mode.items()) if any(c.values())
            },
            "errors_by_kind": {k: v for k, v in sorted(self.errors_by_kind.items()) if v},
        }


class Candidates:
    """The gallery's stable sample, merged shard by shard: the lowest-ranked ok and error images.

    Ranks are `schemas.keys.sample_rank`; every shard marker holds its own lowest ranks, so the
    global lowest ranks are always among them.
    """

    def __init__(self) -> None:
        self.ok: list[tuple[int, str, int, dict[str, Any]]] = []
        self.errors: list[tuple[int, str, int, dict[str, Any]]] = []

    def add(self, sample: Iterable[dict[str, Any]]) -> None:
        """Merge a shard's candidates; a later entry for an image replaces an earlier one (a retried shard)."""
        for entry in sample:
            key = (entry["id"], entry["image_index"])
            self.drop({key})
            ok = entry["status"] == STATUS_OK
            heap, size = (self.ok, SAMPLE_SIZE) if ok else (self.errors, SAMPLE_ERRORS)
            item = (_inverted(entry["rank"]), *key, entry)
            if len(heap) < size:
                heapq.heappush(heap, item)
            elif item[:3] > heap[0][:3]:
                heapq.heapreplace(heap, item)

    def drop(self, keys: set[tuple[str, int]]) -> None:
        """Forget candidates for these (id, image_index)."""
        for name in ("ok", "errors"):
            heap = getattr(self, name)
            kept = [item for item in heap if (item[1], item[2]) not in keys]
            if len(kept) != len(heap):
                heapq.heapify(kept)
                setattr(self, name, kept)

    def entries(self) -> list[dict[str, Any]]:
        """Every candidate kept (what a shard's marker stores)."""
        return [item[-1] for item in self.ok + self.errors]

    def chosen(self) -> list[dict[str, Any]]:
        """The sample: errors first (up to a quarter), then ok images, each group by rank; sorted by id."""
        errors = sorted((item[-1] for item in self.errors), key=lambda e: e["rank"])[:SAMPLE_ERRORS]
        oks = sorted((item[-1] for item in self.ok), key=lambda e: e["rank"])[: SAMPLE_SIZE - len(errors)]
        return sorted(errors + oks, key=lambda e: (e["id"], e["image_index"]))


def _inverted(rank: str) -> int:
    """A heap key that makes heapq's min-heap keep the lowest ranks: the negated rank."""
    return -int(rank, 16)


@dataclass(kw_only=True)
class OutputIndex:
    """What a run knows about its output from the markers: done shards, totals, gallery candidates.

    Per done shard it keeps only its fingerprint, or its whole marker when it has error images (what
    ``--retry-errors`` needs), so memory stays small per shard.
    """

    done: set[str] = field(default_factory=set)  # names of the shards with a marker
    files: dict[str, Fingerprint] = field(default_factory=dict)  # relative path -> fingerprint when rendered
    with_errors: dict[str, Marker] = field(default_factory=dict)  # shards with error images (without samples)
    totals: Counts = field(default_factory=Counts)
    candidates: Candidates = field(default_factory=Candidates)
    scores: dict[str, Any] = field(default_factory=empty_scores)  # CLIP scores of the output's ok images

    @classmethod
    def read(cls, storage: Storage) -> OutputIndex:
        """From every marker of the output."""
        index = cls()
        for marker in read_markers(storage):
            index.record(marker)
        return index

    def record(self, marker: Marker, *, previous: Marker | None = None) -> None:
        """Count a marker (replacing ``previous``, the shard's earlier marker, for a retry)."""
        if previous is not None:
            self.totals.add(previous, sign=-1)
        self.totals.add(marker)
        # A retried shard's marker holds its earlier scores too: add only the new part's (`retried_marker`).
        new = marker.extra.get("scores", {}) if previous is None else _new_scores(marker, previous)
        self.scores = merge_scores(self.scores, new)
        self.candidates.add(marker.sample)
        self.done.add(marker.shard)
        self.files.setdefault(marker.relpath, marker.fingerprint)
        self.with_errors.pop(marker.shard, None)
        if marker.num_errors:
            self.with_errors[marker.shard] = Marker(**{**marker.__dict__, "sample": ()})


def _new_scores(marker: Marker, previous: Marker) -> dict[str, Any]:
    """The scores a retried shard's marker adds to its previous one (counts subtracted; extremes kept whole)."""
    now, before = marker.extra.get("scores", {}), previous.extra.get("scores", {})
    if not now.get("count") or not before.get("count"):
        return now
    return {**now, "count": now["count"] - before["count"], "sum": now["sum"] - before["sum"],
            "histogram": [x - y for x, y in zip(now["histogram"], before["histogram"])],
            "num_filtered": now["num_filtered"] - before["num_filtered"]}  # fmt: skip


def new_marker(shard: Shard, summary: dict[str, Any], *, output_format: str) -> Marker:
    """The marker of a shard whose first part ``summary`` (`actors.writer.ShardWriter.finalize`) just published."""
    return Marker(
        shard=shard.name,
        file=shard.file,
        relpath=shard.relpath,
        start=shard.start,
        stop=shard.stop,
        fingerprint=shard.fingerprint,
        output_format=output_format,
        run_id=summary["run_id"],
        parts=(_part(summary),),
        num_images=summary["num_images"],
        by_status=summary["by_status"],
        by_mode=summary["by_mode"],
        errors_by_kind=summary["errors_by_kind"],
        busy_seconds=summary["busy_seconds"],
        ok_busy_seconds=summary["ok_busy_seconds"],
        sample=tuple(summary["sample"]),
        finished_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        extra={"scores": summary["scores"]},
    )


def _part(summary: dict[str, Any]) -> Part:
    return Part(
        name=summary["part"],
        run_id=summary["run_id"],
        results=summary["results"],
        data=summary["data"],
        num_images=summary["num_images"],
        by_status=summary["by_status"],
    )


SHARD_RESULT_COLUMNS = ["id", "image_index", "status", "error", "error_kind", "uri", "member", "seed", "width",
                        "height", "mode", "prompt", "finished_at"]  # fmt: skip


def read_shard_results(storage: Storage, marker: Marker, *, columns: list[str] | None = None) -> pa.Table:
    """The final results of one shard (every part; ok wins, else the latest error), plus the part key of each row."""
    names = columns or SHARD_RESULT_COLUMNS
    schema = pa.schema([RESULTS_SCHEMA.field(name) for name in names])
    tables = []
    for part in marker.parts:
        table = pq.read_table(io.BytesIO(storage.read_bytes(part.results)), columns=names).cast(schema)
        tables.append(table.append_column("results", pa.array([part.results] * table.num_rows, pa.string())))
    from jobs.output.results import final_results

    return final_results(pa.concat_tables(tables))


def retried_marker(storage: Storage, previous: Marker, summary: dict[str, Any]) -> Marker:
    """The marker of a shard after a ``--retry-errors`` part: counts and candidates over all its parts.

    Reads the shard's results parts (bounded by the shard's size) to recount its final results.
    """
    parts = (*previous.parts, _part(summary))
    probe = Marker(**{**previous.__dict__, "parts": parts})
    final = read_shard_results(
        storage, probe, columns=[*SHARD_RESULT_COLUMNS, *(f"{s}_seconds" for s in STAGE_SECONDS)]
    )
    counts = Counts()
    rows = final.to_pylist()
    counts.num_images = len(rows)
    for row in rows:
        counts.by_status[row["status"]] += 1
        counts.by_mode[str(row["mode"])][row["status"]] += 1
        if row["status"] != STATUS_OK:
            counts.errors_by_kind[row["error_kind"]] += 1
    candidates = Candidates()
    candidates.add(
        {
            **{k: row[k] for k in SHARD_RESULT_COLUMNS if k != "finished_at"},
            "results": row["results"],
            "rank": sample_rank(row["id"], row["image_index"]),
        }  # fmt: skip
        for row in rows
    )
    ok = final.filter(pc.equal(final.column("status"), STATUS_OK))
    busy = {
        stage: previous.busy_seconds.get(stage, 0.0) + seconds for stage, seconds in summary["busy_seconds"].items()
    }
    ok_busy = {stage: float(pc.sum(ok.column(f"{stage}_seconds")).as_py() or 0.0) for stage in STAGE_SECONDS}
    ok_busy["images"] = ok.num_rows
    summary_counts = counts.as_dict()
    return Marker(
        **{
            **previous.__dict__,
            "run_id": summary["run_id"],
            "parts": parts,
            "num_images": summary_counts["num_images"],
            "by_status": summary_counts["by_status"],
            "by_mode": summary_counts["by_mode"],
            "errors_by_kind": summary_counts["errors_by_kind"],
            "busy_seconds": busy,
            "ok_busy_seconds": ok_busy,
            "sample": tuple(candidates.entries()),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            # The retried images had no score (they were errors), so the new part's scores add exactly.
            "extra": {**previous.extra, "scores": merge_scores(previous.extra.get("scores", {}), summary["scores"])},
        }
    )
