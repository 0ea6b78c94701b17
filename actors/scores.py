"""CLIP score statistics of a shard part, mergeable across shards: histogram, extremes, filtered images.

A writer counts the scores of the images it writes (`ScoreStats`); the part's summary (and the
shard's marker) holds the counts and the lowest- and highest-scoring images with previews in its
results Parquet, so the report merges shard summaries (`merge_scores`) and never reads every row.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from schemas.results import SCORE_BIN_WIDTH, SCORE_BINS, SCORE_EXTREMES, ResultRow
from schemas.shards import part_shard
from schemas.text import stored_entry

ENTRY_FIELDS = ("id", "image_index", "seed", "width", "height", "mode", "prompt", "uri", "member", "clip_score")


def empty_scores() -> dict[str, Any]:
    """The summary of no scores."""
    return {
        "count": 0,
        "sum": 0.0,
        "min": None,
        "max": None,
        "histogram": [0] * SCORE_BINS,
        "num_filtered": 0,
        "lowest": [],
        "highest": [],
    }


def score_bin(score: float) -> int:
    """Histogram bin of ``score`` (bins of `SCORE_BIN_WIDTH` points; 100 falls in the last)."""
    return min(int(score // SCORE_BIN_WIDTH), SCORE_BINS - 1)


@dataclass(eq=False, kw_only=True)
class ScoreStats:
    """Scores of one part's ok images; the `SCORE_EXTREMES` lowest and highest keep a preview."""

    count: int = 0
    total: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    num_filtered: int = 0
    low: list[tuple[float, int, ResultRow, bytes]] = field(default_factory=list)  # max-heap by -score
    high: list[tuple[float, int, ResultRow, bytes]] = field(default_factory=list)  # min-heap by score

    def add(self, result: ResultRow, preview: Callable[[], bytes]) -> None:
        """Count an ok image's score; ``preview`` makes its thumbnail if it is among the extremes."""
        score = result.clip_score
        self.count += 1
        self.total += score
        self.histogram[score_bin(score)] += 1
        self.num_filtered += bool(result.filtered)
        for heap, key in ((self.low, -score), (self.high, score)):
            item = (key, self.count, result)
            if len(heap) < SCORE_EXTREMES:
                heapq.heappush(heap, (*item, preview()))
            elif key > heap[0][0]:
                heapq.heapreplace(heap, (*item, preview()))

    def thumbnails(self) -> dict[tuple[str, int], bytes]:
        """Previews of the extremes, by (id, image_index)."""
        return {(r.id, r.image_index): thumb for _, _, r, thumb in self.low + self.high}

    def summary(self, results: str) -> dict[str, Any]:
        """The mergeable summary; ``results`` is the key of the results Parquet holding the previews."""
        if not self.count:
            return empty_scores()

        def entries(heap: list, reverse: bool) -> list[dict[str, Any]]:
            rows = sorted((r for _, _, r, _ in heap), key=lambda r: r.clip_score, reverse=reverse)
            fields = [{name: getattr(r, name) for name in ENTRY_FIELDS} | {"results": results} for r in rows]
            return [stored_entry(entry) for entry in fields]

        scores = [r.clip_score for _, _, r, _ in self.low + self.high]
        return {
            "count": self.count,
            "sum": self.total,
            "min": min(scores),
            "max": max(scores),
            "histogram": list(self.histogram),
            "num_filtered": self.num_filtered,
            "lowest": entries(self.low, reverse=False),
            "highest": entries(self.high, reverse=True),
        }


def merge_scores(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two summaries as one (counts added, extremes merged)."""
    if not b.get("count"):
        return a
    if not a.get("count"):
        return b
    return {
        "count": a["count"] + b["count"],
        "sum": a["sum"] + b["sum"],
        "min": min(a["min"], b["min"]),
        "max": max(a["max"], b["max"]),
        "histogram": [x + y for x, y in zip(a["histogram"], b["histogram"])],
        "num_filtered": a["num_filtered"] + b["num_filtered"],
        "lowest": sorted(a["lowest"] + b["lowest"], key=lambda e: e["clip_score"])[:SCORE_EXTREMES],
        "highest": sorted(a["highest"] + b["highest"], key=lambda e: -e["clip_score"])[:SCORE_EXTREMES],
    }


def replace_scores(total: dict[str, Any], shard: str, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``total`` with the summary ``old`` of ``shard`` replaced by its summary ``new`` (the shard's marker rewritten
    by a retry: its images scored before are in ``new`` too, with the same scores). Counts are exact; the extremes
    give up the shard's old entries for its new ones; min and max keep what no longer counts only when ``new`` has
    no score."""
    if not old.get("count"):
        return merge_scores(total, new)

    def others(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [entry for entry in entries if _entry_shard(entry) != shard]

    rest = {
        **total,
        "count": total["count"] - old["count"],
        "sum": total["sum"] - old["sum"],
        "histogram": [a - b for a, b in zip(total["histogram"], old["histogram"])],
        "num_filtered": total["num_filtered"] - old["num_filtered"],
        "lowest": others(total["lowest"]),
        "highest": others(total["highest"]),
    }
    return merge_scores(rest, new) if rest["count"] else new


def _entry_shard(entry: dict[str, Any]) -> str:
    """The shard whose part holds a score entry's image (from its ``results`` key, ``results/<part>.parquet``)."""
    return part_shard(str(entry.get("results", "")).rsplit("/", 1)[-1].removesuffix(".parquet"))
