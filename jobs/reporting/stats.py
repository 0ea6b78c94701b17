"""stats.json: what the output holds and what this run did."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import platform
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from cluster.layout import StageCosts, choose
from jobs.planning.duplicates import Duplicates
from jobs.planning.run_plan import RunPlan
from jobs.reporting.scores import score_stats
from schemas.config import JobConfig
from schemas.keys import STATS_FILE
from schemas.loggers import logger_for
from schemas.results import REFUSAL_KINDS, STATUS_OK
from schemas.stages import PRIOR, SCORE, TIMED_STAGES
from schemas.summary import Counts, FailedImages, PartSummary
from schemas.text import public_uri
from schemas.versions import installed_versions, version_mismatches

logger = logger_for(__name__)


def versions() -> dict[str, Any]:
    """Versions of the libraries that decide the pixels (and Ray's, pyarrow's); ``mismatches``: those not tested."""
    return {
        **installed_versions(),  # the packages of schemas.versions.TESTED_VERSIONS (metadata: nothing imported)
        "python": platform.python_version(),
        "ray": importlib.metadata.version("ray"),  # not `import ray` (a second): a run with nothing to do skips Ray
        "pyarrow": pa.__version__,
        "mismatches": version_mismatches(),
    }


def run_stats(
    *,
    run_id: str,
    config: JobConfig,
    plan: RunPlan,
    this_run: Counts,
    parts: list[PartSummary],
    stage_info: dict[str, Any],
    render_seconds: float,
    wall_seconds: float,
    skipped: int,
    duplicates: Duplicates | None = None,
) -> dict[str, Any]:
    """stats.json: this run (from its shard parts' summaries) next to the whole output (from the markers).

    ``output`` and ``this_run`` add ``first_failed`` (the first failed images per error kind) to their
    counts; ``duplicates`` counts this run's images that repeat another's inputs, settings and seed.
    """
    failed = FailedImages()
    for part in parts:
        failed.merge(FailedImages(part.failed))
    refused = sum(this_run.errors_by_kind.get(kind, 0) for kind in REFUSAL_KINDS)
    num_errors = this_run.num_images - this_run.by_status.get(STATUS_OK, 0)
    rendered = this_run.num_images - refused
    busy = {stage: round(sum(p.busy_seconds.get(stage, 0.0) for p in parts), 3) for stage in TIMED_STAGES}
    return {
        "run_id": run_id,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_files": [public_uri(file.uri) for file in plan.files],
        "num_rows": plan.num_rows,
        "num_shards": plan.num_shards,
        "num_shards_rendered": len(parts),
        "num_images_requested": plan.index.totals.num_images,  # every shard is done now
        "num_skipped_already_final": skipped,
        "num_refused": refused,
        "num_rendered": rendered,
        "num_errors_this_run": num_errors,
        "error_fraction_this_run": round(num_errors / this_run.num_images, 6) if this_run.num_images else 0.0,
        "render_seconds": round(render_seconds, 3),
        "images_per_s": round(rendered / render_seconds, 3) if render_seconds > 0 and rendered else 0.0,
        "wall_seconds": round(wall_seconds, 3),
        "output": {**plan.index.totals.as_dict(), "first_failed": plan.index.failed.as_dict()},
        "this_run": {**this_run.as_dict(), "first_failed": failed.as_dict()},
        "duplicates": None if duplicates is None else duplicates.as_dict(),
        "busy_seconds": busy,
        "stages": stage_info,
        "suggested_stages": suggest(parts, cluster_gpus=stage_info.get("cluster_gpus", 0.0)),
        "clip_score": score_stats(plan.index.scores, min_clip_score=config.min_clip_score),
        "num_filtered": plan.index.scores.get("num_filtered", 0),
        "settings": dataclasses.asdict(plan.settings),  # "pixels": the checkpoints, dtype, defaults and seed
        "versions": versions(),
        "config": config.to_dict(),
    }


def suggest(parts: list[PartSummary], *, cluster_gpus: float) -> dict[str, Any] | None:
    """Stage layout suggested for this cluster from this run's measured per-image stage costs (ok images)."""
    images = sum(p.ok_busy_seconds["images"] for p in parts)
    decoder = sum(p.ok_busy_seconds["decoder"] for p in parts)
    if not images or not decoder:
        return None
    prior = sum(p.ok_busy_seconds["prior"] for p in parts) / images
    score = sum(p.ok_busy_seconds.get("score", 0.0) for p in parts) / images
    decoder /= images
    measured = {
        "prior_seconds_per_image": round(prior, 6),
        "decoder_seconds_per_image": round(decoder, 6),
        "score_seconds_per_image": round(score, 6) if score else None,
        "cluster_gpus": cluster_gpus,
    }
    gpus = math.floor(cluster_gpus + 1e-9)
    if not gpus:  # on CPU every model stage shares each actor: there is nothing to split
        return measured
    costs = StageCosts(prior=prior, decoder=decoder, score=score, source="this run's measured busy seconds")
    layout = choose(num_gpus=gpus, costs=costs, clip_stages=(PRIOR.name, *((SCORE.name,) if score else ())))
    logger.info(
        "measured %.3g s/image prior, %.3g s/image decoder; for %g GPUs: %s (%s)",
        prior,
        decoder,
        gpus,
        layout.flags(),
        layout.note,
    )
    return measured | {
        "layout": layout.describe(),
        "images_per_s": round(layout.images_per_s, 3),
        "busy": {name: round(share, 3) for name, share in layout.busy.items()},
        "note": layout.note,
        "flags": layout.flags(),
    }


LAST_RENDER_KEYS = ("run_id", "finished_at", "num_rendered", "images_per_s")


def last_render(storage: Storage, stats: dict[str, Any]) -> dict[str, Any] | None:
    """The last run that rendered something (the gallery's heading): this run (``stats``) if it did, else what the
    output's stats.json says (a no-op rerun keeps the run before it); None when no run has rendered."""
    if stats.get("num_rendered"):
        return {key: stats.get(key) for key in LAST_RENDER_KEYS}
    try:
        previous = json.loads(storage.read_bytes(STATS_FILE, max_bytes=64 << 20))
    except (OSError, ValueError):  # none yet, unreadable or not JSON: nothing to carry over
        return None
    if not isinstance(previous, dict):
        return None
    last = previous.get("last_render")
    if isinstance(last, dict):
        return {key: last.get(key) for key in LAST_RENDER_KEYS}
    return {key: previous.get(key) for key in LAST_RENDER_KEYS} if previous.get("num_rendered") else None


def write_stats(storage: Storage, stats: dict[str, Any]) -> None:
    """Write ``stats.json`` under the output."""
    storage.write_bytes(STATS_FILE, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
