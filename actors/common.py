"""Shared parts of the model actors: the `ModelStage` set-up, device and dtype choice, generator hand-off, names."""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import torch

from actors.inputs import ImageLoader
from actors.stage import Stage
from actors.weights import local_checkpoint
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_PIXELS
from schemas.versions import version_mismatches

logger = logging.getLogger(__name__)
_warned_versions: set[str] = set()  # mismatch lines this process has logged already

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """``device`` if given, else CUDA when this process sees a GPU, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 elsewhere; other names map to torch dtypes."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for one output image (CPU so images do not depend on the GPU model)."""
    return torch.Generator("cpu").manual_seed(int(seed))


def generator_state(generator: torch.Generator) -> bytes:
    """The generator's full state as bytes (5056 bytes for a CPU generator)."""
    return generator.get_state().numpy().tobytes()


def restore_generator(state: bytes) -> torch.Generator:
    """A CPU generator continuing exactly where the one that produced ``state`` stopped."""
    generator = torch.Generator("cpu")
    generator.set_state(torch.from_numpy(np.frombuffer(state, dtype=np.uint8).copy()))
    return generator


def worker_name(extra: str = "") -> str:
    """``host:pid`` plus ``extra`` (the job adds the Ray GPU ids); recorded in every results row."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    return f"{name} {extra}".strip()


def quiet_libraries() -> None:
    """Silence per-call progress bars and info logs of diffusers/transformers inside actors."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def warn_untested_versions(stage: str) -> list[str]:
    """Log each pixel-relevant package whose version differs from the tested one; returns the mismatch lines.

    Each model actor calls it at start-up (cluster workers may run another image than the driver);
    a process logs a given line once, so stages sharing a process (``--runner local``) do not repeat it.
    """
    lines = version_mismatches()
    for line in lines:
        if line not in _warned_versions:
            _warned_versions.add(line)
            logger.warning("%s actor on %s: %s", stage, worker_name(), line)
    return lines


class ModelStage(Stage):
    """A `Stage` that holds a model: the set-up every model actor shares, done once here.

    Library chatter silenced (first: importing the pipelines already logs), untested package
    versions warned about, ``device`` (default: CUDA when visible, else the CPU) and ``dtype``
    resolved, and an `ImageLoader` for the stage's input images (``storage_options``,
    ``allowed_protocols``, ``max_input_pixels``). Subclasses load their model after ``super().__init__``,
    from `checkpoint` (a checkpoint on object storage is synced into ``model_cache`` with ``storage_options``).
    """

    def __init__(
        self,
        *,
        dtype: str = "auto",
        device: str | None = None,
        storage_options: dict | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        model_cache: str | None = None,
        max_batch_size: int | None = None,
        worker: str = "",
    ) -> None:
        quiet_libraries()
        super().__init__(max_batch_size=max_batch_size, worker=worker_name(worker))
        warn_untested_versions(self.name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.storage_options, self.model_cache = storage_options, model_cache
        self.loader = ImageLoader(
            storage_options=storage_options, allowed_protocols=allowed_protocols, max_pixels=max_input_pixels
        )

    def checkpoint(self, path: str) -> str:
        """What ``from_pretrained`` loads ``path`` from: a checkpoint on object storage is synced to this node first."""
        return local_checkpoint(path, storage_options=self.storage_options, cache=self.model_cache)
