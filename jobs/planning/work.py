"""Work: a shard's manifest rows -> one work row per output image (seeds, prior kind, refusals) -> batches.

Everything here runs in the driver before any model loads, so a malformed row costs nothing; it
works on one shard (or one small in-memory manifest) at a time, so memory follows the shard size.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.planning.batches import Batches, batch
from jobs.planning.checkpoints import CheckpointScales
from jobs.planning.manifests import inside_test
from schemas.config import JobConfig
from schemas.keys import MAX_SEED, default_seed
from schemas.loggers import logger_for
from schemas.manifest import IMAGE_COLUMNS, IMAGE_REF, INTERPOLATE_TYPE, Limits, RenderDefaults, fill_defaults
from schemas.modes import MODES, PRIOR_KINDS, PRIOR_TEXT
from schemas.results import ERROR_INVALID_ROW, ERROR_UNSUPPORTED_SIZE
from schemas.text import public_uri, quoted
from schemas.validation import embedding_problems, row_problems, size_problems
from schemas.work import WORK_SCHEMA

logger = logger_for(__name__)


# Manifest rows expanded at a time: bounds the Python objects alive while planning huge manifests.
PLAN_CHUNK_ROWS = 65_536


def images_per_row(num_images: pa.Array | pa.ChunkedArray, *, limits: Limits) -> np.ndarray:
    """Images each row asks for: its ``num_images`` (nulls already filled), or 1 when outside the limits
    (such a row is refused with a single error image)."""
    values = num_images.to_numpy(zero_copy_only=False)
    return np.where((values >= 1) & (values <= limits.max_num_images), values, 1).astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class Work:
    """What one shard (or a whole small manifest, `jobs.planning.run_plan.manifest_work`) asks for:
    `batches` to render and `refused` rows.

    Each batch is one decoder call; ``refused`` rows (``error`` set) go straight to the results.
    """

    num_rows: int  # manifest rows
    num_images: int  # every (id, image_index) the rows ask for
    num_done: int = 0  # of those, already final in the output (skipped)
    batches: Batches = field(default_factory=lambda: Batches(WORK_SCHEMA.empty_table(), np.zeros(1, np.int64)))
    refused: pa.Table = field(default_factory=WORK_SCHEMA.empty_table)
    movq_scales: dict[str, int] = field(default_factory=dict)  # what sizes were checked with, per checkpoint

    @property
    def num_to_render(self) -> int:
        """Images sent to the model stages."""
        return self.batches.work.num_rows

    @property
    def modes(self) -> list[str]:
        """Modes present in the batches (decides which decoder checkpoints load)."""
        return sorted(pc.unique(self.batches.work.column("mode")).to_pylist())

    @property
    def needs_depth(self) -> bool:
        """Whether some row of a hint-estimating mode has no hint, so the depth stage must run."""
        return needs_depth(self.batches.work)


def needs_depth(work: pa.Table) -> bool:
    """Whether some row of ``work`` is of a hint-estimating mode and has no hint."""
    return hint_estimates(work) > 0


def hint_estimates(work: pa.Table) -> int:
    """Rows of ``work`` whose hint the depth stage estimates (a hint-estimating mode, no hint given)."""
    return int(pc.sum(estimated_hints(work.column("mode"), work.column("hint"))).as_py() or 0)


def estimated_hints(mode: pa.ChunkedArray, hint: pa.ChunkedArray) -> pa.ChunkedArray:
    """Per row: whether the depth stage estimates its hint (a hint-estimating mode without a given hint)."""
    modes = sorted(name for name, entry in MODES.items() if entry.hint_estimated)
    estimated = pc.is_in(mode, value_set=pa.array(modes, pa.string()))
    return pc.fill_null(pc.and_(estimated, hint.is_null()), False)


def expand(
    table: pa.Table,
    *,
    file: str,
    job_seed: int,
    defaults: RenderDefaults,
    limits: Limits,
    movq_scales: Mapping[str, int],
    embedding_dim: Callable[[], int] | None = None,
    inside_output: Callable[[str], bool] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Expand manifest rows into `WORK_SCHEMA` rows, one per output image.

    Returns ``(work, refused)``: renderable rows, and rows of refused manifest rows with their
    problem in ``error`` (one per image, or a single image 0 when ``num_images`` itself is bad):
    ``invalid_row`` for values outside the contract, ``unsupported_size`` for sizes the mode's
    decoder would change (checked with ``movq_scales``, checkpoint name -> MoVQ scale). Given
    embeddings are checked against ``embedding_dim()`` (the prior checkpoint's size, read on demand).
    ``inside_output``: a test of whether an input URI lies inside the job's output, where a run may rewrite
    or clean up files (such rows are refused).
    """
    filled = resolve_relative_uris(fill_defaults(table, defaults), base=file)
    problems = row_problems(filled, limits=limits, manifest=file)
    if inside_output is not None:
        problems = [p or q for p, q in zip(problems, _inputs_inside(filled, inside_output))]
    if embedding_dim is not None and filled.column("image_embeds").null_count < filled.num_rows:
        given = embedding_problems(filled, dim=embedding_dim())
        problems = [p or g for p, g in zip(problems, given)]
    sizes = size_problems(filled, scales=movq_scales)
    kinds = [ERROR_INVALID_ROW if p else (ERROR_UNSUPPORTED_SIZE if z else None) for p, z in zip(problems, sizes)]
    problems = [p or z for p, z in zip(problems, sizes)]
    counts = images_per_row(filled.column("num_images"), limits=limits)
    positions = np.repeat(np.arange(filled.num_rows), counts)
    starts = np.cumsum(counts) - counts
    image_index = np.arange(len(positions)) - np.repeat(starts, counts)

    seeds = _image_seeds(filled, counts=counts, positions=positions, image_index=image_index, job_seed=job_seed)
    inputs_keys = _inputs_keys(filled)
    rows = filled.take(pa.array(positions))
    errors = [problems[p] for p in positions.tolist()]
    error_kinds = [kinds[p] for p in positions.tolist()]
    negative = rows.column("negative_prompt")
    prior_kind = pa.array(np.full(rows.num_rows, PRIOR_TEXT.name, dtype=object), pa.string())
    for kind in PRIOR_KINDS.values():  # each kind is selected by the column it reads
        if kind.reads:
            prior_kind = pc.if_else(rows.column(kind.reads).is_valid(), kind.name, prior_kind)
    columns = {
        "prior_kind": prior_kind,
        "inputs_key": pa.array(inputs_keys, pa.string()).take(pa.array(positions)),
        "id": rows.column("id"),
        "image_index": pa.array(image_index, pa.int32()),
        "seed": seeds,
        "mode": rows.column("mode"),
        "prompt": rows.column("prompt"),
        "negative_prompt": negative,
        "has_negative_prompt": negative.is_valid(),
        "manifest_file": pa.array(np.full(len(positions), public_uri(file), dtype=object), pa.string()),
        "error": pa.array(errors, pa.string()),
        "error_kind": pa.array(error_kinds, pa.string()),
        "image_embeds_given": rows.column("image_embeds"),
        "negative_image_embeds_given": rows.column("negative_image_embeds"),
        "hint_estimated": estimated_hints(rows.column("mode"), rows.column("hint")),
    }
    for name in WORK_SCHEMA.names:
        if name not in columns:
            columns[name] = rows.column(name)
    work = pa.table(columns).select(WORK_SCHEMA.names).cast(WORK_SCHEMA)
    bad = work.column("error").is_valid()
    return work.filter(pc.invert(bad)), work.filter(bad)


def _image_seeds(
    rows: pa.Table, *, counts: np.ndarray, positions: np.ndarray, image_index: np.ndarray, job_seed: int
) -> pa.Array:
    """Per image: the row's seed (or, when null, a stable hash of (job seed, id)) + image_index.

    Null for images of rows whose seed is outside [0, 2**62 - num_images] (those rows are refused).
    """
    given = rows.column("seed")
    base = pc.fill_null(given, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    missing = np.flatnonzero(given.is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        ids = rows.column("id").take(pa.array(missing)).to_pylist()
        base[missing] = [default_seed(job_seed, row_id) for row_id in ids]
    valid = (base >= 0) & (base <= MAX_SEED + 1 - counts)  # the last image's seed + counts - 1 <= MAX_SEED
    valid[missing] = True  # a derived seed is in [0, 2**62): seed + image_index still fits int64
    seeds = base[positions] + image_index
    return pa.array(seeds, pa.int64(), mask=~valid[positions])


def _inputs_keys(rows: pa.Table) -> list[str]:
    """Per manifest row: a digest of its mode's `batch_inputs` columns ("" for modes without; see WORK_SCHEMA)."""
    keys = [""] * rows.num_rows
    modes = rows.column("mode")
    for mode in MODES.values():
        if not mode.batch_inputs:
            continue
        positions = np.flatnonzero(pc.equal(modes, mode.name).to_numpy(zero_copy_only=False))
        if not len(positions):
            continue
        chosen = rows.select(list(mode.batch_inputs)).take(pa.array(positions, pa.int64())).to_pylist()
        for i, row in zip(positions.tolist(), chosen):
            digest = hashlib.sha256()
            for name in mode.batch_inputs:
                ref = row[name]
                digest.update(repr(ref and (ref["uri"], ref["data"])).encode())
            keys[i] = digest.hexdigest()[:32]
    return keys


def _inputs_inside(table: pa.Table, inside: Callable[[str], bool]) -> list[str | None]:
    """Per row: the first input image URI that lies inside the job's output, as a problem, or None."""
    problems: list[str | None] = [None] * table.num_rows

    def check(name: str, uris: list[str | None]) -> None:
        for i, uri in enumerate(uris):
            if uri and problems[i] is None and inside(uri):
                problems[i] = (
                    f"{name} URI {quoted(public_uri(uri))} lies inside the job's output, which a run may rewrite or "
                    "clean up; copy the input elsewhere"
                )

    for name in IMAGE_COLUMNS:
        uris = pc.struct_field(table.column(name), "uri")
        if uris.null_count < table.num_rows:
            check(name, uris.to_pylist())
    if table.column("interpolate").null_count < table.num_rows:
        items = table.column("interpolate").to_pylist()
        for k in range(max(len(row or ()) for row in items)):
            uris = [((row[k]["image"] or {}).get("uri") if row and len(row) > k else None) for row in items]
            check(f"interpolate[{k}].image", uris)
    return problems


def resolve_relative_uris(table: pa.Table, *, base: str) -> pa.Table:
    """Relative image URIs (no protocol, not absolute) resolve against the folder of manifest ``base``."""
    folder = base.rsplit("/", 1)[0] if "/" in base else "."

    def resolve(ref: dict | None) -> dict | None:
        if ref is None or ref["uri"] is None or "://" in ref["uri"] or ref["uri"].startswith("/") or not ref["uri"]:
            return ref
        protocol, sep, path = folder.rpartition("://")
        joined = posixpath.normpath(posixpath.join(path, ref["uri"]))
        return {"uri": f"{protocol}{sep}{joined}", "data": None}

    columns = {name: table.column(name) for name in table.column_names}
    for name in IMAGE_COLUMNS:
        column = table.column(name)
        if pc.struct_field(column, "uri").null_count < table.num_rows:  # some URI to resolve
            columns[name] = pa.array([resolve(ref) for ref in column.to_pylist()], IMAGE_REF)
    if table.column("interpolate").null_count < table.num_rows:
        items = table.column("interpolate").to_pylist()
        columns["interpolate"] = pa.array(
            [None if row is None else [{**item, "image": resolve(item["image"])} for item in row] for row in items],
            INTERPOLATE_TYPE,
        )
    return pa.table(columns)


def _only(work: pa.Table, wanted: pa.Table) -> pa.Table:
    """Rows of ``work`` (in order) whose (id, image_index) is in ``wanted``."""
    keys = work.select(["id", "image_index"]).append_column("_row", pa.array(np.arange(work.num_rows)))
    keep = keys.join(wanted, keys=["id", "image_index"], join_type="left semi").column("_row")
    return work.take(pa.array(np.sort(keep.to_numpy()), pa.int64()))


IMAGE_KEYS = pa.schema([("id", pa.string()), ("image_index", pa.int32())])


def shard_work(
    table: pa.Table,
    *,
    file: str,
    config: JobConfig,
    movq_scales: Mapping[str, int],
    only: pa.Table | None = None,
    embedding_dim: Callable[[], int] | None = None,
) -> Work:
    """The work of normalized manifest rows ``table`` (one shard): expand, refuse, batch.

    ``only`` (``id``, ``image_index``): plan just those images (a ``--retry-errors`` rerun of a
    finished shard's error images); the rest count as done.
    """
    if config.batch_size is None:
        raise ValueError(
            "shard_work needs the machine's defaults chosen first (jobs.planning.machine.machine_defaults)"
        )
    works, refusals = [], []
    inside = inside_test(config.output, storage_options=config.storage_options)
    for start in range(0, table.num_rows, PLAN_CHUNK_ROWS):
        work, refused = expand(
            table.slice(start, PLAN_CHUNK_ROWS),
            file=file,
            job_seed=config.seed,
            defaults=config.defaults,
            limits=config.limits,
            movq_scales=movq_scales,
            embedding_dim=embedding_dim,
            inside_output=inside,
        )
        works.append(work)
        refusals.append(refused)
    work = pa.concat_tables([WORK_SCHEMA.empty_table(), *works])
    refused = pa.concat_tables([WORK_SCHEMA.empty_table(), *refusals])
    num_images = work.num_rows + refused.num_rows
    if only is not None:
        only = only.select(["id", "image_index"]).cast(IMAGE_KEYS)
        work, refused = _only(work, only), _only(refused, only)
    return Work(
        num_rows=table.num_rows,
        num_images=num_images,
        num_done=num_images - work.num_rows - refused.num_rows,
        batches=batch(work, batch_size=config.batch_size),
        refused=refused,
        movq_scales=movq_scales.read() if isinstance(movq_scales, CheckpointScales) else dict(movq_scales),
    )
