"""What a published shard part adds up to: image counts, the gallery's sample, and the typed part summary.

The writer produces one `PartSummary` per part it publishes; the driver turns it into the shard's
marker (`jobs.publishing.markers`), the output's totals (`jobs.planning.output_index`) and this run's
stats (`jobs.reporting.stats`) without reading results rows again. `Counts` and `Sample` are
mergeable, so the same code counts one part, one shard, or a whole output.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.results import SAMPLE_ERRORS, SAMPLE_SIZE, STATUS_OK
from schemas.stages import TIMED_STAGES
from schemas.text import stored_id

ImageKey = tuple[str, int]  # (id, image_index)


@dataclass(kw_only=True)
class Counts:
    """Image counts: total, by status, by mode and status, errors by kind. Add, subtract and merge them."""

    num_images: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    by_mode: collections.defaultdict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    errors_by_kind: collections.Counter[str] = field(default_factory=collections.Counter)

    def count(self, *, status: str, mode: str | None, error_kind: str | None, sign: int = 1) -> None:
        """Count one image (``sign=-1``: forget one)."""
        self.num_images += sign
        self.by_status[status] += sign
        self.by_mode[str(mode)][status] += sign
        if status != STATUS_OK:
            self.errors_by_kind[str(error_kind)] += sign

    def add(self, other: Counts, *, sign: int = 1) -> None:
        """Add ``other``'s counts (``sign=-1``: subtract them)."""
        self.num_images += sign * other.num_images
        self.by_status.update({k: sign * v for k, v in other.by_status.items()})
        for mode, counts in other.by_mode.items():
            self.by_mode[mode].update({k: sign * v for k, v in counts.items()})
        self.errors_by_kind.update({k: sign * v for k, v in other.errors_by_kind.items()})

    @property
    def num_ok(self) -> int:
        """Images whose status is ok."""
        return self.by_status.get(STATUS_OK, 0)

    @property
    def num_errors(self) -> int:
        """Images whose status is an error."""
        return self.num_images - self.num_ok

    def as_dict(self) -> dict[str, Any]:
        """The form markers and stats.json hold: plain dicts, zero counts left out, keys sorted."""
        return {
            "num_images": self.num_images,
            "by_status": {k: v for k, v in sorted(self.by_status.items()) if v},
            "by_mode": {
                m: {k: v for k, v in sorted(c.items()) if v} for m, c in sorted(self.by_mode.items()) if any(c.values())
            },
            "errors_by_kind": {k: v for k, v in sorted(self.errors_by_kind.items()) if v},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        """Inverse of `as_dict` (also reads a marker's fields of the same names)."""
        counts = cls(num_images=int(data["num_images"]))
        counts.by_status.update(data["by_status"])
        for mode, by_status in data["by_mode"].items():
            counts.by_mode[mode].update(by_status)
        counts.errors_by_kind.update(data["errors_by_kind"])
        return counts


class Sample:
    """The gallery's stable sample: the `SAMPLE_SIZE` lowest-ranked ok images and `SAMPLE_ERRORS` error images.

    Ranks are `schemas.keys.sample_rank` (hex); every part and every marker keeps its own lowest
    ranks, so merging them gives exactly the sample a ranking of every image would. Entries are
    whatever the caller keeps per image (a results row, a marker's dict); one per image key. An
    image's key is its `schemas.text.stored_id` and index, so entries whose long ids were clipped
    for a marker still match the image they stand for.
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]] = ()) -> None:
        self._heaps: dict[bool, list[tuple[int, ImageKey, Any]]] = {True: [], False: []}
        self.add_entries(entries)

    def add_entries(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Offer entries that carry their own ``id``, ``image_index``, ``status`` and ``rank`` (a marker's)."""
        for entry in entries:
            key = (entry["id"], entry["image_index"])
            self.add(key=key, ok=entry["status"] == STATUS_OK, rank=entry["rank"], entry=entry)

    @staticmethod
    def _size(ok: bool) -> int:
        return SAMPLE_SIZE if ok else SAMPLE_ERRORS

    def wants(self, *, ok: bool, rank: str) -> bool:
        """Whether an image of ``rank`` would be kept (ask before making an expensive entry)."""
        heap = self._heaps[ok]
        return len(heap) < self._size(ok) or -int(rank, 16) > heap[0][0]

    def add(self, *, key: ImageKey, ok: bool, rank: str, entry: Any) -> None:
        """Offer an image; it replaces any earlier entry of the same key (a retried image)."""
        key = (stored_id(key[0]), key[1])
        self.drop({key})
        heap, item = self._heaps[ok], (-int(rank, 16), key, entry)
        if len(heap) < self._size(ok):
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    def drop(self, keys: set[ImageKey], *, only: Callable[[Any], bool] | None = None) -> None:
        """Forget the entries of these images (``only``: those of them whose entry it accepts)."""
        keys = {(stored_id(row_id), index) for row_id, index in keys}
        for ok, heap in self._heaps.items():
            kept = [item for item in heap if item[1] not in keys or (only is not None and not only(item[2]))]
            if len(kept) != len(heap):
                heapq.heapify(kept)
                self._heaps[ok] = kept

    def entries(self) -> list[Any]:
        """Every entry kept, ok images first (what a part summary and a marker store)."""
        return [item[2] for ok in (True, False) for item in self._heaps[ok]]

    def chosen(self) -> list[Any]:
        """The gallery's sample: errors first (up to `SAMPLE_ERRORS`), then ok images, by rank; sorted by image key."""
        errors = sorted(self._heaps[False], reverse=True)[:SAMPLE_ERRORS]
        oks = sorted(self._heaps[True], reverse=True)[: SAMPLE_SIZE - len(errors)]
        return [item[2] for item in sorted(errors + oks, key=lambda item: item[1])]


FAILED_EXAMPLES = 5  # failed images named per error kind (summary, stats.json, markers)


class FailedImages:
    """The first failed images per error kind: the `FAILED_EXAMPLES` smallest (id, image_index) of each.

    Mergeable like `Sample`: every part and marker keeps its own first ones, so merging them names the
    same images a sort of every failure would.
    """

    def __init__(self, by_kind: Mapping[str, Iterable[Iterable[Any]]] | None = None) -> None:
        self._by_kind: dict[str, list[ImageKey]] = {}
        for kind, keys in (by_kind or {}).items():
            for row_id, index in keys:
                self.add(kind, (row_id, int(index)))

    def add(self, kind: str | None, key: ImageKey) -> None:
        """Offer one failed image of ``kind``."""
        kept = self._by_kind.setdefault(str(kind), [])
        if key not in kept:
            kept.append(key)
            kept.sort()
            del kept[FAILED_EXAMPLES:]

    def merge(self, other: FailedImages) -> None:
        """Offer every image ``other`` names."""
        for kind, keys in other._by_kind.items():
            for key in keys:
                self.add(kind, key)

    def drop(self, keys: set[ImageKey]) -> None:
        """Forget these images (rendered again)."""
        for kind in list(self._by_kind):
            self._by_kind[kind] = [key for key in self._by_kind[kind] if key not in keys]
            if not self._by_kind[kind]:
                del self._by_kind[kind]

    def as_dict(self) -> dict[str, list[list[Any]]]:
        """``{kind: [[id, image_index], ...]}``, kinds sorted (what markers and stats.json hold)."""
        return {kind: [list(key) for key in keys] for kind, keys in sorted(self._by_kind.items())}


@dataclass(frozen=True, kw_only=True)
class PartSummary:
    """What the writer returns when it publishes a shard part: everything its marker and the stats need.

    ``busy_seconds``: per timed stage (`schemas.stages.TIMED_STAGES`), the seconds its calls spent
    on the part's images; ``ok_busy_seconds`` the same over ok images only, plus ``images``, their
    count (what the stage suggestion divides by). ``scores``: the mergeable CLIP score summary
    (`actors.scores`). ``sample``: the part's gallery candidates (`Sample` entries as dicts).
    ``failed``: its first failed images per error kind (`FailedImages`).
    """

    part: str
    shard: str
    run_id: str
    results: str  # key of the part's results Parquet
    data: str | None  # key of its data file; None for the files format
    counts: Counts
    busy_seconds: dict[str, float]
    ok_busy_seconds: dict[str, float]
    scores: dict[str, Any]
    sample: tuple[dict[str, Any], ...] = ()
    failed: dict[str, list[list[Any]]] = field(default_factory=dict)  # `FailedImages.as_dict` of its errors
    results_size: int | None = None  # bytes published of the results Parquet and of the data file
    data_size: int | None = None


def zero_seconds(*, with_images: bool = False) -> dict[str, float]:
    """Busy seconds of no work, per timed stage (and ``images``: 0 when ``with_images``)."""
    seconds = {name: 0.0 for name in TIMED_STAGES}
    return {**seconds, "images": 0} if with_images else seconds
