"""Decoder stage: embeddings -> images -> PNG objects under the output prefix -> results rows."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.accel import prepare_pipeline
from actors.common import (
    describe_exception,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    restore_generator,
    warn_untested_versions,
    worker_name,
)
from actors.images import encode_png, to_uint8
from actors.inputs import ImageLoader, InputError, hint_array
from actors.storage import Storage
from schemas.config import DECODER_FOR_MODE, AccelOptions
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_PIXELS
from schemas.results import (
    ERROR_INPUT,
    ERROR_NON_FINITE,
    ERROR_RENDER,
    ERROR_UNSUPPORTED_SIZE,
    ERROR_WRITE,
    ResultRow,
    result_from_work,
    results_table,
)
from schemas.work import CALL_KEY

logger = logging.getLogger(__name__)

_PIPELINE_FOR_MODE = {
    "text2img": "KandinskyV22Pipeline",
    "img2img": "KandinskyV22Img2ImgPipeline",
    "inpaint": "KandinskyV22InpaintPipeline",
    "controlnet": "KandinskyV22ControlnetPipeline",
    "controlnet_img2img": "KandinskyV22ControlnetImg2ImgPipeline",
}


class DecoderActor:
    """Holds the decoder pipelines of the modes it serves; renders embedding rows and writes PNGs.

    ``models`` maps mode -> checkpoint (hub id or directory); each checkpoint loads once and the
    modes it serves share its modules (decoder: text2img + img2img; controlnet-depth: both
    ControlNet modes). ``__call__`` takes an `EMBED_SCHEMA` table and returns a `RESULTS_SCHEMA`
    table with one row per input row, in order. Each row's generator is restored from the state the
    prior left, so an image equals a single-process diffusers run with that row's seed. Per-row
    failures (an input that cannot be loaded or has the wrong size, a size the decoder would
    change, a non-finite output, a pipeline exception, a failed write) become ``error`` rows; the
    rest of the batch is unaffected.
    """

    def __init__(
        self,
        models: dict[str, str],
        *,
        output: str,
        run_id: str,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        dtype: str = "auto",
        device: str | None = None,
        accel: AccelOptions | None = None,
        worker: str = "",
    ) -> None:
        import diffusers

        unknown = sorted(set(models) - set(_PIPELINE_FOR_MODE))
        if unknown:
            raise ValueError(f"DecoderActor cannot serve modes {unknown}; it serves {sorted(_PIPELINE_FOR_MODE)}")
        quiet_libraries()
        warn_untested_versions("decoder")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipes: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for mode, path in sorted(models.items()):
            cls = getattr(diffusers, _PIPELINE_FOR_MODE[mode])
            if path not in loaded:
                pipe = cls.from_pretrained(path, dtype=self.dtype)
                loaded[path] = prepare_pipeline(pipe, device=self.device, options=accel)
                pipe = loaded[path]
            else:
                pipe = cls(**loaded[path].components)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[mode] = pipe
        self.loader = ImageLoader(
            storage_options=storage_options, allowed_protocols=allowed_protocols, max_pixels=max_input_pixels
        )
        self.storage = Storage(output, storage_options=storage_options)
        self.run_id = run_id
        self.worker = worker_name(worker)

    def size_problem(self, mode: str, height: int, width: int) -> str | None:
        """Why this decoder cannot render exactly ``height`` x ``width`` in ``mode``; None if it can."""
        scale = 2 ** (len(self.pipes[mode].movq.config.block_out_channels) - 1)  # not every pipeline sets it
        # text2img, inpaint and ControlNet round each side UP to a multiple of scale**2 (inpaint
        # crashes instead); the img2img family rounds DOWN to a multiple of scale (KANDINSKY_NOTES.md).
        multiple = scale if mode == "img2img" else scale**2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                down, up = value // multiple * multiple, -(-value // multiple) * multiple
                would = f"silently crop it to {down}" if mode == "img2img" else f"silently render {up}"
                if mode == "inpaint":
                    would = "crash"
                return (
                    f"{name}={value} is not a multiple of {multiple}: in mode {mode} the "
                    f"{DECODER_FOR_MODE[mode]} checkpoint would {would}; ask for a multiple of {multiple}"
                )
        if mode == "controlnet_img2img" and height != width:
            # diffusers 0.42.1 passes (width, height) to preprocess(image, height, width): the image
            # latents come out transposed and no hint fits them.
            return f"mode controlnet_img2img needs a square size in diffusers 0.42.1 (got {height}x{width})"
        return None

    def _inputs(self, row: dict) -> dict[str, Any]:
        """Load and check the images ``row``'s mode needs; raises `InputError`."""
        mode, height, width = row["mode"], row["height"], row["width"]
        inputs: dict[str, Any] = {}
        if mode in ("img2img", "inpaint", "controlnet_img2img"):
            inputs["image"] = self.loader.rgb(row["image"], column="image")
        if mode == "inpaint":
            mask = self.loader.mask(row["mask"], column="mask")
            if mask.size != inputs["image"].size:
                raise InputError(
                    f"mask: {mask.size[0]}x{mask.size[1]} (width x height) differs from its image's "
                    f"{inputs['image'].size[0]}x{inputs['image'].size[1]}"
                )
            inputs["mask"] = mask
        if mode in ("controlnet", "controlnet_img2img"):
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

    def __call__(self, embeds: pa.Table) -> pa.Table:
        """Render, write and report every row of ``embeds`` (see class docstring)."""
        rows = embeds.to_pylist()
        results: list[ResultRow | None] = [None] * len(rows)
        inputs: dict[int, dict[str, Any]] = {}
        for i, row in enumerate(rows):
            if row["error"]:
                results[i] = self._result(row, error=row["error"], error_kind=row["error_kind"])
                continue
            problem = self.size_problem(row["mode"], row["height"], row["width"])
            if problem:
                results[i] = self._result(row, error=problem, error_kind=ERROR_UNSUPPORTED_SIZE)
                continue
            try:
                inputs[i] = self._inputs(row)
            except InputError as exc:
                results[i] = self._result(row, error=str(exc), error_kind=ERROR_INPUT)
        key = lambda i: tuple(rows[i][name] for name in CALL_KEY)  # noqa: E731
        for _, group in itertools.groupby(sorted(inputs, key=key), key=key):
            positions = list(group)
            started = time.perf_counter()
            try:
                images = self._decode([rows[i] for i in positions], [inputs[i] for i in positions])
            except Exception as exc:  # isolate the failing row(s): retry one by one
                logger.warning("decoder batch of %d failed (%s); retrying rows one by one", len(positions), exc)
                images = []
                for i in positions:
                    try:
                        images.extend(self._decode([rows[i]], [inputs[i]]))
                    except Exception as row_exc:
                        images.append(row_exc)
            finished = [self._finish(rows[i], image) for i, image in zip(positions, images)]
            share = (time.perf_counter() - started) / len(positions)
            for i, result in zip(positions, finished):
                results[i] = dataclasses.replace(result, decoder_seconds=share)
        return results_table(results)

    @torch.inference_mode()
    def _decode(self, rows: list[dict], inputs: list[dict[str, Any]]) -> list[np.ndarray]:
        """One pipeline call for rows that share `CALL_KEY`; returns (H, W, 3) float arrays in [0, 1]."""
        first = rows[0]
        mode = first["mode"]
        pipe = self.pipes[mode]
        dtype = pipe.unet.dtype
        # Decoders only cast embeddings and hints to the UNet dtype when guidance > 1 (KANDINSKY_NOTES.md).
        kwargs: dict[str, Any] = {
            "image_embeds": torch.tensor(np.stack([r["image_embeds"] for r in rows]), dtype=dtype, device=self.device),
            "negative_image_embeds": torch.tensor(
                np.stack([r["negative_image_embeds"] for r in rows]), dtype=dtype, device=self.device
            ),
            "height": first["height"],
            "width": first["width"],
            "num_inference_steps": first["num_inference_steps"],
            "guidance_scale": first["guidance_scale"],
            "num_images_per_prompt": 1,
            "generator": [restore_generator(row["generator_state"]) for row in rows],
            "output_type": "np",
            "return_dict": False,
        }
        if "image" in inputs[0]:
            kwargs["image"] = [item["image"] for item in inputs]
        if mode == "inpaint":
            kwargs["mask_image"] = [item["mask"] for item in inputs]
        if "hint" in inputs[0]:
            kwargs["hint"] = torch.tensor(np.stack([item["hint"] for item in inputs]), dtype=dtype, device=self.device)
        if mode in ("img2img", "controlnet_img2img"):
            kwargs["strength"] = first["strength"]
        return list(pipe(**kwargs)[0])

    def _finish(self, row: dict, image: np.ndarray | BaseException) -> ResultRow:
        if isinstance(image, BaseException):
            return self._result(row, error=f"decoder failed: {describe_exception(image)}", error_kind=ERROR_RENDER)
        if not np.isfinite(image).all():
            return self._result(row, error="decoder produced non-finite pixels (NaN/inf)", error_kind=ERROR_NON_FINITE)
        pixels = to_uint8(image)
        height, width = pixels.shape[:2]
        try:
            uri = self.storage.write_bytes(row["key"], encode_png(pixels))
        except Exception as exc:
            return self._result(
                row, error=f"writing the image failed: {describe_exception(exc)}", error_kind=ERROR_WRITE
            )
        return self._result(row, uri=uri, width=width, height=height)

    def _result(self, row: dict, **outcome: Any) -> ResultRow:
        return result_from_work(row, run_id=self.run_id, decoder_worker=self.worker, **outcome)
