"""Job configuration: every knob of a render job, frozen; field metadata declares its flag (jobs/options/flags.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from schemas.accel import DTYPES, AccelOptions
from schemas.choices import (
    EMBEDDING_DTYPES,
    LAYOUTS,
    MAX_PLANNED_GPUS,
    NUMBER_RANGES,
    PLAN_FOR,
    RUNNERS,
    SCORERS,
)
from schemas.log import COMPACT_EVERY, VERIFY_MAX_OBJECTS
from schemas.manifest import Limits, RenderDefaults
from schemas.models import ModelPaths
from schemas.numbers import check_range
from schemas.resources import MACHINE_DEFAULT, StageResources
from schemas.shards import DEFAULT_SHARD_ROWS, OUTPUT_FORMATS
from schemas.stages import SCORE
from schemas.text import public_uri
from schemas.validation import value_bounds


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """One render job. Paths are fsspec URIs; ``storage_options`` go to every fsspec filesystem."""

    manifest: str | None = field(
        default=None,
        metadata={
            "help": "Parquet file, folder/prefix of Parquet files, or glob; any fsspec URI. A folder's corrections/ "
            "files replace rendered rows by id: docs/corrections.md",
            "default_help": "the one the output pinned (required for a new output)",
            "group": "io",
        },
    )
    output: str = field(
        metadata={"help": "output prefix (fsspec URI): images/, results/, stats.json, _SUCCESS", "group": "io"}
    )
    models: ModelPaths = field(default_factory=ModelPaths, metadata={"group": "models"})
    dtype: str = field(
        default="auto",
        metadata={
            "choices": DTYPES,
            "help": "auto: the dtype the output's images were made in, else float16 on CUDA, float32 on CPU",
            "group": "models",
        },
    )
    accel: AccelOptions = field(default_factory=AccelOptions, metadata={"group": "speed"})
    runner: str = field(
        default="ray",
        metadata={"choices": RUNNERS, "help": "ray: actor pools; local: in-process", "group": "execution"},
    )
    address: str | None = field(
        default=None,
        metadata={
            "help": "Ray cluster to join: host:port of its head's GCS, ray://host:port, or auto (the local head "
            "that ray start recorded)",
            "default_help": "RAY_ADDRESS, else start a private local Ray",
            "group": "execution",
        },
    )
    layout: str | None = field(
        default=None,
        metadata={
            "choices": LAYOUTS,
            "help": "dedicated: the CLIP stages (prior, scoring, depth) on GPUs of their own; co-located: beside the "
            "decoders on their GPUs; one-process: every model stage in each actor (CPU clusters)",
            "default_help": MACHINE_DEFAULT,
            "group": "execution",
        },
    )
    plan_for: tuple[str, ...] = field(
        default=(),
        metadata={
            "repeatable": True,
            "metavar": "NxTYPE",
            "help": "the cluster to plan for: N GPUs of this type (e.g. 8xH100). A run sizes its pools for it and, "
            "with no GPU up, asks the autoscaler for them and waits (--stage-wait); --dry-run forecasts the run on "
            "each one given (repeatable): layout, images/s, wall time, GPU-hours, idle GPU shares",
            "group": "execution",
        },
    )
    keep_actors: bool = field(
        default=False,
        metadata={
            "help": "when the run ends, keep its model actors (models loaded) for the next run in this process that "
            "asks for the same stages, models and resources: for notebooks and schedulers that call run_job again "
            "on one Ray; a kept actor is reset before use and renders as a fresh one would",
            "group": "execution",
        },
    )
    idle_timeout_s: float = field(
        default=60.0,
        metadata={
            "flag": "--idle-timeout",
            "help": "seconds an actor above its pool's MIN may stay idle before it goes (its node can then scale down)",
            "group": "execution",
        },
    )
    prior: StageResources = field(
        default_factory=StageResources,
        metadata={
            "what": "CLIP (prior, and scoring and depth unless given their own)",
            "per_field": {
                "num_actors": {"default_help": MACHINE_DEFAULT},
                "num_gpus": {"default_help": "1 (dedicated) or 0.1 (co-located)"},
            },
        },
    )
    decoder: StageResources = field(
        default_factory=StageResources,
        metadata={
            "per_field": {
                "num_actors": {"default_help": "one per GPU the CLIP actors leave; CPU: chosen for the machine"},
                "num_gpus": {"default_help": "1 (dedicated) or 0.9 (co-located)"},
            }
        },
    )
    depth: StageResources = field(
        default_factory=StageResources,
        metadata={
            "what": "depth-estimation",
            "per_field": {
                "num_actors": {"default_help": "none: depth runs in the CLIP actors"},
                "num_gpus": {"default_help": "with --num-depth-actors: 0"},
            },
        },
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "images per decoder call", "default_help": MACHINE_DEFAULT, "group": "execution"},
    )
    prior_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "images per prior call; one call serves whole decoder batches",
            "default_help": MACHINE_DEFAULT,
            "group": "execution",
        },
    )
    # Rows with a null seed derive theirs from (seed, id).
    seed: int = field(default=0, metadata={"help": "job seed for rows whose seed is null", "group": "execution"})
    defaults: RenderDefaults = field(default_factory=RenderDefaults, metadata={"group": "defaults"})
    limits: Limits = field(default_factory=Limits, metadata={"group": "limits"})
    storage_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"derived": "$KANDINSKY_RENDER_STORAGE_OPTIONS, --storage-* and --storage-option"},
    )
    output_format: str | None = field(
        default=None,
        metadata={
            "choices": OUTPUT_FORMATS,
            "help": "files: one PNG per image; webdataset: a tar per shard; parquet: a Parquet file per shard "
            "(PNG bytes in a binary column)",
            "default_help": "what the output was first rendered with, else files",
            "group": "io",
        },
    )
    shard_rows: int | None = field(
        default=None,
        metadata={
            "help": "manifest rows per shard, the unit of work, output and completion (whole Parquet row groups; "
            "a larger row group is cut)",
            "default_help": f"what the output was first rendered with, else {DEFAULT_SHARD_ROWS}",
            "group": "io",
        },
    )
    shards_in_flight: int | None = field(
        default=None,
        metadata={
            "help": "shards open at a time (the driver holds their work; each writer actor builds its shards' files)",
            "default_help": "2 per writer actor, more while small shards leave the decoders' batch buffer short",
            "group": "execution",
        },
    )
    writer: StageResources = field(
        default_factory=StageResources,
        metadata={
            "what": "writer (PNG encoding and shard upload)",
            "per_field": {
                "num_actors": {"default_help": "one per two decoder actors"},
                "num_gpus": {"derived": "writers use no GPU"},
            },
        },
    )
    score: str | None = field(
        default=None,
        metadata={
            "choices": SCORERS,
            "help": "score each image after the decoder: clip = 100 x cos(CLIP image, CLIP prompt), clamped at 0, "
            "with the prior checkpoint's own CLIP encoders (results column clip_score)",
            "default_help": "no scoring",
            "group": "io",
        },
    )
    min_clip_score: float | None = field(
        default=None,
        metadata={
            "help": "flag images scoring below this as filtered (kept on storage; results column filtered)",
            "default_help": "none",
            "group": "io",
        },
    )
    save_embeddings: str | None = field(
        default=None,
        metadata={
            "choices": EMBEDDING_DTYPES,
            "help": "store each ok image's image_embeds and negative_image_embeds with it (results columns; a "
            "<key>.npy member in webdataset; columns in parquet), in this precision",
            "default_help": "not stored",
            "group": "io",
        },
    )
    scorer: StageResources = field(
        default_factory=StageResources,
        metadata={
            "stage": SCORE.name,
            "what": "scoring (--score)",
            "per_field": {
                "num_actors": {"default_help": "none: scoring runs in the CLIP actors, on the prior's encoders"},
                "num_gpus": {"default_help": "with --num-score-actors: 0"},
            },
        },
    )
    spool_dir: str | None = field(
        default=None,
        metadata={
            "help": "local folder where writer actors build shard files before uploading them",
            "default_help": "the system temp folder",
            "group": "execution",
        },
    )
    call_timeout_s: float | None = field(
        default=None,
        metadata={
            "flag": "--call-timeout",
            "help": "seconds a model or writer call may run before its actor is killed, restarted and its work re-run",
            "default_help": "5 x the stage's slowest call so far, at least --call-timeout-floor or, once a model "
            "actor has finished a call, --call-timeout-warm-floor",
            "group": "execution",
        },
    )
    call_timeout_floor_s: float = field(
        default=600.0,
        metadata={
            "flag": "--call-timeout-floor",
            "help": "the least a call deadline can be, seconds: for a model actor's first call (model load, compile, "
            "warm-up) and for writer calls",
            "group": "execution",
        },
    )
    call_timeout_warm_floor_s: float = field(
        default=60.0,
        metadata={
            "flag": "--call-timeout-warm-floor",
            "help": "the least a call deadline can be, seconds, once a model actor has finished a call since it "
            "(re)started: a frozen GPU costs about this plus a restart",
            "group": "execution",
        },
    )
    stage_wait_s: float = field(
        default=600.0,
        metadata={
            "flag": "--stage-wait",
            "help": "seconds a stage may have no actor up (restarting, or no node can hold it) before the job stops",
            "group": "execution",
        },
    )
    connect_wait_s: float = field(
        default=20.0,
        metadata={
            "flag": "--connect-wait",
            "help": "seconds a Ray address (--address, RAY_ADDRESS) may take to accept a connection before the job "
            "fails naming it",
            "group": "execution",
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "start the output over: once every check has passed, delete what earlier runs wrote there (only "
            "the job's own files; anything else in the folder stays)",
            "group": "io",
        },
    )
    allow_other_files: bool = field(
        default=False,
        metadata={
            "help": "render into a folder that already holds files the job did not write (they are never deleted or "
            "replaced); without it such a folder is refused",
            "group": "io",
        },
    )
    mixed_output: bool = field(
        default=False,
        metadata={
            "help": "accept a run whose models (their content), dtype, row defaults or --seed differ from what the "
            "output pinned: the new values are pinned and the run is recorded in _dataset.json (without it such a "
            "run is refused before any model loads)",
            "group": "io",
        },
    )
    # The pinned fields (`schemas.pinned.PINNED_FIELDS`; "defaults.<name>" for one default) the caller set itself;
    # None: all of them (a config built in code). A field left out takes the output's pinned value.
    given: tuple[str, ...] | None = field(default=None, metadata={"derived": "the flags given on the command line"})
    retry_errors: bool = field(
        default=False, metadata={"help": "render again images whose result is an error", "group": "io"}
    )
    verify_parts: bool = field(
        default=False,
        metadata={
            "help": "trust no checkpoint: read every marker, list every part, read each results file's footer and "
            "count the files format's PNGs (O(shards) requests); a damaged shard is rendered again. Parts are "
            f"listed at every start-up anyway while each folder holds at most {VERIFY_MAX_OBJECTS:,} objects",
            "group": "io",
        },
    )
    compact_every: int = field(
        default=COMPACT_EVERY, metadata={"help": "compact the completion log every N markers of a run", "group": "io"}
    )
    # The output lease expires this long after its last renewal.
    lease_ttl_s: float = field(
        default=120.0,
        metadata={"flag": "--lease-ttl", "help": "seconds the output lease lasts between renewals", "group": "io"},
    )
    lease_wait_s: float = field(
        default=0.0,
        metadata={
            "flag": "--lease-wait",
            "help": "seconds to wait when another run holds the output's lease",
            "group": "io",
        },
    )
    max_error_fraction: float = field(
        default=1.0,
        metadata={
            "help": "exit with status 3 when a larger fraction of this run's images end in error",
            "group": "io",
        },
    )
    # stage name -> {"accelerator_type": str, "label_selector": {key: value}}: the node types it may use
    stage_placement: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"derived": "--{stage}-accelerator-type and --{stage}-node-label"}
    )

    def __post_init__(self) -> None:
        for name, low, high, low_open in NUMBER_RANGES:
            check_range(name, getattr(self, name), low=low, high=high, low_open=low_open)
        if self.writer.min_actors == 0:
            raise ValueError("writer.num_actors must be N or MIN:MAX with MIN >= 1: writers cannot start from 0")
        for value in self.plan_for:
            match = PLAN_FOR.fullmatch(value)
            if match is None or not 1 <= int(match.group(1)) <= MAX_PLANNED_GPUS:
                raise ValueError(f"plan_for {value!r}: expected NxTYPE with 1 <= N <= {MAX_PLANNED_GPUS}, e.g. 8xH100")
        for name, (low, high) in value_bounds(self.limits).items():
            if hasattr(self.defaults, name):
                check_range(f"defaults.{name}", getattr(self.defaults, name), low=low, high=high)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.min_clip_score is not None and self.score is None:
            raise ValueError("min_clip_score needs score='clip' (--score clip)")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.output_format is not None and self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        for stage, placement in self.stage_placement.items():
            if stage not in ("prior", "decoder") or set(placement) - {"accelerator_type", "label_selector"}:
                raise ValueError(f"stage_placement: unknown stage or field in {stage!r}: {sorted(placement)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy with storage options redacted and URIs without user, password, query or fragment
        (`schemas.text.public_uri`): they may hold credentials."""
        data = dataclasses.asdict(self)
        data["storage_options"] = {key: "<redacted>" for key in self.storage_options}
        for name in ("manifest", "output", "spool_dir", "address"):
            if isinstance(data[name], str):
                data[name] = public_uri(data[name])
        data["models"] = {key: public_uri(v) if isinstance(v, str) else v for key, v in data["models"].items()}
        return data
