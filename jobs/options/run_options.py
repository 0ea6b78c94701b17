"""Render options that are not part of a `JobConfig`: config file, dry run, example, storage, placement, logging."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.options.storage import ENV_VAR as STORAGE_ENV_VAR
from schemas.models import HUB_MODELS
from schemas.numbers import DAY_S, check_range

PROGRESS_MODES = ("auto", "live", "log", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, kw_only=True)
class StagePlacementOptions:
    """Which Ray nodes one stage's actors may use; ``{stage}`` in flags and help is the RunOptions field's name."""

    accelerator_type: str | None = field(
        default=None,
        metadata={
            "flag": "--{stage}-accelerator-type",
            "help": "Ray accelerator type the {stage} actors need (e.g. L4, A100, H100)",
            "group": "execution",
        },
    )
    node_label: tuple[str, ...] = field(
        default=(),
        metadata={
            "flag": "--{stage}-node-label",
            "repeatable": True,
            "pairs": "text",
            "metavar": "KEY=VALUE",
            "help": "Ray node label the {stage} actors' nodes must carry (repeatable; VALUE may be !v, in(a,b)); "
            "the configs in cluster/ label GPU node types kandinsky-render/stage={stage}",
            "group": "execution",
        },
    )


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run and watch a job, and the inputs `config_from_args` turns into `JobConfig` fields."""

    config: str | None = field(
        default=None,
        metadata={
            "metavar": "FILE",
            "in_file": False,
            "help": "YAML/JSON file of options (keys are these flag names, e.g. num-decoder-actors: 4); "
            "flags given on the command line override it",
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "print the plan (rows and images per mode and size, batches per stage, estimated GPU-seconds) "
            "and exit without loading any model or writing anything"
        },
    )
    json: bool = field(default=False, metadata={"help": "with --dry-run: print one JSON object instead of text"})
    calibration: str | None = field(
        default=None,
        metadata={
            "metavar": "FILE",
            "help": "calibration YAML for --dry-run's GPU-seconds",
            "default_help": "cluster/calibration.yaml; make a profile with: kandinsky-render calibrate OUTPUT",
        },
    )
    example: bool = field(
        default=False,
        metadata={
            "help": "render the bundled example manifest with tiny random models (built on first use); "
            "--output defaults to ./kandinsky-example",
            "group": "io",
        },
    )
    storage_option: tuple[str, ...] = field(
        default=(),
        metadata={
            "repeatable": True,
            "pairs": "json",
            "aliases": ("storage_options",),  # JobConfig's field name reads better in a file
            "metavar": "KEY=VALUE",
            "help": "fsspec storage option for every filesystem (repeatable; VALUE parsed as JSON when it can be); "
            f"applied over ${STORAGE_ENV_VAR} (a JSON object) and the --storage-* options below",
            "group": "io",
        },
    )
    storage_endpoint_url: str | None = field(
        default=None, metadata={"help": "object store endpoint (S3-compatible or GCS emulator)", "group": "io"}
    )
    storage_region: str | None = field(default=None, metadata={"help": "S3 region", "group": "io"})
    storage_anon: bool = field(default=False, metadata={"help": "anonymous access (public buckets)", "group": "io"})
    storage_profile: str | None = field(
        default=None, metadata={"help": "AWS profile (from ~/.aws/config) for s3://", "group": "io"}
    )
    models: str | None = field(
        default=None,
        metadata={
            "metavar": "MODELS",
            "help": f"directory holding {', '.join(f'{name}/' for name in HUB_MODELS)}",
            "group": "models",
        },
    )
    prior: StagePlacementOptions = field(default_factory=StagePlacementOptions)
    decoder: StagePlacementOptions = field(default_factory=StagePlacementOptions)
    progress: str = field(
        default="auto",
        metadata={
            "choices": PROGRESS_MODES,
            "help": "auto: a live line on terminals, progress log lines elsewhere; off: only the final summary",
            "group": "watching",
        },
    )
    progress_every: float = field(
        default=30.0, metadata={"help": "seconds between progress log lines (cluster logs)", "group": "watching"}
    )
    log_format: str = field(
        default="text",
        metadata={"choices": LOG_FORMATS, "help": "json: one JSON object per line", "group": "watching"},
    )
    log_level: str = field(
        default="INFO",
        metadata={"choices": LOG_LEVELS, "parse": str.upper, "help": "driver log level", "group": "watching"},
    )

    def __post_init__(self) -> None:
        check_range("progress_every", self.progress_every, low=1.0, high=DAY_S)
