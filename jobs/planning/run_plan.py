"""The plan of a run over shards: which shards to render now, streamed one shard's rows at a time.

Start-up reads the manifest files' footers and the output's markers, never results rows: O(files +
shards). `RunPlan.works` then reads, validates and plans one pending shard at a time, so the driver's
memory follows the shards in flight, not the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.storage import Storage
from cluster.defaults import Choice, Machine
from jobs.planning.batches import batch
from jobs.planning.checkpoints import CheckpointScales
from jobs.planning.corrections import check_all_ids, check_gone_ids, ordered
from jobs.planning.duplicates import DuplicateImages
from jobs.planning.ids import check_ids, files_digest
from jobs.planning.index_reader import read_index
from jobs.planning.machine import local_machine, machine_defaults
from jobs.planning.manifests import (
    ManifestFile,
    ShardReader,
    cut_shards,
    read_whole,
    with_content_digest,
)
from jobs.planning.output_guard import check_output
from jobs.planning.output_index import OutputIndex, read_settings, read_shard_results, without_sample
from jobs.planning.output_log import CheckpointError, DoneLookup, read_markers
from jobs.planning.pinning import check_pinned, wanted, with_pinned
from jobs.planning.run_settings import read_manifest_files, run_settings
from jobs.planning.scan import DEPTH_MODEL, PRIOR_MODEL, PendingScan, scan_pending
from jobs.planning.work import PLAN_CHUNK_ROWS, Work, shard_work
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.manifest import ManifestError
from schemas.modes import MODES
from schemas.pinned import PixelSettings
from schemas.results import REFUSAL_KINDS, STATUS_OK
from schemas.shards import (
    DatasetSettings,
    Fingerprint,
    Marker,
    Shard,
    marker_key,
    part_attempt,
    part_name,
)
from schemas.summary import Counts, FailedImages, ImageKey
from schemas.text import public_uri
from schemas.work import WORK_SCHEMA

logger = logger_for(__name__)

# Rows `RunPlan.confirm` may plan before it counts every model not yet confirmed as needed (bounds start-up).
CONFIRM_ROWS = 100_000


@dataclass(frozen=True, kw_only=True)
class Retried:
    """What a ``--retry-errors`` part renders again of a finished shard: its marker and the images' earlier counts.

    Images whose earlier error was a refusal that this run makes again, word for word (`REFUSAL_KINDS`:
    the row cannot succeed with these settings), are not rendered again: their earlier row stays final.
    """

    marker: Marker  # the shard's marker before this part (with its gallery sample)
    counts: Counts  # the earlier final results of the images rendered again
    keys: frozenset[ImageKey]  # the images rendered again
    kept_failed: FailedImages = field(default_factory=FailedImages)  # errors that stay final (repeated refusals)


@dataclass(frozen=True, kw_only=True)
class ShardWork:
    """One shard to render in this run: its part (first rendering, or a retry of its errors) and its work."""

    shard: Shard
    part: str
    work: Work
    retried: Retried | None = None  # set for a --retry-errors part


@dataclass(kw_only=True)
class RunPlan:
    """What a run over ``files`` will do, given the output's ``index`` (see the module docstring)."""

    config: JobConfig
    storage: Storage
    settings: DatasetSettings
    files: list[ManifestFile]
    index: OutputIndex
    pending: list[tuple[Shard, Marker | None]]  # shards to render, with the marker of a retried one
    num_shards: int
    ids_checked: bool  # whether this run checked ids (False: the files are those an earlier run checked)
    marker_keys: dict[str, str] = field(default_factory=dict)  # retried shard -> key of its marker
    pinned_pixels: PixelSettings | None = None  # what the output pinned before this run (`schemas.pinned`)
    pixel_changes: list[str] = field(default_factory=list)  # what this run changes of it (with --mixed-output)
    scales: CheckpointScales = field(init=False)

    def __post_init__(self) -> None:
        self.scales = CheckpointScales(self.config)

    @property
    def num_rows(self) -> int:
        """Rows in every manifest file."""
        return sum(file.num_rows for file in self.files)

    def scan(self) -> PendingScan:
        """What the pending shards need, from small columns and footer statistics only (`scan_pending`)."""
        return scan_pending(self.pending, config=self.config)

    def confirm(self, scan: PendingScan, names: set[str]) -> set[str]:
        """Which of ``names`` (keys of `schemas.models.HUB_MODELS`) some row that will render needs.

        Plans (reads and validates) the pending shards `scan` found may need them, in order, until
        each is confirmed: a refused row needs no model. The prior is needed by any row that renders.
        After `CONFIRM_ROWS` planned rows the names not yet confirmed count as needed (said in the log).
        """
        positions = {name: set(scan.shards_needing.get(name, ())) for name in names}
        if PRIOR_MODEL in names:
            positions[PRIOR_MODEL] = set(range(len(self.pending)))
        confirmed: set[str] = set()
        planned = 0
        # Only which rows render matters here, not how they batch (the machine's batch size is not chosen yet).
        config = self.config if self.config.batch_size else dataclasses.replace(self.config, batch_size=PLAN_CHUNK_ROWS)
        with ShardReader(storage_options=self.config.storage_options) as reader:
            for position in sorted(set().union(*positions.values())):
                open_names = {name for name in names - confirmed if position in positions[name]}
                if not open_names:
                    continue
                if planned >= CONFIRM_ROWS:
                    rest = sorted(name for name in names - confirmed if max(positions[name]) >= position)
                    logger.info("%d rows planned to see which models are needed; counting %s as needed", planned, rest)
                    return confirmed | set(rest)
                shard, previous = self.pending[position]
                work = self._shard_work(reader, shard, previous, config=config).work
                planned += shard.num_rows
                found = {MODES[mode].checkpoint for mode in work.modes} | ({DEPTH_MODEL} if work.needs_depth else set())
                confirmed |= (found | ({PRIOR_MODEL} if work.num_to_render else set())) & open_names
                if confirmed >= names:
                    break
        return confirmed

    def works(self, duplicates: DuplicateImages | None = None) -> Iterator[ShardWork]:
        """The pending shards' work, one shard's rows at a time; each shard's images go to ``duplicates``."""
        with ShardReader(storage_options=self.config.storage_options) as reader:
            for shard, previous in self.pending:
                yield self._shard_work(reader, shard, previous, duplicates=duplicates)

    def _shard_work(
        self,
        reader: ShardReader,
        shard: Shard,
        previous: Marker | None,
        *,
        config: JobConfig | None = None,
        duplicates: DuplicateImages | None = None,
    ) -> ShardWork:
        """One pending shard's rows, validated and planned with ``config`` (default the plan's; a retry: the
        shard's error images only, less the refusals it repeats); its images go to ``duplicates``."""
        rows = reader.read(shard)
        marker, errors = (None, None) if previous is None else self._errors(previous)
        work = shard_work(
            rows,
            file=shard.file,
            config=config or self.config,
            movq_scales=self.scales,
            only=None if errors is None else errors.select(["id", "image_index"]),
            embedding_dim=self.scales.embedding_dim,
        )
        retried = None
        if marker is not None and errors is not None:
            work, retried = _without_repeated_refusals(work, marker, errors)
        if duplicates is not None:
            duplicates.add(work.batches.work)
        # after every part so far (a corrected shard's parts start past 0: `jobs.publishing.corrections`)
        attempt = max(part_attempt(part.name) for part in previous.parts) + 1 if previous is not None else 0
        return ShardWork(shard=shard, part=part_name(shard.name, attempt), work=work, retried=retried)

    def _errors(self, previous: Marker) -> tuple[Marker, pa.Table]:
        """A finished shard's marker and its images whose final result is an error (what a retry renders again)."""
        marker = Marker.from_json(self.storage.read_bytes(self.marker_keys[previous.shard]))
        final = read_shard_results(self.storage, marker.parts)
        return marker, final.filter(pc.not_equal(final.column("status"), STATUS_OK))


def _without_repeated_refusals(work: Work, marker: Marker, errors: pa.Table) -> tuple[Work, Retried]:
    """``work`` (a retry of ``errors``) less the refusals it repeats word for word, and what it renders again."""
    keys = ["id", "image_index", "error_kind", "error"]
    earlier = errors.filter(pc.is_in(errors.column("error_kind"), value_set=pa.array(REFUSAL_KINDS)))
    refused = work.refused.append_column("_row", pa.array(np.arange(work.refused.num_rows), pa.int64()))
    again = refused.select([*keys, "_row"]).join(earlier.select(keys).cast(refused.select(keys).schema), keys=keys)
    repeated = again.select(["id", "image_index"]).to_pylist()
    same = {(row["id"], row["image_index"]) for row in repeated}
    kept = np.setdiff1d(np.arange(work.refused.num_rows), again.column("_row").to_numpy())
    work = dataclasses.replace(
        work, refused=work.refused.take(pa.array(kept, pa.int64())), num_done=work.num_done + len(same)
    )
    counts, kept_failed = Counts(), FailedImages()
    for row in errors.to_pylist():
        key = (row["id"], row["image_index"])
        if key in same:
            kept_failed.add(row["error_kind"], key)
        else:
            counts.count(status=row["status"], mode=row["mode"], error_kind=row["error_kind"])
    retried_keys = frozenset(zip(errors.column("id").to_pylist(), errors.column("image_index").to_pylist())) - same
    return work, Retried(marker=marker, counts=counts, keys=retried_keys, kept_failed=kept_failed)


def with_machine_defaults(plan: RunPlan, scan: PendingScan, machine: Machine) -> tuple[RunPlan, list[Choice]]:
    """``plan`` with its config's machine-dependent options filled for ``machine`` and the work ``scan`` found."""
    config, choices = machine_defaults(
        plan.config,
        machine,
        modes=scan.modes,
        largest_pixels=scan.largest_pixels,
        needs_depth=scan.needs_depth,
        num_images=scan.num_images,
        units=scan.units,
        depth_images=scan.depth_images,
    )
    filled = dataclasses.replace(plan, config=config)
    filled.scales = plan.scales  # what was read and left out (unloadable checkpoints) holds: the models are the same
    return filled, choices


def plan_run(config: JobConfig, storage: Storage, *, check_pins: bool = True) -> RunPlan:
    """The plan of a run as the output is now (with ``--overwrite``: as if it were empty).

    Checks first that the run may write into the output (`jobs.planning.output_guard`). The plan's config
    names the manifest the run reads (the pinned one when ``config`` gives none). ``check_pins``: refuse flags that
    change what the output pinned now (`jobs.planning.pinning.check_pinned`); False for a caller that checks them
    later with the checkpoints' contents, so every change is listed at once.
    """
    existing = read_settings(storage)
    check_output(storage, config, pinned=existing)
    pinned = None if config.overwrite else existing
    settings, manifest = run_settings(config, pinned)
    pinned_pixels = pinned.pixels if pinned is not None else None
    config = with_pinned(dataclasses.replace(config, manifest=manifest), pinned_pixels)
    if check_pins:
        check_pinned(config, pinned_pixels)
    settings = dataclasses.replace(settings, pixels=wanted(config, pinned_pixels))
    files = ordered(read_manifest_files(config))  # correction files last: they render after the rows they correct
    if config.overwrite:
        index = OutputIndex(output_format=settings.output_format)
    else:
        index = read_index(storage, output_format=settings.output_format, verify=config.verify_parts)
    files = [with_content_digest(file, known=index.files.get(file.relpath)) for file in files]
    check_unchanged(files, index)
    digest = files_digest(files)
    ids_checked = digest != settings.ids_checked
    if ids_checked:
        check_all_ids(files, storage_options=config.storage_options)
        check_gone_ids(
            files, index, storage, output_format=settings.output_format, storage_options=config.storage_options
        )
        settings = dataclasses.replace(settings, ids_checked=digest)
    try:
        pending, num_shards, marker_keys = _pending(files, index, settings=settings, config=config, storage=storage)
    except CheckpointError as exc:  # the checkpoint's rows turned out unreadable: every marker decides
        index = read_index(storage, output_format=settings.output_format, distrust=str(exc))
        pending, num_shards, marker_keys = _pending(files, index, settings=settings, config=config, storage=storage)
    return RunPlan(
        config=config,
        storage=storage,
        settings=settings,
        files=files,
        index=index,
        pending=pending,
        num_shards=num_shards,
        ids_checked=ids_checked,
        marker_keys=marker_keys,
        pinned_pixels=pinned_pixels,
    )


def _pending(
    files: list[ManifestFile], index: OutputIndex, *, settings: DatasetSettings, config: JobConfig, storage: Storage
) -> tuple[list[tuple[Shard, Marker | None]], int, dict[str, str]]:
    """(the shards to render, in the files' order, with the marker of a retried one; the number of shards; the
    retried shards' marker keys). The files are walked in relative-path order beside the done shards' rows
    (`DoneLookup`), so memory follows the pending shards, not the done ones."""
    found: dict[str, list[tuple[Shard, str | None]]] = {}
    num_shards = 0
    lookup = DoneLookup(index.done_rows(DoneLookup.COLUMNS))
    for file in sorted(files, key=lambda file: file.relpath):
        shards = found.setdefault(file.relpath, [])
        for shard in cut_shards(file, shard_rows=settings.shard_rows):
            num_shards += 1
            done = lookup.find(shard.relpath, shard.start, shard.name)
            if done is None:
                shards.append((shard, None))
            elif config.retry_errors and done[1]:
                shards.append((shard, marker_key(shard.name, done[0])))
    keys = {shard.name: key for file in files for shard, key in found[file.relpath] if key is not None}
    markers = {marker.shard: without_sample(marker) for _, marker in read_markers(storage, list(keys.values()))}
    pending = [
        (shard, None if key is None else markers[shard.name])
        for file in files
        for shard, key in found[file.relpath]
        if key is None or shard.name in markers  # a marker that cannot be read back is not retried
    ]
    return pending, num_shards, keys


def check_unchanged(files: list[ManifestFile], index: OutputIndex) -> None:
    """`ManifestError` for a manifest file whose content changed since its shards were rendered, or for a file
    that holds the very bytes of a rendered file no longer listed (a rename: its shards would be new names)."""
    listed = {file.relpath for file in files}
    gone: dict[tuple[int, str], list[tuple[str, Fingerprint]]] = {}
    for relpath, fingerprint in index.files.items():
        if relpath not in listed:
            gone.setdefault((fingerprint.size, fingerprint.footer), []).append((relpath, fingerprint))
    for file in files:
        rendered = index.files.get(file.relpath)
        change = rendered.differs(file.fingerprint) if rendered is not None else None
        if change:
            raise ManifestError(
                f"{public_uri(file.uri)}: changed since its shards were rendered ({change}); rendered manifest files "
                "are immutable: add new rows as a new file, or start over with --overwrite"
            )
        if rendered is None:
            for relpath, fingerprint in gone.get((file.fingerprint.size, file.fingerprint.footer), []):
                if fingerprint.same_bytes(file.fingerprint):
                    raise ManifestError(
                        f"{public_uri(file.uri)} holds the same bytes as {relpath}, which this output rendered and "
                        f"which is no longer in the manifest: a renamed file. Rename it back to {relpath} (shards are "
                        "named after their file), or render it into a new --output"
                    )


def manifest_work(config: JobConfig, *, movq_scales: Mapping[str, int] | None = None) -> Work:
    """The whole manifest as one in-memory `Work`, for small manifests: tests, benchmarks, examples.

    The render job never calls this (it plans shard by shard, `RunPlan.works`); ids are checked as
    the job checks them; options left to the machine take this machine's defaults. Raises
    `ManifestError` for malformed manifests.
    """
    if config.batch_size is None:  # what a job on this machine would choose (for the text2img checkpoint's size)
        config, _ = machine_defaults(config, local_machine(), modes=[], largest_pixels=0, needs_depth=False)
    files = read_manifest_files(config)
    check_ids(files, storage_options=config.storage_options)
    scales = movq_scales if movq_scales is not None else CheckpointScales(config)
    works = [
        shard_work(
            read_whole(file, storage_options=config.storage_options),
            file=file.uri,
            config=config,
            movq_scales=scales,
            embedding_dim=getattr(scales, "embedding_dim", None),
        )
        for file in files
    ]
    return Work(
        num_rows=sum(w.num_rows for w in works),
        num_images=sum(w.num_images for w in works),
        batches=batch(
            pa.concat_tables([WORK_SCHEMA.empty_table(), *(w.batches.work for w in works)]),
            batch_size=config.batch_size,
        ),
        refused=pa.concat_tables([WORK_SCHEMA.empty_table(), *(w.refused for w in works)]),
        movq_scales=scales.read() if isinstance(scales, CheckpointScales) else dict(scales),
    )
