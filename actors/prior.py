"""Prior stage: prompt, image-guided prompt or weighted interpolation -> CLIP image embeddings."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.accel import prepare_pipeline, share_prior_caches
from actors.common import (
    describe_exception,
    generator_state,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    seeded_generator,
    warn_untested_versions,
    with_errors,
    worker_name,
)
from actors.inputs import ImageLoader, InputError
from schemas.config import AccelOptions
from schemas.manifest import (
    DEFAULT_ALLOWED_PROTOCOLS,
    DEFAULT_MAX_INPUT_PIXELS,
    PRIOR_IMAGE,
    PRIOR_INTERPOLATE,
    PRIOR_TEXT,
)
from schemas.results import ERROR_INPUT, ERROR_RENDER
from schemas.work import EMBED_FIELDS, EMBED_SCHEMA

logger = logging.getLogger(__name__)

PRIOR_CALL_KEY = (
    "prior_kind",
    "prior_num_inference_steps",
    "prior_guidance_scale",
    "prior_strength",
    "has_negative_prompt",
)


class PriorActor:
    """Holds the Kandinsky 2.2 prior and turns work rows into embedding rows.

    One checkpoint serves three kinds of prior input (``prior_kind``): ``text`` runs
    `KandinskyV22PriorPipeline`, ``image`` runs `KandinskyV22PriorEmb2EmbPipeline` (``prior_image``
    + ``prior_strength``) and ``interpolate`` runs ``KandinskyV22PriorPipeline.interpolate`` (one
    row per call: diffusers loops over the items). Both pipelines share the same modules.

    Input: a `WORK_SCHEMA` table. Output: the same rows, in order, with `EMBED_FIELDS` added:
    ``image_embeds`` / ``negative_image_embeds`` (float32) and the state of the row's generator
    after the prior, so the decoder continues the same random stream as diffusers' Combined
    pipelines. Rows that already carry an ``error`` pass through; a row whose input cannot be
    loaded gets ``input_error``, a row the prior fails on ``render_failed``; the rest still render.
    """

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str | None = None,
        storage_options: dict[str, Any] | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        accel: AccelOptions | None = None,
        worker: str = "",
    ) -> None:
        from diffusers import KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline

        quiet_libraries()
        warn_untested_versions("prior")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        pipe = KandinskyV22PriorPipeline.from_pretrained(model, dtype=self.dtype)
        self.pipe = prepare_pipeline(pipe, device=self.device, options=accel)
        self.pipe.set_progress_bar_config(disable=True)
        self.emb2emb = share_prior_caches(self.pipe, KandinskyV22PriorEmb2EmbPipeline(**self.pipe.components))
        self.emb2emb.set_progress_bar_config(disable=True)
        self.loader = ImageLoader(
            storage_options=storage_options, allowed_protocols=allowed_protocols, max_pixels=max_input_pixels
        )
        self.worker = worker_name(worker)

    def __call__(self, work: pa.Table) -> pa.Table:
        """Embed every row of ``work`` (see class docstring)."""
        n = work.num_rows
        outputs: list[tuple[np.ndarray, np.ndarray, bytes] | None] = [None] * n
        seconds: list[float | None] = [None] * n
        errors: dict[int, tuple[str, str]] = {}
        rows = work.to_pylist()
        inputs: dict[int, Any] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                try:
                    inputs[i] = self._load_inputs(row)
                except InputError as exc:
                    errors[i] = (ERROR_INPUT, str(exc))

        def key(i: int) -> tuple:
            # Interpolation rows run alone: diffusers' interpolate takes one weighted list per call.
            alone = i if rows[i]["prior_kind"] == PRIOR_INTERPOLATE else -1
            return (*(rows[i][name] for name in PRIOR_CALL_KEY), alone)

        for _, group in itertools.groupby(sorted(inputs, key=key), key=key):
            positions = list(group)
            started = time.perf_counter()
            try:
                embedded = self._embed([rows[i] for i in positions], [inputs[i] for i in positions])
            except Exception as exc:  # isolate the failing row(s): retry one by one
                logger.warning("prior batch of %d failed (%s); retrying rows one by one", len(positions), exc)
                embedded = []
                for i in positions:
                    try:
                        embedded.extend(self._embed([rows[i]], [inputs[i]]))
                    except Exception as row_exc:
                        errors[i] = (ERROR_RENDER, f"prior failed: {describe_exception(row_exc)}")
                        embedded.append(None)
            share = (time.perf_counter() - started) / len(positions)
            for i, output in zip(positions, embedded):
                outputs[i], seconds[i] = output, share
        table = with_errors(work, errors)
        columns = [
            pa.array([None if o is None else o[0].tolist() for o in outputs], pa.list_(pa.float32())),
            pa.array([None if o is None else o[1].tolist() for o in outputs], pa.list_(pa.float32())),
            pa.array([None if o is None else o[2] for o in outputs], pa.binary()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(seconds, pa.float64()),
        ]
        for field, column in zip(EMBED_FIELDS, columns):
            table = table.append_column(field, column)
        return table.cast(EMBED_SCHEMA)

    def _load_inputs(self, row: dict) -> Any:
        """The images the prior needs for ``row``: the prior image, or the interpolation items."""
        if row["prior_kind"] == PRIOR_IMAGE:
            return self.loader.rgb(row["prior_image"], column="prior_image")
        if row["prior_kind"] == PRIOR_INTERPOLATE:
            return [
                item["prompt"] if item["image"] is None else self.loader.rgb(item["image"], column=f"interpolate[{k}]")
                for k, item in enumerate(row["interpolate"])
            ]
        return None

    @torch.inference_mode()
    def _embed(self, rows: list[dict], inputs: list[Any]) -> list[tuple[np.ndarray, np.ndarray, bytes]]:
        """One prior call for rows that share `PRIOR_CALL_KEY`; one fresh generator per row."""
        first = rows[0]
        generators = [seeded_generator(row["seed"]) for row in rows]
        if first["prior_kind"] == PRIOR_INTERPOLATE:
            (row,), (items,) = rows, inputs
            output = self.pipe.interpolate(
                items,
                [item["weight"] for item in row["interpolate"]],
                num_images_per_prompt=1,
                num_inference_steps=row["prior_num_inference_steps"],
                generator=generators[0],
                negative_prompt=row["negative_prompt"] or "",
                guidance_scale=row["prior_guidance_scale"],
            )
            image_embeds, negative_image_embeds = output.image_embeds, output.negative_image_embeds
        else:
            has_negative = first["has_negative_prompt"]
            kwargs: dict[str, Any] = {
                "prompt": [row["prompt"] for row in rows],
                "negative_prompt": [row["negative_prompt"] for row in rows] if has_negative else None,
                "num_images_per_prompt": 1,
                "num_inference_steps": first["prior_num_inference_steps"],
                "guidance_scale": first["prior_guidance_scale"],
                # With a negative prompt the prior runs positives then negatives in one batch; a solo
                # diffusers call draws both from the same generator, so both rows get the same object.
                "generator": generators + generators if has_negative else generators,
                "output_type": "pt",
                "return_dict": False,
            }
            if first["prior_kind"] == PRIOR_TEXT:
                image_embeds, negative_image_embeds = self.pipe(**kwargs)
            else:
                image_embeds, negative_image_embeds = self.emb2emb(
                    image=list(inputs), strength=first["prior_strength"], **kwargs
                )
        image_embeds = image_embeds.float().cpu().numpy()
        negative_image_embeds = negative_image_embeds.float().cpu().numpy()
        return [(image_embeds[i], negative_image_embeds[i], generator_state(generators[i])) for i in range(len(rows))]
