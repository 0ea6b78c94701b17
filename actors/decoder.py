"""Decoder stage: embeddings -> images, handed to the writers as raw pixels (no encoding on the denoising path)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from actors.accel import compiled_modules, prepare_pipeline
from actors.common import ModelStage, generator_state, restore_generator, seeded_generator
from actors.inputs import hint_array
from actors.pixels import DENORMALIZED_PIPELINES, PixelCopy, Pixels, pixels_column, start_copy
from actors.stage import Call, InputError, Outcome, is_out_of_memory, with_errors
from schemas.config import AccelOptions
from schemas.models import movq_scale
from schemas.modes import DECODER_INPUT_KWARGS, MODES
from schemas.results import ERROR_NON_FINITE
from schemas.stages import DECODER
from schemas.work import CALL_KEY, DECODED_FIELDS, DECODER_DROPS

logger = logging.getLogger(__name__)

Warmup = tuple[str, int, int, int]  # (mode, height, width, batch_size) of calls to compile for at start
WARMUP_STEPS = 2  # denoising steps of a warm-up call: the UNet's graph does not depend on them


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

    The hot path leaves the GPU nothing to wait for: pixels are made uint8 on the device and copied
    once into pinned memory (`actors.pixels`), and the ``pixels`` column points into that copy. On
    CUDA the actor takes two calls at once (``concurrency("cuda")`` is 2: the Ray actor's
    ``max_concurrency``) and holds its device lock only while the pipeline runs, so one call's
    inputs load and the other's copy, table and IPC happen while the GPU denoises.

    With ``accel.compile``: the UNet runs with static shapes per call key (a partial batch is padded
    to ``max_batch_size`` with copies of its last row, whose outputs are dropped; eager runs keep
    their exact batch composition), and ``warmup`` lists the (mode, height, width, batch_size) calls
    to compile for before the actor counts as ready (guidance > 1, as almost every row has). A
    compile that fails turns the actor eager, with one warning line.
    """

    name = DECODER.name
    call_key = CALL_KEY
    overlaps_host_work = True

    def __init__(
        self,
        models: dict[str, str],
        *,
        movq_scales: dict[str, int] | None = None,
        accel: AccelOptions | None = None,
        warmup: Sequence[Warmup] = (),
        **stage: Any,
    ) -> None:
        """Load the checkpoints of ``models`` (compiled: see the class); ``stage``: see `actors.common.ModelStage`."""
        unknown = sorted(set(models) - set(MODES))
        if unknown:
            raise ValueError(f"DecoderActor cannot serve modes {unknown}; it serves {sorted(MODES)}")
        warmup = [tuple(entry) for entry in warmup]
        for entry in warmup:
            mode, height, width, batch_size = entry
            if mode not in models or min(height, width, batch_size) < 1:
                raise ValueError(
                    f"warmup entry {entry}: needs a mode this actor serves {sorted(models)} and sizes >= 1"
                )
        super().__init__(**stage)
        import diffusers

        self.pipes: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for mode, path in sorted(models.items()):
            cls = getattr(diffusers, MODES[mode].pipeline)
            if path not in loaded:
                pipe = cls.from_pretrained(self.checkpoint(path), revision=self.revision(path), dtype=self.dtype)
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
        self.compiled = list({id(m): m for pipe in loaded.values() for m in compiled_modules(pipe)}.values())
        if self.compiled and warmup:
            self._warm_up(warmup)

    def _warm_up(self, warmup: Sequence[Warmup]) -> None:
        """Compile for each (mode, height, width, batch_size) by rendering blank inputs; stops if compiling fails."""
        started = time.perf_counter()
        for mode, height, width, batch_size in dict.fromkeys(warmup):
            batch_size = min(batch_size, self.max_batch_size or batch_size)  # run() pads to max_batch_size
            call, arrays = self._blank_call(mode, height=height, width=width, batch_size=batch_size)
            try:
                self.collect(call, self.run(call, arrays))
            except Exception as exc:
                if self.recover(exc):  # logged: the actor runs eagerly, nothing left to warm up
                    return
                if is_out_of_memory(exc):
                    self.release_memory()
                logger.warning(
                    "decoder warm-up at %s %dx%d, batch %d failed (%s); its first real call compiles instead",
                    mode,
                    height,
                    width,
                    batch_size,
                    " ".join(str(exc).split())[:300],
                )
        logger.info("decoder: compiled for %d call shape(s) in %.1f s", len(set(warmup)), time.perf_counter() - started)

    def _blank_call(self, mode_name: str, *, height: int, width: int, batch_size: int) -> tuple[Call, dict]:
        """A call of ``batch_size`` rows of ``mode_name`` with zero embeddings and blank input images."""
        mode, pipe = MODES[mode_name], self.pipes[mode_name]
        row = {
            "mode": mode_name,
            "height": height,
            "width": width,
            "num_inference_steps": WARMUP_STEPS,
            "guidance_scale": 4.0,
            "strength": 1.0,
            "generator_state": generator_state(seeded_generator(0)),
        }
        inputs: dict[str, Any] = {}
        if "image" in mode.required:
            inputs["image"] = Image.new("RGB", (width, height), (128, 128, 128))
        if "mask" in mode.reads:
            inputs["mask"] = Image.new("L", (width, height), 255)
        if "hint" in mode.reads:
            inputs["hint"] = hint_array(Image.new("RGB", (width, height)))
        zeros = np.zeros((batch_size, int(pipe.unet.config.encoder_hid_dim)), np.float32)
        call = Call(positions=list(range(batch_size)), rows=[row] * batch_size, inputs=[inputs] * batch_size)
        return call, {"image_embeds": zeros, "negative_image_embeds": zeros}

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
    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> PixelCopy:
        """One pipeline call for rows that share `CALL_KEY`; returns the images on their way to the host."""
        first = call.rows[0]
        mode = MODES[first["mode"]]
        pipe = self.pipes[mode.name]
        dtype = pipe.unet.dtype
        count = len(call.positions)
        # A compiled UNet keeps one shape per call key: a partial batch is padded with copies of its
        # last row (each with a generator of its own, so the real rows draw what they would alone).
        padding = max(0, (self.max_batch_size or 0) - count) if self.compiled else 0
        positions = call.positions + call.positions[-1:] * padding
        rows = call.rows + call.rows[-1:] * padding
        inputs = call.inputs + call.inputs[-1:] * padding

        def tensor(values: np.ndarray) -> torch.Tensor:
            # Decoders only cast embeddings and hints to the UNet dtype when guidance > 1 (diffusers 0.42.1).
            return torch.from_numpy(np.ascontiguousarray(values)).to(device=self.device, dtype=dtype)

        kwargs: dict[str, Any] = {
            "image_embeds": tensor(arrays["image_embeds"][positions]),
            "negative_image_embeds": tensor(arrays["negative_image_embeds"][positions]),
            "height": first["height"],
            "width": first["width"],
            "num_inference_steps": first["num_inference_steps"],
            "guidance_scale": first["guidance_scale"],
            "num_images_per_prompt": 1,
            "generator": [restore_generator(row["generator_state"]) for row in rows],
            "output_type": "pt",  # uint8 is made on the device (actors.pixels), as "np" + to_uint8 would
            "return_dict": False,
        }
        for column in sorted(inputs[0]):
            values = [item[column] for item in inputs]
            kwargs[DECODER_INPUT_KWARGS[column]] = tensor(np.stack(values)) if column == "hint" else values
        if mode.partial_schedule:
            kwargs["strength"] = first["strength"]
        images = pipe(**kwargs)[0]
        return start_copy(images[:count], denormalized=mode.pipeline in DENORMALIZED_PIPELINES)

    def collect(self, call: Call, produced: PixelCopy) -> list[Pixels]:
        """Wait (outside the device lock) for the call's pixels to reach the host."""
        return produced.wait()

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """The rows with their pixels (or their errors), the inputs dropped; the pixels are not copied."""
        n = table.num_rows
        errors = dict(outcome.errors)
        images: list[Pixels | None] = []
        for i, image in enumerate(outcome.outputs):
            if image is not None and not image.finite:  # NaN survives diffusers' clamp; inf does not
                errors[i] = (ERROR_NON_FINITE, "decoder produced non-finite pixels (NaN/inf)")
                image = None
            images.append(image)
        kept = with_errors(table.drop_columns([c for c in DECODER_DROPS if c in table.column_names]), errors)
        columns = [
            pixels_column(images),
            pa.array([None if image is None else image.height for image in images], pa.int32()),
            pa.array([None if image is None else image.width for image in images], pa.int32()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        for field, column in zip(DECODED_FIELDS, columns):
            kept = kept.append_column(field, column)
        return kept
