"""Shared parts of the model actors: the `ModelStage` set-up, device and dtype choice, generator hand-off, names."""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from actors.compiled import is_compile_failure, run_eagerly
from actors.inputs import ImageLoader
from actors.pins import Pin
from actors.stage import Stage, describe_exception, worker_name
from actors.weights import CheckpointSyncError, local_checkpoint, models_cache
from schemas.accel import dtype_name
from schemas.loggers import logger_for
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_INPUT_PIXELS
from schemas.models import cache_setting
from schemas.resources import co_located_memory_fraction
from schemas.text import exception_text
from schemas.versions import unreported, version_mismatches

logger = logger_for(__name__)
T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """``device`` if given, else CUDA when this process sees a GPU, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`schemas.config.dtype_name` (``auto``: float16 on CUDA, float32 elsewhere) as a torch dtype."""
    dtype = dtype_name(dtype, cuda=device.type == "cuda")
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


_SHARED: dict[tuple, Any] = {}


def shared_model(key: tuple, load: Callable[[], T] | None = None) -> T | None:
    """One copy per process of the model ``load`` makes for ``key``, so stages in one actor share weights (the
    CLIP group's prior and scorer use the same CLIP encoders). Without ``load``: the copy if one was made, else None."""
    if key not in _SHARED and load is not None:
        _SHARED[key] = load()
    return _SHARED.get(key)


def release_shared_models() -> int:
    """Forget every model `shared_model` holds (their memory is freed once no actor holds them); returns how many."""
    count = len(_SHARED)
    _SHARED.clear()
    return count


def prior_pipeline_key(model: str, *, dtype: torch.dtype, device: torch.device) -> tuple:
    """`shared_model` key of a prior checkpoint's pipeline on a device."""
    return ("prior-pipeline", model, str(dtype), str(device))


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
    a process logs a given line once (`schemas.versions.unreported`), so stages sharing a process with each other
    or with the driver (``--runner local``) do not repeat it.
    """
    lines = version_mismatches()
    for line in unreported(lines):
        logger.warning("%s actor on %s: %s", stage, worker_name(), line)
    return lines


class ModelStage(Stage):
    """A `Stage` that holds a model: the set-up every model actor shares, done once here.

    Library chatter silenced (first: importing the pipelines already logs), untested package
    versions warned about, ``device`` (default: CUDA when visible, else the CPU) and ``dtype``
    resolved, and an `ImageLoader` for the stage's input images (``storage_options``,
    ``allowed_protocols``, ``max_input_pixels``, ``max_input_bytes``). Subclasses load their model after
    ``super().__init__``, from `checkpoint` (a checkpoint on object storage is synced into ``model_cache``
    with ``storage_options``), and list the modules `actors.accel.prepare_pipeline` compiled in ``compiled``.
    ``memory_role`` (``clip`` or ``decoder``, for actors that share a GPU): the process may allocate only its share
    of the GPU's memory (`schemas.resources.co_located_memory_fraction`).

    On CUDA: cuDNN picks the fastest convolution algorithm for each shape it meets
    (``cudnn.benchmark``); after an out-of-memory failure the CUDA cache is emptied before the
    split halves run; a failed ``torch.compile`` turns every compiled module of the actor back to
    eager, with one warning line (`recover`).
    """

    def __init__(
        self,
        *,
        dtype: str = "auto",
        device: str | None = None,
        storage_options: dict | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        model_cache: str | None = None,
        memory_role: str | None = None,
        pins: dict[str, Pin] | None = None,
        max_batch_size: int | None = None,
        worker: str = "",
    ) -> None:
        quiet_libraries()
        super().__init__(max_batch_size=max_batch_size, worker=worker_name(worker))
        warn_untested_versions(self.name)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.storage_options, self.model_cache, self.pins = storage_options, model_cache, pins or {}
        self.loader = ImageLoader(
            storage_options=storage_options,
            allowed_protocols=allowed_protocols,
            max_pixels=max_input_pixels,
            max_bytes=max_input_bytes,
        )
        self.compiled: list[torch.nn.Module] = []  # filled by subclasses: modules torch.compile wraps
        if self.device.type == "cuda":
            # Fastest algorithm per convolution shape, found at the first call of each shape (batch
            # sizes and image sizes repeat for a whole run). Pixels may differ by float noise between
            # GPUs and runs, as they already do between GPU kinds.
            torch.backends.cudnn.benchmark = True
            self.memory_name = "GPU memory"
            if memory_role is not None:  # an actor sharing its GPU (co-located) stays within its share
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(co_located_memory_fraction(memory_role, total), self.device)

    @property
    def overlapping(self) -> bool:
        """On CUDA, stages that `overlaps_host_work` hold the device lock only around `run`."""
        return self.overlaps_host_work and self.device.type == "cuda"

    def reset(self) -> None:
        """`Stage.reset`, and the input images cached by URI are forgotten (the objects may have changed since)."""
        super().reset()
        self.loader.clear()

    def release_memory(self) -> None:
        """Collect what the failed call left (reference cycles) and give CUDA's cached blocks back."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def recover(self, exc: BaseException) -> bool:
        """A ``torch.compile`` failure: every compiled module of this actor runs eagerly from now on."""
        if not self.compiled or not is_compile_failure(exc):
            return False
        run_eagerly(self.compiled)
        self.compiled = []
        logger.warning(
            "%s actor on %s: torch.compile failed, running eagerly from now on: %s",
            self.name,
            self.worker,
            describe_exception(exc)[:300],
        )
        return True

    def checkpoint(self, path: str) -> str:
        """What ``from_pretrained`` loads ``path`` from: a checkpoint on object storage is synced to this node first,
        at the version the run pinned (`actors.weights`). A failed sync is one `CheckpointSyncError` line naming the
        checkpoint, the cache folder and the setting that chose it (the actor does not start)."""
        try:
            return local_checkpoint(
                path, storage_options=self.storage_options, cache=self.model_cache, pin=self.pins.get(path)
            )
        except Exception as exc:
            cache = self.model_cache or models_cache()
            raise CheckpointSyncError(
                f"{path}: cannot sync it into the model cache {cache} ({cache_setting(self.model_cache)}) on "
                f"node {socket.gethostname()}: {exception_text(exc)}"
            ) from exc

    def revision(self, path: str, default: str | None = None) -> str | None:
        """The hub revision to load ``path`` at: the commit the run pinned for a hub id, else ``default``."""
        pin = self.pins.get(path)
        return pin.revision if pin is not None and pin.revision else default
