"""Decoder stage: embeddings -> images -> PNG objects under the output prefix -> results rows."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.accel import prepare_pipeline
from actors.common import (
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    restore_generator,
    warn_untested_versions,
    worker_name,
)
from actors.images import encode_png, to_uint8
from actors.inputs import ImageLoader, hint_array
from actors.stage import Call, InputError, Outcome, Stage, describe_exception
from actors.storage import Storage
from schemas.config import AccelOptions
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_PIXELS
from schemas.modes import DECODER_INPUT_KWARGS, MODES
from schemas.results import ERROR_NON_FINITE, ERROR_WRITE, result_from_work, results_table
from schemas.work import CALL_KEY

logger = logging.getLogger(__name__)


def movq_scale(pipe: Any) -> int:
    """The spatial downsampling factor of a decoder pipeline's MoVQ (not every pipeline sets it)."""
    return 2 ** (len(pipe.movq.config.block_out_channels) - 1)


class DecoderActor(Stage):
    """Holds the decoder pipelines of the modes it serves; renders embedding rows and writes PNGs.

    ``models`` maps mode -> checkpoint (hub id or directory); each checkpoint loads once and the
    modes it serves share its modules (decoder: text2img + img2img; controlnet-depth: both
    ControlNet modes). ``movq_scales`` (checkpoint name -> scale), when given, are the MoVQ scales
    the plan refused sizes with; a checkpoint that loads with another scale is refused (ValueError).
    ``__call__`` takes an `embed_schema` table and returns a `RESULTS_SCHEMA` table with one row
    per input row, in order. Each row's generator is restored from the state the prior left, so an
    image equals a single-process diffusers run with that row's seed. Per-row failures (an input
    that cannot be loaded or has the wrong size, a non-finite output, a pipeline exception, a
    failed write) become ``error`` rows; the rest of the batch is unaffected.
    """

    name = "decoder"
    call_key = CALL_KEY

    def __init__(
        self,
        models: dict[str, str],
        *,
        output: str,
        run_id: str,
        movq_scales: dict[str, int] | None = None,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        dtype: str = "auto",
        device: str | None = None,
        accel: AccelOptions | None = None,
        max_batch_size: int | None = None,
        worker: str = "",
    ) -> None:
        import diffusers

        unknown = sorted(set(models) - set(MODES))
        if unknown:
            raise ValueError(f"DecoderActor cannot serve modes {unknown}; it serves {sorted(MODES)}")
        super().__init__(max_batch_size=max_batch_size, worker=worker_name(worker))
        quiet_libraries()
        warn_untested_versions("decoder")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipes: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for mode, path in sorted(models.items()):
            cls = getattr(diffusers, MODES[mode].pipeline)
            if path not in loaded:
                pipe = cls.from_pretrained(path, dtype=self.dtype)
                loaded[path] = prepare_pipeline(pipe, device=self.device, options=accel)
                pipe = loaded[path]
            else:
                pipe = cls(**loaded[path].components)
            pipe.set_progress_bar_config(disable=True)
            expected = (movq_scales or {}).get(MODES[mode].checkpoint)
            if expected is not None and movq_scale(pipe) != expected:
                raise ValueError(
                    f"{path}: its MoVQ scale is {movq_scale(pipe)} but the plan checked sizes for {expected}; "
                    "the checkpoint changed after planning"
                )
            self.pipes[mode] = pipe
        self.loader = ImageLoader(
            storage_options=storage_options, allowed_protocols=allowed_protocols, max_pixels=max_input_pixels
        )
        self.storage = Storage(output, storage_options=storage_options)
        self.run_id = run_id

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
        """One results row per input row: the PNG written for each image, or the row's error."""
        rows = table.drop_columns(["image_embeds", "negative_image_embeds"]).to_pylist()
        results = []
        for i, row in enumerate(rows):
            if row["error"] is not None:
                results.append(self._result(row, error=row["error"], error_kind=row["error_kind"]))
            elif i in outcome.errors:
                kind, message = outcome.errors[i]
                results.append(self._result(row, error=message, error_kind=kind))
            else:
                started = time.perf_counter()
                result = self._write(row, outcome.outputs[i])
                results.append(result | {"decoder_seconds": outcome.seconds[i] + time.perf_counter() - started})
        return results_table([result_from_work(**result) for result in results])

    def _write(self, row: dict[str, Any], image: np.ndarray) -> dict[str, Any]:
        if not np.isfinite(image).all():
            return self._result(row, error="decoder produced non-finite pixels (NaN/inf)", error_kind=ERROR_NON_FINITE)
        pixels = to_uint8(image)
        height, width = pixels.shape[:2]
        try:
            uri = self.storage.write_bytes(row["key"], encode_png(pixels))
        except Exception as exc:
            message = f"writing the image failed: {describe_exception(exc)}"
            return self._result(row, error=message, error_kind=ERROR_WRITE)
        return self._result(row, uri=uri, width=width, height=height)

    def _result(self, row: dict[str, Any], **outcome: Any) -> dict[str, Any]:
        return {"row": row, "run_id": self.run_id, "decoder_worker": self.worker, **outcome}
