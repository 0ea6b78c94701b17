"""Shards, the unit of work, output and completion: names, output keys, pinned output settings and markers.

A shard is a contiguous row range ``[start, stop)`` of one manifest file, made of whole Parquet row
groups (a row group larger than the cap is cut into ranges). Its name is a pure function of the
file's path relative to the manifest root and of the range, so reruns, increments and retries agree
on it. A shard's outputs are published whole (its data file, if the format has one, and its results
Parquet), then its marker ``shards/<segment>/<name>.json``: the shard counts as done only once the
marker exists, and a marker is never written before the data it describes is durable. Markers are
grouped in segments (one per run, a new one after each compaction of the completion log,
`schemas.log`), so a reader lists only the segments written after the log's checkpoint; outputs
written before the log hold their markers flat, ``shards/<name>.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.keys import (
    CARD_FILE,
    CONTACT_SHEET_FILE,
    GALLERY_FILE,
    HISTOGRAM_FILE,
    IMAGES_DIR,
    LAST_CHECKPOINT_FILE,
    LEASE_FILE,
    LOG_DIR,
    RESULTS_DIR,
    SAMPLE_KEY,
    STATS_FILE,
    SUCCESS_FILE,
    sample_key,
)
from schemas.pinned import PixelSettings
from schemas.records import from_json, from_mapping
from schemas.results import SCORE_BINS
from schemas.summary import Counts

FORMAT_FILES = "files"  # one PNG per image under images/ (small runs, browsing)
FORMAT_WEBDATASET = "webdataset"  # data/<shard>.tar: <key>.png + <key>.json per sample
FORMAT_PARQUET = "parquet"  # data/<shard>.parquet: the PNG bytes in a binary column
OUTPUT_FORMATS = (FORMAT_FILES, FORMAT_WEBDATASET, FORMAT_PARQUET)
DATA_SUFFIX = {FORMAT_WEBDATASET: ".tar", FORMAT_PARQUET: ".parquet"}

SHARDS_DIR = "shards"  # completion markers (and per-shard stats)
DATA_DIR = "data"  # webdataset tars / parquet data files
IMAGES_METADATA = "metadata.parquet"  # files format: the metadata of a part's PNGs, beside them
DATASET_FILE = "_dataset.json"  # the output's pinned settings
DEFAULT_SHARD_ROWS = 1_000
# The names an output's top level holds, all written by the job; nothing else in an output is the job's.
OUTPUT_FILES = (
    DATASET_FILE, SUCCESS_FILE, LEASE_FILE, CARD_FILE, STATS_FILE, GALLERY_FILE, CONTACT_SHEET_FILE, HISTOGRAM_FILE
)  # fmt: skip
OUTPUT_FOLDERS = (SHARDS_DIR, RESULTS_DIR, DATA_DIR, IMAGES_DIR, LOG_DIR)
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


def shard_name(relpath: str, start: int, stop: int) -> str:
    """``<slug>-<h8>-<start>-<stop>``: readable, sortable, and a pure function of (relative path, range).

    The slug keeps ``[A-Za-z0-9_-]`` of the path without its ``.parquet`` suffix (40 characters at
    most); 8 hex digits of the path's sha256 keep paths that share a slug apart.
    """
    if not 0 <= start < stop:
        raise ValueError(f"a shard needs 0 <= start < stop, got [{start}, {stop})")
    stem = relpath[: -len(".parquet")] if relpath.endswith(".parquet") else relpath
    slug = _SLUG.sub("_", stem).strip("_")[:40] or "manifest"
    digest = hashlib.sha256(relpath.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}-{start:010d}-{stop:010d}"


RETRY_SEPARATOR = ".retry-"
# What `shard_name` makes, and `part_name` of it: tells an output's own files from anything else under its folders.
SHARD_NAME = re.compile(r"[A-Za-z0-9_-]+-[0-9a-f]{8}-[0-9]{10}-[0-9]{10}")
PART_NAME = re.compile(SHARD_NAME.pattern + r"(\.retry-[0-9]+)?")


# A segment of markers: ``<sequence>-<run id>``, sequences growing under the lease (`schemas.log.segment_name`).
SEGMENT_NAME = re.compile(r"[0-9]{10}-[A-Za-z0-9_-]{1,64}")
CHECKPOINT_NAME = re.compile(r"checkpoint-[0-9]{10}\.parquet")  # `schemas.log.checkpoint_key`, under LOG_DIR


_OWN_KEYS = re.compile(
    rf"{SHARDS_DIR}/({SEGMENT_NAME.pattern}/)?{SHARD_NAME.pattern}\.json|{RESULTS_DIR}/{PART_NAME.pattern}\.parquet"
    rf"|{DATA_DIR}/{PART_NAME.pattern}\.(tar|parquet)"
    rf"|{IMAGES_DIR}/{PART_NAME.pattern}/({SAMPLE_KEY.pattern}\.png|{re.escape(IMAGES_METADATA)})"
    rf"|{re.escape(LAST_CHECKPOINT_FILE)}|{LOG_DIR}/{CHECKPOINT_NAME.pattern}"
)


def is_own_key(key: str) -> bool:
    """Whether ``key`` (relative to an output) is a name the job writes there: what a clean-up may delete."""
    return key in OUTPUT_FILES or _OWN_KEYS.fullmatch(key) is not None


def part_name(shard: str, attempt: int) -> str:
    """Name of a shard's output part: the shard itself, then ``<shard>.retry-<n>`` for ``--retry-errors`` runs."""
    return shard if attempt == 0 else f"{shard}{RETRY_SEPARATOR}{attempt}"


def part_shard(part: str) -> str:
    """The shard a part belongs to (inverse of `part_name`)."""
    return part.split(RETRY_SEPARATOR)[0]


def part_attempt(part: str) -> int:
    """The attempt a part is of its shard (inverse of `part_name`): 0, then n for ``<shard>.retry-<n>``."""
    _, separator, attempt = part.partition(RETRY_SEPARATOR)
    return int(attempt) if separator else 0


def marker_key(shard: str, segment: str) -> str:
    """Key of a shard's completion marker in ``segment`` (``""``: the flat layout of outputs before the log)."""
    return f"{SHARDS_DIR}/{segment}/{shard}.json" if segment else f"{SHARDS_DIR}/{shard}.json"


def results_key(part: str) -> str:
    """Key of a shard part's results Parquet."""
    return f"results/{part}.parquet"


def data_key(part: str, output_format: str) -> str:
    """Key of a shard part's data file: its tar or Parquet file, or for the files format (one PNG per image
    in ``images/<part>/``) the images' ``metadata.parquet`` beside them (what `datasets`' imagefolder reads)."""
    if output_format == FORMAT_FILES:
        return f"{part_images_dir(part)}/{IMAGES_METADATA}"
    return f"{DATA_DIR}/{part}{DATA_SUFFIX[output_format]}"


def part_images_dir(part: str) -> str:
    """The folder of a files-format part's PNGs (and their metadata file)."""
    return f"{IMAGES_DIR}/{part}"


def image_key(part: str, row_id: str, image_index: int) -> str:
    """Relative key of one image of the files format: ``images/<part>/<sample_key>.png``.

    Part names and sample keys hold only ``[A-Za-z0-9_.-]`` (no separator, no ``..``): no id leaves the folder.
    """
    return f"{part_images_dir(part)}/{sample_key(row_id, image_index)}.png"


@dataclass(frozen=True, kw_only=True)
class Fingerprint:
    """What identifies a manifest file's content without reading its rows (except, once, a local file's bytes).

    ``size`` and ``footer`` (a digest of the Parquet footer, which holds every column chunk's offset,
    size and statistics) always decide. The store's own identity of the bytes decides too when both
    fingerprints have it: ``etag`` (S3's ETag, GCS's etag), ``version`` (S3 version id, GCS
    generation: a new upload of the same bytes is a new version, so only compared with no etag) and,
    for local files, ``content`` (sha256 of the bytes). ``mtime`` is recorded, not compared: a copy
    or a ``touch`` of an unchanged file is not a change.
    """

    size: int
    footer: str
    etag: str | None = None
    mtime: str | None = None
    content: str | None = None
    version: str | None = None

    @classmethod
    def from_info(cls, info: dict[str, Any], *, footer: str, content: str | None = None) -> Fingerprint:
        """From an fsspec ``info()`` mapping (s3fs ``ETag``/``VersionId``, gcsfs ``etag``/``md5Hash``/``generation``,
        local ``mtime``) and, for a local file, the sha256 of its bytes."""
        etag = next((str(info[k]).strip('"') for k in ("ETag", "etag", "md5Hash") if info.get(k)), None)
        version = next((str(info[k]) for k in ("VersionId", "version_id", "generation") if info.get(k)), None)
        mtime = next((str(info[k]) for k in ("mtime", "LastModified", "updated", "last_modified") if info.get(k)), None)
        return cls(
            size=int(info.get("size") or 0), footer=footer, etag=etag, mtime=mtime, content=content, version=version
        )

    def differs(self, other: Fingerprint) -> str | None:
        """How ``other``'s content differs from this fingerprint's, in words; None when it is the same."""
        names = ["size", "footer", "etag", "content"]
        if self.etag is None or other.etag is None:
            names.append("version")
        changes = [
            f"{name} {getattr(self, name)} -> {getattr(other, name)}"
            for name in names
            if getattr(self, name) != getattr(other, name)
            and (name in ("size", "footer") or None not in (getattr(self, name), getattr(other, name)))
        ]
        return ", ".join(changes) or None

    def same_bytes(self, other: Fingerprint) -> bool:
        """Whether ``other`` is known to hold the same bytes: equal size and footer, and an equal etag or content
        digest (what tells a renamed file from a new one)."""
        if self.differs(other) is not None:
            return False
        return any(None not in (getattr(self, n), getattr(other, n)) for n in ("etag", "content"))


@dataclass(frozen=True, kw_only=True)
class Shard:
    """One shard: rows ``[start, stop)`` of manifest ``file`` (``relpath`` under the manifest root)."""

    file: str
    relpath: str
    start: int
    stop: int
    fingerprint: Fingerprint
    row_groups: tuple[int, ...]  # the Parquet row groups holding the range

    @property
    def name(self) -> str:
        """`shard_name` of this shard."""
        return shard_name(self.relpath, self.start, self.stop)

    @property
    def num_rows(self) -> int:
        """Manifest rows in the shard."""
        return self.stop - self.start


@dataclass(frozen=True, kw_only=True)
class Part:
    """One published output part of a shard (its first rendering, or a ``--retry-errors`` rerun of its errors)."""

    name: str
    run_id: str
    results: str  # key of the results Parquet
    data: str | None  # key of the data file (None: files format)
    num_images: int
    by_status: dict[str, int]
    # Bytes published (None in markers of earlier versions): a rerun checks the listed objects against them.
    results_size: int | None = None
    data_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class Marker:
    """``shards/<segment>/<name>.json``: a shard is done. Counts are over its final results (ok wins over error).

    ``sample`` holds the shard's gallery candidates (the lowest-ranked ok and error images, see
    `jobs.reporting.gallery`), so a report never reads every results row.
    """

    shard: str
    file: str
    relpath: str
    start: int
    stop: int
    fingerprint: Fingerprint
    output_format: str
    run_id: str  # the run that wrote this marker
    parts: tuple[Part, ...]
    num_images: int
    by_status: dict[str, int]
    by_mode: dict[str, dict[str, int]]
    errors_by_kind: dict[str, int]
    busy_seconds: dict[str, float]
    ok_busy_seconds: dict[str, float]  # over ok images only: what the stage suggestion divides by
    sample: tuple[dict[str, Any], ...] = ()
    finished_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    failed: dict[str, list[list[Any]]] = field(default_factory=dict)  # first failed images per error kind

    @property
    def num_errors(self) -> int:
        """Images of the shard whose final result is an error."""
        return self.num_images - self.by_status.get("ok", 0)

    @property
    def counts(self) -> Counts:
        """The shard's final counts as a mergeable `Counts`."""
        return Counts.from_dict(self.__dict__)

    def to_json(self) -> bytes:
        """The marker file's bytes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Marker:
        """Inverse of `to_json`; ValueError for a file that is not a marker, or one naming objects that are not its
        shard's (a part of another shard, a results path that is not the part's key: ``../``, absolute, a bucket)."""
        marker = from_json(cls, data, what="not a shard marker")
        problem = marker._problem()
        if problem:
            raise ValueError(f"not a shard marker: {problem}")
        return marker

    def _problem(self) -> str | None:
        """What makes this record impossible for a marker the job wrote, or None."""
        if not SHARD_NAME.fullmatch(self.shard) or not 0 <= self.start < self.stop:
            return f"shard {self.shard!r} rows [{self.start}, {self.stop}) is not a shard"
        if self.output_format not in OUTPUT_FORMATS or not self.parts:
            return f"output format {self.output_format!r} with {len(self.parts)} part(s)"
        results = set()
        for part in self.parts:
            expected = data_key(part.name, self.output_format)
            if not PART_NAME.fullmatch(part.name) or part_shard(part.name) != self.shard:
                return f"part {part.name!r} is not a part of shard {self.shard}"
            if part.results != results_key(part.name) or part.data not in (expected, None):
                return f"part {part.name} names {part.results!r} and {part.data!r}, not its own files"
            results.add(part.results)
        for entry in (*self.sample, *self._score_entries()):
            if not entry_ok(entry, results):
                return "a gallery entry does not name one of the shard's own images"
        for kind, keys in self.failed.items():
            if not all(len(key) == 2 and isinstance(key[0], str) and type(key[1]) is int for key in keys):
                return f"failed images of {kind!r} are not [id, image_index] pairs"
        scores = self.extra.get("scores")
        if scores is not None:
            try:
                summary = from_mapping(ScoreSummary, scores, what="scores")
            except ValueError as exc:
                return str(exc)
            if len(summary.histogram) != SCORE_BINS:
                return f"scores.histogram has {len(summary.histogram)} bins, not {SCORE_BINS}"
        return None

    def _score_entries(self) -> list[Any]:
        scores = self.extra.get("scores")
        if not isinstance(scores, dict):
            return []
        return [*(scores.get("lowest") or []), *(scores.get("highest") or [])]


@dataclass(frozen=True, kw_only=True)
class ScoreSummary:
    """The shape of a marker's ``extra.scores`` (`actors.scores`): checked when a marker is read back."""

    count: int
    sum: float
    min: float | None
    max: float | None
    histogram: list[int]
    num_filtered: int
    lowest: list[dict[str, Any]]
    highest: list[dict[str, Any]]


def entry_ok(entry: Any, results: set[str] | None) -> bool:
    """Whether a gallery or score entry names an image of the output: id, index, and its part's results (one of
    ``results``; None: any part's results key)."""
    found = entry.get("results") if isinstance(entry, dict) else None
    if results is None:
        results = {found} if isinstance(found, str) and _RESULTS_KEY.fullmatch(found) else set()
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("id"), str)
        and type(entry.get("image_index")) is int
        and found in results
        and all(isinstance(entry.get(name), (str, type(None))) for name in ("uri", "member", "status", "rank"))
        and (entry.get("rank") is None or re.fullmatch(r"[0-9a-f]{1,64}", entry["rank"]) is not None)
        and (entry.get("uri") is None or _RELATIVE_KEY.fullmatch(entry["uri"]) is not None)
    )


_RESULTS_KEY = re.compile(rf"{RESULTS_DIR}/{PART_NAME.pattern}\.parquet")
# An image's location as results rows and markers record it: a key inside the output (no protocol, no ``..``).
_RELATIVE_KEY = re.compile(r"(?!/)(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9_.=/-]+")


@dataclass(frozen=True, kw_only=True)
class DatasetSettings:
    """``_dataset.json``: what defines the shards and their outputs, pinned by the first run on an output.

    A later run with other values would cut shards differently or write another format next to the
    first, so it is refused (exit status 2) unless it starts over with ``--overwrite``. ``pixels`` pins what
    decides the images (`schemas.pinned`).
    """

    manifest: str
    output_format: str
    shard_rows: int
    ids_checked: str = ""  # digest of the manifest files whose ids were last checked for uniqueness
    pixels: PixelSettings | None = None  # what decides the pixels (`schemas.pinned`); None: pinned before it existed
    corrections_applied: str = ""  # digest of the manifest files whose corrections are all applied (corrections.md)

    def to_json(self) -> bytes:
        """The file's bytes (``corrections_applied`` only once set: outputs without corrections read as before)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "corrections_applied" or v}
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DatasetSettings:
        """Inverse of `to_json`; ValueError for a file that is not the settings of an output."""
        settings = from_json(cls, data, what="not the pinned settings of a kandinsky-render output")
        if settings.output_format not in OUTPUT_FORMATS or settings.shard_rows < 1:
            raise ValueError(
                "not the pinned settings of a kandinsky-render output: "
                f"output_format {settings.output_format!r}, shard_rows {settings.shard_rows}"
            )
        return settings

    def conflicts(self, other: DatasetSettings) -> list[str]:
        """The pinned settings ``other`` would change, in words."""
        return [
            f"{name}: {getattr(self, name)!r} (this output) vs {getattr(other, name)!r} (this run)"
            for name in ("manifest", "output_format", "shard_rows")
            if getattr(self, name) != getattr(other, name)
        ]
