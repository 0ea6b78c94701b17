"""What the pending shards of a run need, known before any is planned: read from small columns and footer statistics.

The stages, the machine's defaults (the layout's costs, batch sizes), the models checked before Ray
starts and the progress total depend on it (`scan_pending`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.pins import Pin
from jobs.planning.calibration import work_units
from jobs.planning.checkpoints import PUBLIC_MOVQ_SCALE
from jobs.planning.identity import CheckpointId
from jobs.planning.manifests import ShardReader
from jobs.planning.work import images_per_row
from schemas.columns import as_int64
from schemas.config import JobConfig
from schemas.manifest import Limits, RenderDefaults
from schemas.models import HUB_MODELS
from schemas.modes import DEFAULT_MODE, MODES
from schemas.results import REFUSAL_KINDS, STATUS_OK
from schemas.shards import Marker, Shard

PRIOR_MODEL, DEPTH_MODEL = "prior", "depth"  # keys of HUB_MODELS: the prior and the depth estimator
assert {PRIOR_MODEL, DEPTH_MODEL} <= set(HUB_MODELS)


@dataclass(frozen=True, kw_only=True)
class PendingScan:
    """What the pending shards need, known before any is planned: the stages and the progress total depend on it.

    `RunPlan.scan` reads small columns only, so ``modes`` and ``needs_depth`` may count rows that planning will
    refuse; `RunPlan.confirm` settles what matters (`jobs.planning.availability.check_models`).
    """

    num_images: int  # images the pending shards' rows ask for (retries: their error images)
    modes: list[str]  # modes that occur (decides which decoder checkpoints load)
    needs_depth: bool  # some ControlNet row lacks a hint (the depth stage starts)
    largest_pixels: int = 0  # height x width of the largest image asked for within the limits (the defaults' sizing)
    # `jobs.planning.calibration.unit_totals` of the images first renderings ask for (the layout's stage costs),
    # and how many of them may need an estimated hint (an over-estimate: footer statistics only)
    units: dict[str, float] = field(default_factory=dict)
    depth_images: int = 0
    # (mode, height, width) of first renderings, most images first, at most `MAX_CALL_SHAPES` (a compiled decoder's
    # warm-up; a shape not listed compiles at its first call)
    call_shapes: list[tuple[str, int, int]] = field(default_factory=list)
    # HUB_MODELS name (checkpoint, "depth") -> positions in `RunPlan.pending` of the shards whose rows may need it
    shards_needing: dict[str, list[int]] = field(default_factory=dict)
    # (mode, height, width) -> images of first renderings whose size the public checkpoints refuse (their MoVQ scale
    # `PUBLIC_MOVQ_SCALE`): models of another scale (the tiny ones) may render them (`jobs.planning.availability`)
    public_refusals: dict[tuple[str, int, int], int] = field(default_factory=dict)
    # checkpoint path -> the version every actor of the run loads (`jobs.planning.availability.check_models` sets it)
    pins: dict[str, Pin] = field(default_factory=dict)
    # checkpoint name -> its identity (`jobs.planning.identity`), for each checkpoint the run needs
    model_ids: dict[str, CheckpointId] = field(default_factory=dict)


def scan_pending(pending: list[tuple[Shard, Marker | None]], *, config: JobConfig) -> PendingScan:
    """Images, modes, costs and model needs of the ``pending`` shards (with the marker of a retried one), from small
    columns and footer statistics only.

    A shard's ``hint`` column is read only when it has ControlNet rows and its statistics do not
    rule out missing hints, so a manifest whose ControlNet rows all give hints never starts the depth stage.
    """
    limits, defaults = config.limits, config.defaults
    estimated = {name for name, mode in MODES.items() if mode.hint_estimated}
    num_images, modes, largest = 0, set(), 0
    needing: dict[str, list[int]] = collections.defaultdict(list)
    units: collections.Counter[str] = collections.Counter()
    shapes: collections.Counter[tuple[str, int, int]] = collections.Counter()
    depth_images = 0
    with ShardReader(storage_options=config.storage_options) as reader:
        for position, (shard, previous) in enumerate(pending):
            columns, hints_null = reader.columns(shard, ["mode", "num_images", *COST_COLUMNS])
            largest = max(largest, _largest_pixels(columns, defaults=defaults, limits=limits))
            if previous is not None:  # a retry renders the shard's error images (its refusals repeat)
                num_images += retry_estimate(previous)
                shard_modes = {m for m, c in previous.by_mode.items() if sum(c.values()) > c.get(STATUS_OK, 0)}
                depth = bool(shard_modes & estimated)
            else:
                counts = images_per_row(
                    pc.fill_null(as_int64(columns.column("num_images")), defaults.num_images), limits=limits
                )
                num_images += int(counts.sum())
                filled = _filled(columns, defaults=defaults)
                units.update({name: float((values * counts).sum()) for name, values in work_units(filled).items()})
                shapes.update(_call_shapes(filled, counts, limits=limits))
                shard_modes = set(pc.unique(filled.column("mode")).to_pylist()) & set(MODES)
                depth = bool(shard_modes & estimated) and hints_null and _lacks_hint(reader, shard, estimated)
                if depth:
                    hinted = pc.is_in(filled.column("mode"), value_set=pa.array(sorted(estimated)))
                    depth_images += int(counts[hinted.to_numpy(zero_copy_only=False)].sum())
            modes |= shard_modes
            for name in {MODES[mode].checkpoint for mode in shard_modes} | ({DEPTH_MODEL} if depth else set()):
                needing[name].append(position)
    return PendingScan(
        num_images=num_images,
        modes=sorted(modes),
        needs_depth=DEPTH_MODEL in needing,
        largest_pixels=largest,
        units=dict(units),
        depth_images=depth_images,
        call_shapes=[shape for shape, _ in shapes.most_common(MAX_CALL_SHAPES)],
        shards_needing=dict(needing),
        public_refusals={
            (mode, height, width): images
            for (mode, height, width), images in shapes.items()
            if MODES[mode].size_problem(height=height, width=width, scale=PUBLIC_MOVQ_SCALE)
        },
    )


def retry_estimate(previous: Marker) -> int:
    """Images a retry of shard ``previous`` renders again, assuming its refusals repeat (the same settings)."""
    return previous.num_errors - sum(previous.errors_by_kind.get(kind, 0) for kind in REFUSAL_KINDS)


# The manifest columns a row's cost depends on (`jobs.planning.calibration.work_units`), besides its mode.
COST_COLUMNS = (
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "prior_num_inference_steps",
    "prior_guidance_scale",
    "strength",
)


def _filled(columns: pa.Table, *, defaults: RenderDefaults) -> pa.Table:
    """The mode and `COST_COLUMNS` of scanned rows, nulls taking the job's defaults (as planning fills them)."""
    filled = {"mode": pc.fill_null(columns.column("mode").cast(pa.string()), DEFAULT_MODE)}
    for name in COST_COLUMNS:
        column = columns.column(name)
        column = as_int64(column) if isinstance(getattr(defaults, name), int) else column.cast(pa.float64())
        filled[name] = pc.fill_null(column, getattr(defaults, name))
    return pa.table(filled)


# The most call shapes a compiled decoder warms up for at start (each one is a compile of the UNet).
MAX_CALL_SHAPES = 8


def _call_shapes(filled: pa.Table, counts: np.ndarray, *, limits: Limits) -> dict[tuple[str, int, int], int]:
    """Images per (mode, height, width) among ``filled`` rows with a known mode and sizes within ``limits``."""
    table = filled.select(["mode", "height", "width"]).append_column("images", pa.array(counts))
    keep = pc.is_in(table["mode"], value_set=pa.array(sorted(MODES)))
    for side in ("height", "width"):
        keep = pc.and_(keep, pc.and_(pc.greater_equal(table[side], 1), pc.less_equal(table[side], limits.max_side)))
    table = table.filter(keep)
    grouped = table.group_by(["mode", "height", "width"]).aggregate([("images", "sum")]).to_pylist()
    return {(row["mode"], row["height"], row["width"]): row["images_sum"] for row in grouped}


def _lacks_hint(reader: ShardReader, shard: Shard, estimated: set[str]) -> bool:
    """Whether some row of a hint-estimating mode in ``shard`` has no ``hint`` (reads the mode and hint columns)."""
    columns, _ = reader.columns(shard, ["mode", "hint"])
    modes = pc.fill_null(columns.column("mode").cast(pa.string()), DEFAULT_MODE)
    lacking = pc.and_(
        pc.is_in(modes, value_set=pa.array(sorted(estimated), pa.string())), columns.column("hint").is_null()
    )
    return bool(pc.any(lacking).as_py())


def _largest_pixels(columns: pa.Table, *, defaults: RenderDefaults, limits: Limits) -> int:
    """The most pixels of one image among rows whose sizes are within ``limits`` (others are refused)."""
    sides = []
    for name, default in (("height", defaults.height), ("width", defaults.width)):
        side = pc.fill_null(as_int64(columns.column(name)), default).to_numpy(zero_copy_only=False)
        sides.append(np.where((side >= 1) & (side <= limits.max_side), side, 0))
    pixels = sides[0] * sides[1]
    return int(pixels.max()) if len(pixels) else 0
