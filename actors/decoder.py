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

from actors.common import (
    describe_exception,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    restore_generator,
    worker_name,
)
from actors.images import encode_png, to_uint8
from actors.storage import Storage
from schemas.config import DECODER_FOR_MODE
from schemas.results import (
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

_PIPELINE_FOR_MODE = {"text2img": "KandinskyV22Pipeline"}


class DecoderActor:
    """Holds the decoder pipelines of the modes it serves; renders embedding rows and writes PNGs.

    ``models`` maps mode -> checkpoint (hub id or directory); only those are loaded. ``__call__``
    takes an `EMBED_SCHEMA` table and returns a `RESULTS_SCHEMA` table with one row per input row,
    in order. Each row's generator is restored from the state the prior left, so an image equals a
    single-process diffusers Combined call with that row's seed. Per-row failures (a size the
    decoder would change, a non-finite output, a pipeline exception, a failed write) become
    ``error`` rows; the rest of the batch is unaffected.
    """

    def __init__(
        self,
        models: dict[str, str],
        *,
        output: str,
        run_id: str,
        storage_options: dict[str, Any] | None = None,
        dtype: str = "auto",
        device: str | None = None,
        worker: str = "",
    ) -> None:
        import diffusers

        unknown = sorted(set(models) - set(_PIPELINE_FOR_MODE))
        if unknown:
            raise ValueError(f"DecoderActor cannot serve modes {unknown}; it serves {sorted(_PIPELINE_FOR_MODE)}")
        quiet_libraries()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipes: dict[str, Any] = {}
        loaded: dict[tuple[str, str], Any] = {}
        for mode, path in models.items():
            cls = getattr(diffusers, _PIPELINE_FOR_MODE[mode])
            key = (cls.__name__, path)
            if key not in loaded:
                pipe = cls.from_pretrained(path, dtype=self.dtype).to(self.device)
                pipe.set_progress_bar_config(disable=True)
                loaded[key] = pipe
            self.pipes[mode] = loaded[key]
        self.storage = Storage(output, storage_options=storage_options)
        self.run_id = run_id
        self.worker = worker_name(worker)

    def size_problem(self, mode: str, height: int, width: int) -> str | None:
        """Why this decoder cannot render exactly ``height`` x ``width`` in ``mode``; None if it can."""
        # text2img rounds each side UP to a multiple of movq_scale_factor**2 (KANDINSKY_NOTES.md).
        multiple = self.pipes[mode].movq_scale_factor ** 2
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                rounded = -(-value // multiple) * multiple
                return (
                    f"{name}={value} is not a multiple of {multiple}: the {DECODER_FOR_MODE[mode]} checkpoint "
                    f"would silently render {rounded}; ask for a multiple of {multiple}"
                )
        return None

    def __call__(self, embeds: pa.Table) -> pa.Table:
        """Render, write and report every row of ``embeds`` (see class docstring)."""
        rows = embeds.to_pylist()
        results: list[ResultRow | None] = [None] * len(rows)
        pending = []
        for i, row in enumerate(rows):
            problem = None if row["error"] else self.size_problem(row["mode"], row["height"], row["width"])
            if row["error"]:
                results[i] = self._result(row, error=row["error"], error_kind=row["error_kind"])
            elif problem:
                results[i] = self._result(row, error=problem, error_kind=ERROR_UNSUPPORTED_SIZE)
            else:
                pending.append(i)
        key = lambda i: tuple(rows[i][name] for name in CALL_KEY)  # noqa: E731
        for _, group in itertools.groupby(sorted(pending, key=key), key=key):
            positions = list(group)
            started = time.perf_counter()
            try:
                images = self._decode([rows[i] for i in positions])
            except Exception as exc:  # isolate the failing row(s): retry one by one
                logger.warning("decoder batch of %d failed (%s); retrying rows one by one", len(positions), exc)
                images = []
                for i in positions:
                    try:
                        images.extend(self._decode([rows[i]]))
                    except Exception as row_exc:
                        images.append(row_exc)
            finished = [self._finish(rows[i], image) for i, image in zip(positions, images)]
            share = (time.perf_counter() - started) / len(positions)
            for i, result in zip(positions, finished):
                results[i] = dataclasses.replace(result, decoder_seconds=share)
        return results_table(results)

    @torch.inference_mode()
    def _decode(self, rows: list[dict]) -> list[np.ndarray]:
        """One pipeline call for rows that share `CALL_KEY`; returns (H, W, 3) float arrays in [0, 1]."""
        first = rows[0]
        pipe = self.pipes[first["mode"]]
        dtype = pipe.unet.dtype
        # Decoders only cast embeddings to the UNet dtype when guidance > 1 (KANDINSKY_NOTES.md).
        image_embeds = torch.tensor(np.stack([row["image_embeds"] for row in rows]), dtype=dtype, device=self.device)
        negative = torch.tensor(
            np.stack([row["negative_image_embeds"] for row in rows]), dtype=dtype, device=self.device
        )
        output = pipe(
            image_embeds=image_embeds,
            negative_image_embeds=negative,
            height=first["height"],
            width=first["width"],
            num_inference_steps=first["num_inference_steps"],
            guidance_scale=first["guidance_scale"],
            num_images_per_prompt=1,
            generator=[restore_generator(row["generator_state"]) for row in rows],
            output_type="np",
            return_dict=False,
        )[0]
        return list(output)

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
