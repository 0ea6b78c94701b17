"""Making a shard done: its completion marker, built from the writer's part summary and written last.

A shard's marker (`schemas.shards.Marker`) is written only after its part's data and results are
durable (the writer published them before returning its `schemas.summary.PartSummary`), by the
completion log (`jobs.publishing.log`), into the run's segment. A
``--retry-errors`` part updates the shard's marker from the previous marker, the counts of the
images it re-rendered and the new part's summary: no results are read again.
"""

from __future__ import annotations

import datetime as dt

from actors.scores import merge_scores
from actors.storage import Storage
from jobs.planning.run_plan import Retried
from schemas.shards import DATASET_FILE, DatasetSettings, Marker, Part, Shard
from schemas.summary import FailedImages, PartSummary, Sample
from schemas.text import public_uri


def write_settings(storage: Storage, settings: DatasetSettings) -> None:
    """Pin ``settings`` in the output."""
    storage.write_bytes(DATASET_FILE, settings.to_json())


def part_record(summary: PartSummary) -> Part:
    """The marker's record of one published part."""
    return Part(
        name=summary.part,
        run_id=summary.run_id,
        results=summary.results,
        data=summary.data,
        num_images=summary.counts.num_images,
        by_status=summary.counts.as_dict()["by_status"],
        results_size=summary.results_size,
        data_size=summary.data_size,
    )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_marker(shard: Shard, summary: PartSummary, *, output_format: str) -> Marker:
    """The marker of a shard whose first part ``summary`` describes."""
    return Marker(
        shard=shard.name,
        file=public_uri(shard.file),
        relpath=shard.relpath,
        start=shard.start,
        stop=shard.stop,
        fingerprint=shard.fingerprint,
        output_format=output_format,
        run_id=summary.run_id,
        parts=(part_record(summary),),
        **summary.counts.as_dict(),
        busy_seconds=dict(summary.busy_seconds),
        ok_busy_seconds=dict(summary.ok_busy_seconds),
        sample=summary.sample,
        finished_at=_now(),
        extra={"scores": summary.scores},
        failed=summary.failed,
    )


def retried_marker(retried: Retried, summary: PartSummary) -> Marker:
    """The shard's marker after a ``--retry-errors`` part: its counts, seconds, sample and scores over all parts."""
    previous = retried.marker
    counts = previous.counts
    counts.add(retried.counts, sign=-1)  # the re-rendered images' earlier results no longer count ...
    counts.add(summary.counts)  # ... their new ones do
    sample = Sample(previous.sample)
    sample.drop(set(retried.keys))
    sample.add_entries(summary.sample)
    failed = FailedImages(retried.kept_failed.as_dict())  # the errors not rendered again stay; the new part's add
    failed.merge(FailedImages(summary.failed))
    busy = {stage: previous.busy_seconds.get(stage, 0.0) + s for stage, s in summary.busy_seconds.items()}
    ok_busy = {key: previous.ok_busy_seconds.get(key, 0) + s for key, s in summary.ok_busy_seconds.items()}
    return Marker(
        **{
            **previous.__dict__,
            **counts.as_dict(),
            "run_id": summary.run_id,
            "parts": (*previous.parts, part_record(summary)),
            "busy_seconds": busy,
            "ok_busy_seconds": ok_busy,
            "sample": tuple(sample.entries()),
            "failed": failed.as_dict(),
            "finished_at": _now(),
            # The re-rendered images had no score (they were errors), so the new part's scores add exactly.
            "extra": {**previous.extra, "scores": merge_scores(previous.extra.get("scores", {}), summary.scores)},
        }
    )
