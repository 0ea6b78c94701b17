"""Depth stage: ControlNet rows without a ``hint`` get one estimated from their ``image``.

The hint is what diffusers' ControlNet docs build: the source image resized (bicubic) to the
output size, run through a transformers "depth-estimation" pipeline (DPT); its 8-bit depth map
travels on as PNG bytes in the ``hint`` column and the decoder stacks it to 3 channels / 255.
Note: transformers 5.x min-max normalises the depth map; 4.x scaled it by its maximum.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from actors.common import ModelStage
from actors.stage import Call, Outcome, with_errors
from schemas.loggers import logger_for
from schemas.manifest import IMAGE_REF
from schemas.modes import needs_depth
from schemas.stages import DEPTH

logger = logger_for(__name__)


class DepthActor(ModelStage):
    """Holds a depth-estimation model; fills ``hint`` for ControlNet rows that lack one.

    Input and output: `WORK_SCHEMA` tables, same rows in the same order. Rows that need no
    estimate pass through untouched; a row whose image cannot be loaded gets ``input_error``.
    ``model`` is a hub id (loaded at ``revision``; None: its main branch) or a local folder.
    """

    name = DEPTH.name

    def __init__(self, model: str, *, revision: str | None = None, **stage: Any) -> None:
        """Load the depth estimator ``model`` (in float32); ``stage``: see `actors.common.ModelStage`."""
        super().__init__(**stage)
        from transformers import pipeline

        self.estimator = pipeline(
            "depth-estimation",
            model=self.checkpoint(model),
            revision=self.revision(model, revision),
            device=self.device,
        )

    def wants(self, row: dict[str, Any]) -> bool:
        return needs_depth(row)

    def load(self, row: dict[str, Any]) -> Image.Image:
        """The row's image resized (bicubic) to the output size, as diffusers' ControlNet docs prepare it."""
        image = self.loader.rgb(row["image"], column="image")
        return image.resize((row["width"], row["height"]), resample=Image.BICUBIC)

    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[bytes]:
        """Estimate depth for each image; each 8-bit depth map as PNG bytes."""
        depths = self.estimator(list(call.inputs))
        return [_png(depth["depth"]) for depth in ([depths] if isinstance(depths, dict) else depths)]

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """``table`` with estimated hints in ``hint`` (as inline PNG bytes) and errors set."""
        hints = table.column("hint").to_pylist()
        for i, data in enumerate(outcome.outputs):
            if data is not None:
                hints[i] = {"uri": None, "data": data}
        column = pa.array(hints, IMAGE_REF)
        result = table.set_column(table.schema.get_field_index("hint"), table.schema.field("hint"), column)
        return with_errors(result, outcome.errors)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("L").save(buffer, format="PNG")
    return buffer.getvalue()
