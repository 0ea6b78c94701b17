"""Depth stage: ControlNet rows without a ``hint`` get one estimated from their ``image``.

The hint is what diffusers' ControlNet docs build: the source image resized (bicubic) to the
output size, run through a transformers "depth-estimation" pipeline (DPT); its 8-bit depth map
travels on as PNG bytes in the ``hint`` column and the decoder stacks it to 3 channels / 255.
Note: transformers 5.x min-max normalises the depth map; 4.x scaled it by its maximum.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pyarrow as pa
from PIL import Image

from actors.common import (
    describe_exception,
    quiet_libraries,
    resolve_device,
    warn_untested_versions,
    with_errors,
    worker_name,
)
from actors.inputs import ImageLoader, InputError
from schemas.manifest import CONTROLNET_MODES, DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_PIXELS, IMAGE_REF
from schemas.results import ERROR_INPUT, ERROR_RENDER

logger = logging.getLogger(__name__)


def needs_depth(row: dict) -> bool:
    """Whether ``row`` needs an estimated hint."""
    return row["error"] is None and row["mode"] in CONTROLNET_MODES and row["hint"] is None


class DepthActor:
    """Holds a depth-estimation model; fills ``hint`` for ControlNet rows that lack one.

    Input and output: `WORK_SCHEMA` tables, same rows in the same order. Rows that need no
    estimate pass through untouched; a row whose image cannot be loaded gets ``input_error``.
    ``model`` is a hub id (loaded at ``revision``; None: its main branch) or a local folder.
    """

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str | None = None,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        worker: str = "",
    ) -> None:
        from transformers import pipeline

        quiet_libraries()
        warn_untested_versions("depth")
        self.device = resolve_device(device)
        self.estimator = pipeline("depth-estimation", model=model, revision=revision, device=self.device)
        self.loader = ImageLoader(
            storage_options=storage_options, allowed_protocols=allowed_protocols, max_pixels=max_input_pixels
        )
        self.worker = worker_name(worker)

    def __call__(self, work: pa.Table) -> pa.Table:
        """Add estimated hints (see class docstring)."""
        rows = work.to_pylist()
        hints = work.column("hint").to_pylist()
        errors: dict[int, tuple[str, str]] = {}
        sources: dict[int, Image.Image] = {}
        for i, row in enumerate(rows):
            if needs_depth(row):
                try:
                    image = self.loader.rgb(row["image"], column="image")
                    sources[i] = image.resize((row["width"], row["height"]), resample=Image.BICUBIC)
                except InputError as exc:
                    errors[i] = (ERROR_INPUT, str(exc))
        if sources:
            positions = list(sources)
            try:
                depths = self.estimator([sources[i] for i in positions])
            except Exception as exc:
                logger.warning("depth batch of %d failed (%s); retrying rows one by one", len(positions), exc)
                depths = []
                for i in positions:
                    try:
                        depths.append(self.estimator(sources[i]))
                    except Exception as row_exc:
                        errors[i] = (ERROR_RENDER, f"depth estimation failed: {describe_exception(row_exc)}")
                        depths.append(None)
            for i, depth in zip(positions, depths):
                if depth is not None:
                    hints[i] = {"uri": None, "data": _png(depth["depth"])}
        table = work.set_column(
            work.schema.get_field_index("hint"), work.schema.field("hint"), pa.array(hints, IMAGE_REF)
        )
        return with_errors(table, errors)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("L").save(buffer, format="PNG")
    return buffer.getvalue()
