"""Job configuration: every knob of a render job, frozen; the CLI builds one, the pipeline reads it."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.manifest import Limits, RenderDefaults

HUB_MODELS = {
    "prior": "kandinsky-community/kandinsky-2-2-prior",
    "decoder": "kandinsky-community/kandinsky-2-2-decoder",
    "decoder-inpaint": "kandinsky-community/kandinsky-2-2-decoder-inpaint",
    "controlnet-depth": "kandinsky-community/kandinsky-2-2-controlnet-depth",
    # What diffusers' ControlNet docs use: transformers' default for pipeline("depth-estimation")
    "depth": "Intel/dpt-large",
}
# Hub revisions the default ids load at (transformers pins Intel/dpt-large at bc15f29 for its default).
HUB_REVISIONS = {"depth": "bc15f29"}
# Which decoder checkpoint serves each mode.
DECODER_FOR_MODE = {
    "text2img": "decoder",
    "img2img": "decoder",
    "inpaint": "decoder-inpaint",
    "controlnet": "controlnet-depth",
    "controlnet_img2img": "controlnet-depth",
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
RUNNERS = ("ray", "local")
ATTENTIONS = ("sdpa", "default")


@dataclass(frozen=True, kw_only=True)
class ModelPaths:
    """Where each checkpoint loads from: a hub id or a directory in diffusers' save_pretrained layout."""

    prior: str = HUB_MODELS["prior"]
    decoder: str = HUB_MODELS["decoder"]
    decoder_inpaint: str = HUB_MODELS["decoder-inpaint"]
    controlnet_depth: str = HUB_MODELS["controlnet-depth"]
    depth: str = HUB_MODELS["depth"]
    # Revision of the `depth` hub repository; None: its main branch. Unused when `depth` is a folder.
    depth_revision: str | None = HUB_REVISIONS["depth"]

    def depth_hub_revision(self) -> str | None:
        """The revision to load `depth` at: ``depth_revision`` for a hub id, None for a folder or URI."""
        return self.depth_revision if is_hub_id(self.depth) else None

    def for_checkpoint(self, name: str) -> str:
        """Path of checkpoint ``name`` (a key of `HUB_MODELS`)."""
        return getattr(self, name.replace("-", "_"))

    @classmethod
    def resolve(
        cls, *, models_dir: str | None = None, depth_revision: str | None = None, **overrides: str | None
    ) -> ModelPaths:
        """Per component: an explicit override, else ``models_dir/<name>``, else the hub id.

        ``depth_revision`` defaults to the pinned `HUB_REVISIONS` one when ``depth`` is the default
        hub id, else to None (a pinned revision names a commit of that repository only).
        """
        values = {}
        for name, hub_id in HUB_MODELS.items():
            attr = name.replace("-", "_")
            override = overrides.pop(attr, None)
            if override:
                values[attr] = override
            elif models_dir:
                values[attr] = f"{models_dir.rstrip('/')}/{name}"
            else:
                values[attr] = hub_id
        if overrides:
            raise ValueError(f"unknown model components: {sorted(overrides)}")
        if depth_revision is None and values["depth"] == HUB_MODELS["depth"]:
            depth_revision = HUB_REVISIONS["depth"]
        return cls(**values, depth_revision=depth_revision)


def is_hub_id(path: str) -> bool:
    """Whether ``path`` names a hub repository (``org/name``) rather than a local folder or an fsspec URI."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not os.path.isdir(path)


@dataclass(frozen=True, kw_only=True)
class StageResources:
    """Actors and Ray resources of one model stage. ``None`` means: decided from the cluster."""

    num_actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")


@dataclass(frozen=True, kw_only=True)
class AccelOptions:
    """How each model actor runs its pipelines (actors/accel.py); none of these changes fp32 pixels by > 1 level.

    ``attention``: ``sdpa`` makes every attention layer use torch's scaled_dot_product_attention
    (diffusers' and transformers' default with torch 2); ``default`` is the plain matmul-softmax
    path. ``channels_last`` stores conv weights NHWC (faster convolutions on recent GPUs).
    ``compile`` wraps the decoder UNet and the prior transformer in ``torch.compile`` (slow first
    calls; pays off on long runs). ``cpu_offload`` keeps weights in CPU memory and moves each model
    to the GPU only while it runs (diffusers' model CPU offload, for GPUs too small for a stage).
    ``prompt_cache_size``: text encodings kept per prior actor (0 disables the cache).
    """

    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    cpu_offload: bool = False
    prompt_cache_size: int = 1024

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be >= 0, got {self.prompt_cache_size}")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """One render job. Paths are fsspec URIs; ``storage_options`` go to every fsspec filesystem."""

    manifest: str
    output: str
    models: ModelPaths = field(default_factory=ModelPaths)
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    accel: AccelOptions = field(default_factory=AccelOptions)
    runner: str = "ray"
    address: str | None = None  # Ray address; None: RAY_ADDRESS or a local Ray
    prior: StageResources = field(default_factory=StageResources)
    decoder: StageResources = field(default_factory=StageResources)
    depth: StageResources = field(default_factory=lambda: StageResources(num_actors=1, num_gpus=0.0))
    batch_size: int = 4  # images per decoder call
    prior_batch_size: int | None = None  # images per prior call; None: batch_size
    seed: int = 0  # job seed: rows with a null seed derive theirs from (seed, id)
    defaults: RenderDefaults = field(default_factory=RenderDefaults)
    limits: Limits = field(default_factory=Limits)
    storage_options: dict[str, Any] = field(default_factory=dict)
    results_flush_rows: int = 1000
    results_flush_seconds: float = 30.0
    overwrite: bool = False
    retry_errors: bool = False  # rerender images whose final result is an error
    lease_ttl_s: float = 120.0  # the output lease expires this long after its last renewal
    lease_wait_s: float = 0.0  # how long to wait for another run's lease before giving up
    max_error_fraction: float = 1.0  # exit status 3 when more of this run's images end in error
    # stage name -> {"accelerator_type": str, "label_selector": {key: value}}: the node types it may use
    stage_placement: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prior_batch_size is not None and self.prior_batch_size < 1:
            raise ValueError(f"prior_batch_size must be >= 1, got {self.prior_batch_size}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.lease_ttl_s <= 0 or self.lease_wait_s < 0:
            raise ValueError("lease_ttl_s must be > 0 and lease_wait_s >= 0")
        if self.results_flush_rows < 1:
            raise ValueError(f"results_flush_rows must be >= 1, got {self.results_flush_rows}")
        for stage, placement in self.stage_placement.items():
            if stage not in ("prior", "decoder") or set(placement) - {"accelerator_type", "label_selector"}:
                raise ValueError(f"stage_placement: unknown stage or field in {stage!r}: {sorted(placement)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy with storage options redacted (they may hold credentials)."""
        data = dataclasses.asdict(self)
        data["storage_options"] = {key: "<redacted>" for key in self.storage_options}
        return data
