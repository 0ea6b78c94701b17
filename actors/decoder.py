"""Decoder stage: embeddings -> images, handed to the writers as raw pixels (no encoding on the denoising path)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.accel import prepare_pipeline
from actors.common import ModelStage, restore_generator
from actors.images import to_uint8
from actors.inputs import hint_array
from actors.stage import Call, InputError, Outcome, with_errors
from schemas.config import AccelOptions
from schemas.models import movq_scale
from schemas.modes import DECODER_INPUT_KWARGS, MODES
from schemas.results import ERROR_NON_FINITE
from schemas.stages import DECODER
from schemas.work import CALL_KEY, DECODED_FIELDS, DECODER_DROPS

logger = logging.getLogger(__name__)


class DecoderActor(ModelStage):
    """Holds the decoder pipelines of the modes it serves; renders embedding rows into pixels.

    ``models`` maps mode -> checkpoint (hub id or directory); each checkpoint loads once and the
    modes it serves share its modules (decoder: text2img + img2img; controlnet-depth: both
    ControlNet modes). ``movq_scales`` (checkpoint name -> scale), when given, are the MoVQ scales
    the plan refused sizes with; a checkpoint that loads with another scale is refused (ValueError).
    ``__call__`` takes an `embed_schema` table and returns its rows, in order, without the inputs
    (`schemas.work.DECODER_DROPS`) and with `schemas.work.DECODED_FIELDS` added: each image as raw
    uint8 pixels, exactly what diffusers' ``numpy_to_pil`` would make. Each row's generator is
    restored from the state the prior left, so an image equals a single-process diffusers run with
    that row's seed. Per-row failures (an input that cannot be loaded or has the wrong size, a
    non-finite output, a pipeline exception) become ``error`` rows; the rest of the batch is unaffected.
    """

    name = DECODER.name
    call_key = CALL_KEY

    def __init__(
        self,
        models: dict[str, str],
        *,
        movq_scales: dict[str, int] | None = None,
        accel: AccelOptions | None = None,
        **stage: Any,
    ) -> None:
        """Load the checkpoints of ``models``; ``stage``: see `actors.common.ModelStage`."""
        unknown = sorted(set(models) - set(MODES))
        if unknown:
            raise ValueError(f"DecoderActor cannot serve modes {unknown}; it serves {sorted(MODES)}")
        super().__init__(**stage)
        import diffusers

        self.pipes: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for mode, path in sorted(models.items()):
            cls = getattr(diffusers, MODES[mode].pipeline)
            if path not in loaded:
                pipe = cls.from_pretrained(self.checkpoint(path), dtype=self.dtype)
                loaded[path] = prepare_pipeline(pipe, device=self.device, options=accel)
                pipe = loaded[path]
            else:
                pipe = cls(**loaded[path].components)
            pipe.set_progress_bar_config(disable=True)
            expected = (movq_scales or {}).get(MODES[mode].checkpoint)
            scale = movq_scale(pipe.movq.config.block_out_channels)  # not every pipeline sets its own
            if expected is not None and scale != expected:
                raise ValueError(
                    f"{path}: its MoVQ scale is {scale} but the plan checked sizes for {expected}; "
                    "the checkpoint changed after planning"
                )
            self.pipes[mode] = pipe

    def load(self, row: dict[str, Any]) -> dict[str, Any]:
        """Load and check the images ``row``'s mode reads (`schemas.modes.Mode.reads`); raises `InputError`."""
        mode, height, width = MODES[row["mode"]], row["height"], row["width"]
        inputs: dict[str, Any] = {}
        if "image" in mode.required:
            inputs["image"] = self.loader.rgb(row["image"], column="image")
        if "mask" in mode.reads:
            mask = self.loader.mask(row["mask"], column="mask")
            if mask.size != inputs["image"].size:
                raise InputError(
                    f"mask: {mask.size[0]}x{mask.size[1]} (width x height) differs from its image's "
                    f"{inputs['image'].size[0]}x{inputs['image'].size[1]}"
                )
            inputs["mask"] = mask
        if "hint" in mode.reads:
            if row["hint"] is None:
                raise InputError("hint: missing and no depth estimate was made (the depth stage did not run)")
            hint = self.loader.load(row["hint"], column="hint")
            if hint.size != (width, height):
                raise InputError(
                    f"hint: {hint.size[0]}x{hint.size[1]} (width x height) but the output is {width}x{height}; "
                    "a hint must have the output size"
                )
            inputs["hint"] = hint_array(hint)
        return inputs

    @torch.inference_mode()
    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One pipeline call for rows that share `CALL_KEY`; returns (H, W, 3) float arrays in [0, 1]."""
        first = call.rows[0]
        mode = MODES[first["mode"]]
        pipe = self.pipes[mode.name]
        dtype = pipe.unet.dtype

        def tensor(values: np.ndarray) -> torch.Tensor:
            # Decoders only cast embeddings and hints to the UNet dtype when guidance > 1 (diffusers 0.42.1).
            return torch.from_numpy(np.ascontiguousarray(values)).to(device=self.device, dtype=dtype)

        kwargs: dict[str, Any] = {
            "image_embeds": tensor(arrays["image_embeds"][call.positions]),
            "negative_image_embeds": tensor(arrays["negative_image_embeds"][call.positions]),
            "height": first["height"],
            "width": first["width"],
            "num_inference_steps": first["num_inference_steps"],
            "guidance_scale": first["guidance_scale"],
            "num_images_per_prompt": 1,
            "generator": [restore_generator(row["generator_state"]) for row in call.rows],
            "output_type": "np",
            "return_dict": False,
        }
        for column in sorted(call.inputs[0]):
            values = [item[column] for item in call.inputs]
            kwargs[DECODER_INPUT_KWARGS[column]] = tensor(np.stack(values)) if column == "hint" else values
        if mode.partial_schedule:
            kwargs["strength"] = first["strength"]
        return list(pipe(**kwargs)[0])

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """The rows with their pixels (or their errors), the inputs dropped."""
        n = table.num_rows
        errors = dict(outcome.errors)
        pixels: list[bytes | None] = [None] * n
        shapes: list[tuple[int | None, int | None]] = [(None, None)] * n
        for i, image in enumerate(outcome.outputs):
            if image is None:
                continue
            if not np.isfinite(image).all():
                errors[i] = (ERROR_NON_FINITE, "decoder produced non-finite pixels (NaN/inf)")
                continue
            values = to_uint8(image)
            pixels[i], shapes[i] = values.tobytes(), values.shape[:2]
        kept = with_errors(table.drop_columns([c for c in DECODER_DROPS if c in table.column_names]), errors)
        columns = [
            pa.array(pixels, pa.binary()),
            pa.array([h for h, _ in shapes], pa.int32()),
            pa.array([w for _, w in shapes], pa.int32()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        for field, column in zip(DECODED_FIELDS, columns):
            kept = kept.append_column(field, column)
        return kept
