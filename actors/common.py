"""Shared helpers of the model actors: device and dtype choice, generator hand-off, worker names."""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import torch

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
