"""Output key rules and per-image seeds: pure functions of (id, image_index) and the job seed."""

from __future__ import annotations

import hashlib
import re

IMAGES_DIR = "images"
RESULTS_DIR = "results"
STATS_FILE = "stats.json"
SUCCESS_FILE = "_SUCCESS"
CARD_FILE = "README.md"  # the dataset card: how `datasets` and the Hub read the output
LEASE_FILE = "_LEASE.json"  # who renders into the output now (jobs/publishing/lease.py)
LOG_DIR = "_log"  # the completion log's checkpoints and their pointer (docs/completion-log.md)
LAST_CHECKPOINT_FILE = f"{LOG_DIR}/_last_checkpoint.json"  # the pointer: the latest checkpoint and its summary
GALLERY_FILE = "index.html"
CONTACT_SHEET_FILE = "contact_sheet.png"
HISTOGRAM_FILE = "score_histogram.png"  # --score clip: the scores' histogram, beside the gallery

# Seeds are drawn from [0, 2**62) so that seed + image_index never overflows int64.
MAX_SEED = 2**62 - 1
_SLUG_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_SLUG_LEN = 64
# What `sample_key` makes: tells an output's own images from other files in its folders.
SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]{0,64}-[0-9a-f]{16}-[0-9]+")


def id_digest(row_id: str) -> str:
    """Hex sha256 of the UTF-8 id; the collision-proof part of every output key."""
    return hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()


def sample_key(row_id: str, image_index: int) -> str:
    """The key of one output image in every format: ``<slug>-<h16>-<index>`` (no dots, no separators).

    The slug keeps only ``[A-Za-z0-9_-]`` (at most 64 characters) so that no id can produce a path
    separator, ``..``, a control character or an over-long name; the 16 hex digits of the id's sha256
    keep ids that share a slug apart. It names the PNG of the files format (`schemas.shards.image_key`),
    the members ``<key>.png`` / ``<key>.json`` of a webdataset sample, and the ``key`` column of the
    parquet format.
    """
    if image_index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index}")
    digest = id_digest(row_id)
    slug = _SLUG_CHARS.sub("_", row_id)[:_SLUG_LEN].strip("_") or "id"
    return f"{slug}-{digest[:16]}-{image_index}"


def sample_rank(row_id: str, image_index: int) -> str:
    """Where an image ranks in the gallery's stable sample: a hash of (id, image_index); lower shows first."""
    return hashlib.sha256(f"{row_id}\x00{image_index}".encode("utf-8", "surrogatepass")).hexdigest()


def default_seed(job_seed: int, row_id: str) -> int:
    """Stable seed of a row whose ``seed`` is null: a hash of (job seed, id) in [0, 2**62)."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def image_seed(row_seed: int | None, *, job_seed: int, row_id: str, image_index: int) -> int:
    """The one integer seed of output image ``image_index`` of a row (docs/architecture.md, Seeds)."""
    base = default_seed(job_seed, row_id) if row_seed is None else row_seed
    return base + image_index
