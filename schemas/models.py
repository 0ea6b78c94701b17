"""Where the checkpoints come from: the public hub ids, their pinned revisions, and a job's model paths."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

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
# The file that makes a folder a checkpoint: diffusers pipelines list their components in model_index.json;
# the depth estimator is a transformers model.
INDEX_FILES = {name: "config.json" if name == "depth" else "model_index.json" for name in HUB_MODELS}
# The job's files on each node (synced checkpoints, the example's tiny models); default ~/.cache/kandinsky-render.
CACHE_ENV = "KANDINSKY_RENDER_CACHE"


@dataclass(frozen=True, kw_only=True)
class ModelPaths:
    """Where each checkpoint loads from: a hub id or a directory in diffusers' save_pretrained layout."""

    prior: str = field(
        default=HUB_MODELS["prior"], metadata={"help": "prior checkpoint", "default_help": "MODELS/prior or {default}"}
    )
    decoder: str = field(
        default=HUB_MODELS["decoder"],
        metadata={"help": "text2img/img2img decoder", "default_help": "MODELS/decoder or {default}"},
    )
    decoder_inpaint: str = field(
        default=HUB_MODELS["decoder-inpaint"],
        metadata={
            "flag": "--inpaint-decoder",
            "help": "inpaint decoder",
            "default_help": "MODELS/decoder-inpaint or {default}",
        },
    )
    controlnet_depth: str = field(
        default=HUB_MODELS["controlnet-depth"],
        metadata={
            "flag": "--controlnet-decoder",
            "help": "ControlNet decoder",
            "default_help": "MODELS/controlnet-depth or {default}",
        },
    )
    depth: str = field(
        default=HUB_MODELS["depth"],
        metadata={
            "flag": "--depth-model",
            "help": "depth estimator for ControlNet rows without a hint",
            "default_help": "MODELS/depth or {default}",
        },
    )
    # Revision of the `depth` hub repository; None: the pinned one for the default id, else its main branch.
    depth_revision: str | None = field(
        default=None,
        metadata={
            "flag": "--depth-model-revision",
            "help": "hub revision (commit, tag or branch) of the depth model; unused for a folder",
            "default_help": f"{HUB_REVISIONS['depth']} for {HUB_MODELS['depth']}, else its main branch",
        },
    )

    # Where each node keeps its copy of checkpoints given as fsspec URIs (actors/weights.py).
    cache: str | None = field(
        default=None,
        metadata={
            "flag": "--model-cache",
            "metavar": "DIR",
            "help": "folder on each node where checkpoints given as URIs (s3://, gs://, ...) are synced, once per node",
            "default_help": f"${CACHE_ENV}/models, else ~/.cache/kandinsky-render/models",
        },
    )

    def depth_hub_revision(self) -> str | None:
        """The revision to load `depth` at: for a hub id ``depth_revision`` (the pinned one for the default
        id), None for a folder or URI."""
        if not is_hub_id(self.depth):
            return None
        if self.depth_revision is None and self.depth == HUB_MODELS["depth"]:
            return HUB_REVISIONS["depth"]
        return self.depth_revision

    def for_checkpoint(self, name: str) -> str:
        """Path of checkpoint ``name`` (a key of `HUB_MODELS`)."""
        return getattr(self, name.replace("-", "_"))

    @classmethod
    def resolve(
        cls,
        *,
        models_dir: str | None = None,
        depth_revision: str | None = None,
        cache: str | None = None,
        **overrides: str | None,
    ) -> ModelPaths:
        """Per component: an explicit override, else ``models_dir/<name>``, else the hub id.

        ``depth_revision`` None means the pinned `HUB_REVISIONS` one when ``depth`` is the default hub id
        (`depth_hub_revision`), else its main branch: a pinned revision names a commit of one repository.
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
        return cls(**values, depth_revision=depth_revision, cache=cache)


def is_hub_id(path: str) -> bool:
    """Whether ``path`` names a hub repository (``org/name``) rather than a local folder or an fsspec URI."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path) is not None and not os.path.isdir(path)


def is_remote(path: str) -> bool:
    """Whether ``path`` is an fsspec URI of another filesystem than this machine's (``s3://``, ``gs://``, ``hf://``...)."""
    protocol, sep, _ = path.partition("://")
    return bool(sep) and protocol not in ("file", "local")


def local_path(path: str) -> str:
    """``path`` without a ``file://`` or ``local://`` prefix."""
    for prefix in ("file://", "local://"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def cache_root() -> str:
    """The job's local cache folder on this node: ``$KANDINSKY_RENDER_CACHE``, default ``~/.cache/kandinsky-render``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kandinsky-render")


def cache_setting(cache: str | None) -> str:
    """Which setting chose the model cache folder (``cache``: the ``--model-cache`` value, if given), for messages that
    must name what to change: the flag, else the variable when set, else both as the way to move the default."""
    flag = next(item.metadata["flag"] for item in fields(ModelPaths) if item.name == "cache")
    if cache:
        return flag
    if os.environ.get(CACHE_ENV):
        return f"${CACHE_ENV}"
    return f"the default; {flag} DIR or ${CACHE_ENV} chooses another"


def movq_scale(block_out_channels: list[int] | tuple[int, ...]) -> int:
    """The spatial downsampling factor of a MoVQ with these ``block_out_channels`` (as the pipelines compute it)."""
    return 2 ** (len(block_out_channels) - 1)
