"""Decoder stage: embeddings -> images, handed to the writers as raw pixels (no encoding on the denoising path)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_inpainting import prepare_mask_and_masked_image
from PIL import Image

from actors.accel import prepare_pipeline
from actors.common import ModelStage, generator_state, restore_generator, seeded_generator
from actors.compiled import compiled_modules, guards
from actors.denoise import PlannedScheduler, call_start, draw_noise, plannable, use_vectorized_prepare_mask
from actors.inputs import hint_array
from actors.pixels import DENORMALIZED_PIPELINES, PixelCopy, Pixels, pixels_column, start_copy
from actors.stage import Call, InputError, Outcome, is_out_of_memory, with_errors
from actors.transfers import Uploaded, Uploader
from schemas.accel import AccelOptions
from schemas.loggers import logger_for
from schemas.models import movq_scale
from schemas.modes import DECODER_INPUT_KWARGS, MODES, Mode
from schemas.results import ERROR_NON_FINITE
from schemas.stages import DECODER
from schemas.work import CALL_KEY, DECODED_FIELDS, DECODER_DROPS

logger = logger_for(__name__)

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
        if "inpaint" in models:
            use_vectorized_prepare_mask()
        for mode, path in sorted(models.items()):
            cls = getattr(diffusers, MODES[mode].pipeline)
            if path not in loaded:
                pipe = cls.from_pretrained(self.checkpoint(path), revision=self.revision(path), dtype=self.dtype)
                if plannable(pipe.scheduler):  # before the checkpoint's other pipelines share its components
                    pipe.scheduler = PlannedScheduler.from_config(pipe.scheduler.config)
                loaded[path] = prepare_pipeline(pipe, device=self.device, options=accel)
                pipe = loaded[path]
            else:
                pipe = cls(**loaded[path].components)
            pipe.set_progress_bar_config(disable=True)
            if hasattr(pipe, "image_processor"):  # img2img variants: images arrive preprocessed by `load`
                pipe.image_processor = PreparedImages(pipe.image_processor)
            expected = (movq_scales or {}).get(MODES[mode].checkpoint)
            scale = movq_scale(pipe.movq.config.block_out_channels)  # not every pipeline sets its own
            if expected is not None and scale != expected:
                raise ValueError(
                    f"{path}: its MoVQ scale is {scale} but the plan checked sizes for {expected}; "
                    "the checkpoint changed after planning"
                )
            self.pipes[mode] = pipe
        self.compiled = list({id(m): m for pipe in loaded.values() for m in compiled_modules(pipe)}.values())
        self.uploader = Uploader(self.device)
        if self.compiled and warmup:
            self._warm_up(warmup)

    @classmethod
    def concurrency(cls, device: str, **kwargs: Any) -> int:
        """`Stage.concurrency`; one call at a time when the decoder replays CUDA graphs (one device thread)."""
        accel = kwargs.get("accel")
        return 1 if accel is not None and accel.cuda_graphs else super().concurrency(device)

    def _warm_up(self, warmup: Sequence[Warmup]) -> None:
        """Compile every shape the run will call before the actor is ready: each (mode, height, width) at its batch
        size and each smaller size out-of-memory splits make, each with and without guidance (the UNet batch is
        doubled or not), by rendering blank inputs; then shapes not compiled run eagerly (`ShapeGuard`). Stops,
        eager, if compiling fails."""
        started = time.perf_counter()
        shapes = []
        for mode, height, width, batch_size in dict.fromkeys(warmup):
            size = min(batch_size, self.max_batch_size or batch_size)  # run() pads to max_batch_size
            while size >= 1:
                shapes += [(mode, height, width, size, guidance) for guidance in (4.0, 1.0)]
                size = size // 2 if size > 1 else 0
        for mode, height, width, batch_size, guidance in dict.fromkeys(shapes):
            call, arrays = self._blank_call(mode, height=height, width=width, batch_size=batch_size, guidance=guidance)
            try:
                self.collect(call, self.run(call, arrays, pad=False))
            except Exception as exc:
                if self.recover(exc):  # logged: the actor runs eagerly, nothing left to warm up
                    return
                if is_out_of_memory(exc):
                    self.release_memory()
                logger.warning(
                    "decoder warm-up at %s %dx%d, batch %d, guidance %g failed (%s); that shape runs eagerly",
                    mode,
                    height,
                    width,
                    batch_size,
                    guidance,
                    " ".join(str(exc).split())[:300],
                )
        for guard in guards(self.compiled):
            guard.seal()
        logger.info("decoder: compiled %d call shape(s) in %.1f s", len(set(shapes)), time.perf_counter() - started)

    def _blank_call(
        self, mode_name: str, *, height: int, width: int, batch_size: int, guidance: float = 4.0
    ) -> tuple[Call, dict]:
        """A call of ``batch_size`` rows of ``mode_name`` with zero embeddings and blank input images."""
        mode, pipe = MODES[mode_name], self.pipes[mode_name]
        row = {
            "mode": mode_name,
            "height": height,
            "width": width,
            "num_inference_steps": WARMUP_STEPS,
            "guidance_scale": guidance,
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
        prepared = [self.prepare(row, inputs)] * batch_size
        call = Call(positions=list(range(batch_size)), rows=[row] * batch_size, inputs=prepared)
        return call, {"image_embeds": zeros, "negative_image_embeds": zeros}

    def load(self, row: dict[str, Any]) -> Prepared:
        """Load and check the images ``row``'s mode reads (`schemas.modes.Mode.reads`; `InputError`), then prepare
        them and the row's noise as tensors on their way to the device (`prepare`): outside the device lock."""
        return self.prepare(row, self._images(row))

    def _images(self, row: dict[str, Any]) -> dict[str, Any]:
        """The images ``row``'s mode reads, checked (PIL images; the hint as a (3, H, W) float32 array)."""
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
    def prepare(self, row: dict[str, Any], images: dict[str, Any]) -> Prepared:
        """``row``'s inputs as its pipeline will use them, converted the pipeline's own way, and (planned scheduler)
        the noise its call draws, drawn now from its generator: copies to the device started (`actors.transfers`)."""
        mode, pipe = MODES[row["mode"]], self.pipes[row["mode"]]
        dtype = pipe.unet.dtype
        tensors: dict[str, Any] = {}
        if mode.partial_schedule:  # img2img variants: the pipeline's own preprocessing, then the device
            image = pipe.image_processor.preprocess(images["image"], row["width"], row["height"])
            tensors["image"] = self.uploader.put(image, dtype=dtype)
            tensors["image"].value._kandinsky_prepared = True
        elif "mask" in images:  # inpaint: the pipeline's own conversion; it checks and moves the tensors itself
            mask, image = prepare_mask_and_masked_image(images["image"], images["mask"], row["height"], row["width"])
            # given tensors, the pipeline converts them again, which is the identity but for the mask's final
            # inversion (``1 - mask``): it gets the mask as it was before that
            tensors["image"], tensors["mask"] = image, 1 - mask
        if "hint" in images:
            tensors["hint"] = self.uploader.put(torch.from_numpy(images["hint"][None]), dtype=dtype)
        noise = None
        if isinstance(pipe.scheduler, PlannedScheduler):
            begin = call_start(
                num_inference_steps=row["num_inference_steps"],
                strength=row["strength"] if mode.partial_schedule else None,
            )
            steps = pipe.scheduler.noisy_steps(num_inference_steps=row["num_inference_steps"], begin=begin)
            first, draws = draw_noise(
                restore_generator(row["generator_state"]),
                shape=latent_shape(pipe, mode, row, tensors.get("image")),
                dtype=dtype,
                steps=steps,
            )
            noise = Noise(begin=begin, first=self.uploader.put(first), steps=self.uploader.put(draws))
        return Prepared(tensors=tensors, noise=noise)

    @torch.inference_mode()
    def run(self, call: Call, arrays: dict[str, np.ndarray], *, pad: bool = True) -> PixelCopy:
        """One pipeline call for rows that share `CALL_KEY`; returns the images on their way to the host.
        ``pad``: a compiled actor pads a partial batch to ``max_batch_size`` (not its warm-up calls: their size is
        the shape being compiled)."""
        first = call.rows[0]
        mode = MODES[first["mode"]]
        pipe = self.pipes[mode.name]
        dtype = pipe.unet.dtype
        count = len(call.positions)
        # A compiled UNet keeps one shape per call key: a partial batch is padded with copies of its
        # last row (each with a generator of its own, so the real rows draw what they would alone).
        padding = max(0, (self.max_batch_size or 0) - count) if self.compiled and pad else 0
        positions = call.positions + call.positions[-1:] * padding
        rows = call.rows + call.rows[-1:] * padding
        inputs = call.inputs + call.inputs[-1:] * padding

        def embeds(name: str) -> torch.Tensor:
            # Decoders only cast embeddings to the UNet dtype when guidance > 1 (diffusers 0.42.1): cast here.
            values = torch.from_numpy(np.ascontiguousarray(arrays[name][positions])).to(dtype)
            return values.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else values

        kwargs: dict[str, Any] = {
            "image_embeds": embeds("image_embeds"),
            "negative_image_embeds": embeds("negative_image_embeds"),
            "height": first["height"],
            "width": first["width"],
            "num_inference_steps": first["num_inference_steps"],
            "guidance_scale": first["guidance_scale"],
            "num_images_per_prompt": 1,
            "output_type": "pt",  # uint8 is made on the device (actors.pixels), as "np" + to_uint8 would
            "return_dict": False,
        }
        for column in sorted(inputs[0].tensors):
            values = [item.tensors[column] for item in inputs]
            if column == "image" and mode.partial_schedule:  # each one passes the pipeline's preprocessing as is
                kwargs["image"] = [value.get() for value in values]
            else:
                kwargs[DECODER_INPUT_KWARGS[column]] = torch.cat([_tensor(value) for value in values])
        if mode.partial_schedule:
            kwargs["strength"] = first["strength"]
        scheduler = pipe.scheduler
        planned = isinstance(scheduler, PlannedScheduler) and inputs[0].noise is not None
        if planned:
            noise = [item.noise for item in inputs]
            draws = torch.cat([item.steps.get() for item in noise], dim=1)  # (steps, batch, C, h, w)
            scheduler.plan(begin=noise[0].begin, noise=list(draws))
            if not mode.partial_schedule:  # the pipeline takes the initial noise as ``latents``
                kwargs["latents"] = torch.cat([item.first.get() for item in noise])
        # img2img variants draw their initial noise themselves (from the generators); the rest draw nothing then
        if not planned or mode.partial_schedule:
            kwargs["generator"] = [restore_generator(row["generator_state"]) for row in rows]
        try:
            images = pipe(**kwargs)[0]
        finally:
            if planned:
                scheduler.clear()
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


@dataclass(frozen=True, kw_only=True)
class Noise:
    """A row's noise for its call (`actors.denoise.draw_noise`), on its way to the device."""

    begin: int  # the index of the call's first step
    first: Uploaded  # the initial noise, (1, C, h, w)
    steps: Uploaded  # each noisy step's, (steps, 1, C, h, w)


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What `DecoderActor.load` made of a row: its input tensors (by input column) and its noise (None: unplanned)."""

    tensors: dict[str, Any]
    noise: Noise | None


class PreparedImages:
    """A pipeline's image processor that passes images `DecoderActor.prepare` already preprocessed (with this very
    processor) through, and hands anything else to it."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def preprocess(self, image: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(image, "_kandinsky_prepared", False):
            return image
        return self._processor.preprocess(image, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def latent_shape(pipe: Any, mode: Mode, row: dict[str, Any], image: Uploaded | None) -> tuple[int, int, int]:
    """(channels, height, width) of a row's latents, as its pipeline makes them: encoded from its preprocessed image
    (img2img variants), else ``downscale_height_and_width`` of its size."""
    channels, scale = int(pipe.movq.config.latent_channels), movq_scale(pipe.movq.config.block_out_channels)
    if image is not None and mode.partial_schedule:
        height, width = image.value.shape[-2:]
        return channels, int(height) // scale, int(width) // scale
    height, width = downscale_height_and_width(row["height"], row["width"], scale)
    return channels, height, width


def _tensor(value: Any) -> torch.Tensor:
    return value.get() if isinstance(value, Uploaded) else value
