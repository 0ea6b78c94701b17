"""Prior stage: text (and later images) -> CLIP image embeddings, one seeded generator per output image."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pyarrow as pa
import torch

from actors.common import (
    describe_exception,
    generator_state,
    quiet_libraries,
    resolve_device,
    resolve_dtype,
    seeded_generator,
    with_errors,
    worker_name,
)
from schemas.results import ERROR_RENDER
from schemas.work import EMBED_FIELDS, EMBED_SCHEMA

logger = logging.getLogger(__name__)

PRIOR_CALL_KEY = ("prior_num_inference_steps", "prior_guidance_scale", "has_negative_prompt")


class PriorActor:
    """Holds a `KandinskyV22PriorPipeline` and turns work rows into embedding rows.

    Input: a `WORK_SCHEMA` table. Output: the same rows, in order, with `EMBED_FIELDS` added:
    ``image_embeds`` / ``negative_image_embeds`` (float32, the prior's embedding size) and the
    state of the row's generator after the prior, so the decoder continues the same random stream
    as diffusers' Combined pipelines. Rows that already carry an ``error`` pass through; a row the
    prior fails on gets ``error_kind="render_failed"`` and the rest of its batch still renders.
    """

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, worker: str = "") -> None:
        from diffusers import KandinskyV22PriorPipeline

        quiet_libraries()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipe = KandinskyV22PriorPipeline.from_pretrained(model, dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.worker = worker_name(worker)

    def __call__(self, work: pa.Table) -> pa.Table:
        """Embed every row of ``work`` (see class docstring)."""
        n = work.num_rows
        embeds: list[np.ndarray | None] = [None] * n
        negatives: list[np.ndarray | None] = [None] * n
        states: list[bytes | None] = [None] * n
        seconds: list[float | None] = [None] * n
        errors: dict[int, tuple[str, str]] = {}
        rows = work.to_pylist()
        pending = [i for i, row in enumerate(rows) if row["error"] is None]
        for _, group in itertools.groupby(sorted(pending, key=lambda i: _key(rows[i])), key=lambda i: _key(rows[i])):
            positions = list(group)
            started = time.perf_counter()
            try:
                outputs = self._embed([rows[i] for i in positions])
            except Exception as exc:  # isolate the failing row(s): retry one by one
                logger.warning("prior batch of %d failed (%s); retrying rows one by one", len(positions), exc)
                outputs = []
                for i in positions:
                    try:
                        outputs.extend(self._embed([rows[i]]))
                    except Exception as row_exc:
                        errors[i] = (ERROR_RENDER, f"prior failed: {describe_exception(row_exc)}")
                        outputs.append(None)
            share = (time.perf_counter() - started) / len(positions)
            for i, output in zip(positions, outputs):
                seconds[i] = share
                if output is not None:
                    embeds[i], negatives[i], states[i] = output
        table = with_errors(work, errors)
        columns = [
            pa.array([None if e is None else e.tolist() for e in embeds], pa.list_(pa.float32())),
            pa.array([None if e is None else e.tolist() for e in negatives], pa.list_(pa.float32())),
            pa.array(states, pa.binary()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(seconds, pa.float64()),
        ]
        for field, column in zip(EMBED_FIELDS, columns):
            table = table.append_column(field, column)
        return table.cast(EMBED_SCHEMA)

    @torch.inference_mode()
    def _embed(self, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray, bytes]]:
        """One prior call for rows that share `PRIOR_CALL_KEY`; one fresh generator per row."""
        generators = [seeded_generator(row["seed"]) for row in rows]
        has_negative = rows[0]["has_negative_prompt"]
        negative_prompt = [row["negative_prompt"] for row in rows] if has_negative else None
        # With a negative prompt the prior runs positives then negatives in one batch; a solo
        # diffusers call draws both from the same generator, so both rows get the same object.
        call_generators = generators + generators if has_negative else generators
        image_embeds, negative_image_embeds = self.pipe(
            prompt=[row["prompt"] for row in rows],
            negative_prompt=negative_prompt,
            num_images_per_prompt=1,
            num_inference_steps=rows[0]["prior_num_inference_steps"],
            guidance_scale=rows[0]["prior_guidance_scale"],
            generator=call_generators,
            output_type="pt",
            return_dict=False,
        )
        image_embeds = image_embeds.float().cpu().numpy()
        negative_image_embeds = negative_image_embeds.float().cpu().numpy()
        return [(image_embeds[i], negative_image_embeds[i], generator_state(generators[i])) for i in range(len(rows))]


def _key(row: dict) -> tuple:
    return tuple(row[name] for name in PRIOR_CALL_KEY)
