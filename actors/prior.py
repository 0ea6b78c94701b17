"""Prior stage: prompt, image-guided prompt or weighted interpolation -> CLIP image embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.accel import prepare_pipeline, share_prior_caches
from actors.common import ModelStage, generator_state, prior_pipeline_key, seeded_generator, shared_model
from actors.compiled import compiled_modules
from actors.stage import Call, Outcome, with_errors
from schemas.accel import AccelOptions
from schemas.loggers import logger_for
from schemas.modes import PRIOR_EMBEDS, PRIOR_IMAGE, PRIOR_INTERPOLATE, PRIOR_KINDS, PRIOR_TEXT
from schemas.results import ERROR_INVALID_ROW
from schemas.stages import PRIOR
from schemas.work import PRIOR_CALL_KEY, embed_fields, embed_schema, embeds_array

logger = logger_for(__name__)


class PriorActor(ModelStage):
    """Holds the Kandinsky 2.2 prior and turns work rows into embedding rows.

    One checkpoint serves every kind of prior input (``prior_kind``, `schemas.modes.PRIOR_KINDS`):
    ``text`` runs `KandinskyV22PriorPipeline`, ``image`` runs `KandinskyV22PriorEmb2EmbPipeline`
    (``prior_image`` + ``prior_strength``) and ``interpolate`` runs
    ``KandinskyV22PriorPipeline.interpolate`` (one row per call). Both pipelines share the same modules.

    Input: a `WORK_SCHEMA` table. Output: the same rows, in order, with `embed_fields` added:
    ``image_embeds`` / ``negative_image_embeds`` (float32, fixed-size lists) and the state of the
    row's generator after the prior, so the decoder continues the same random stream as diffusers'
    Combined pipelines. Rows that already carry an ``error`` pass through; a row whose input cannot
    be loaded gets ``input_error``, a row the prior fails on ``render_failed``; the rest still render.
    """

    name = PRIOR.name
    call_key = PRIOR_CALL_KEY

    def __init__(self, model: str, *, accel: AccelOptions | None = None, **stage: Any) -> None:
        """Load the prior checkpoint ``model``; ``stage``: see `actors.common.ModelStage`."""
        super().__init__(**stage)
        from diffusers import KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline

        def load() -> Any:
            pipe = KandinskyV22PriorPipeline.from_pretrained(
                self.checkpoint(model), revision=self.revision(model), dtype=self.dtype
            )
            return prepare_pipeline(pipe, device=self.device, options=accel)

        self.pipe = shared_model(prior_pipeline_key(model, dtype=self.dtype, device=self.device), load)
        self.pipe.set_progress_bar_config(disable=True)
        self.compiled = compiled_modules(self.pipe)  # a failed compile turns them eager (`recover`)
        self.emb2emb = share_prior_caches(self.pipe, KandinskyV22PriorEmb2EmbPipeline(**self.pipe.components))
        self.emb2emb.set_progress_bar_config(disable=True)
        self.embedding_dim = int(self.pipe.prior.config.embedding_dim)

    def reset(self) -> None:
        """`ModelStage.reset`, and the prompt encodings cached on the pipeline are forgotten."""
        super().reset()
        encodings = vars(self.pipe).get("_encode_prompt")
        if hasattr(encodings, "clear"):
            encodings.clear()

    def wants(self, row: dict[str, Any]) -> bool:
        """Rows that give their own embeddings skip the prior (`finish` passes them on)."""
        return row["prior_kind"] != PRIOR_EMBEDS.name

    def alone(self, row: dict[str, Any]) -> bool:
        return PRIOR_KINDS[row["prior_kind"]].alone

    def load(self, row: dict[str, Any]) -> Any:
        """The images the prior needs for ``row``: the prior image, or the interpolation items."""
        if row["prior_kind"] == PRIOR_IMAGE.name:
            return self.loader.rgb(row["prior_image"], column="prior_image")
        if row["prior_kind"] == PRIOR_INTERPOLATE.name:
            return [
                item["prompt"] if item["image"] is None else self.loader.rgb(item["image"], column=f"interpolate[{k}]")
                for k, item in enumerate(row["interpolate"])
            ]
        return None

    @torch.inference_mode()
    def _given(self, table: pa.Table, outcome: Outcome) -> None:
        """Outputs for rows that give their embeddings: those, the zero-image embedding as the default negative
        (what the prior gives rows without a negative prompt), and an untouched generator seeded with the row's seed."""
        kinds = table.column("prior_kind").to_pylist()
        errors = table.column("error").to_pylist()
        given = [i for i, (kind, error) in enumerate(zip(kinds, errors)) if kind == PRIOR_EMBEDS.name and error is None]
        if not given:
            return
        positives, negatives = table.column("image_embeds_given"), table.column("negative_image_embeds_given")
        seeds = table.column("seed").to_pylist()
        zero = None
        for i in given:
            positive = positives[i].values.to_numpy(zero_copy_only=False).astype(np.float32)
            if len(positive) != self.embedding_dim:
                message = f"image_embeds has {len(positive)} values; this prior's embeddings have {self.embedding_dim}"
                outcome.errors[i] = (ERROR_INVALID_ROW, message)
                continue
            if negatives[i].is_valid:
                negative = negatives[i].values.to_numpy(zero_copy_only=False).astype(np.float32)
            else:
                if zero is None:
                    zero = self.pipe.get_zero_embed(1, device=self.device).float().cpu().numpy()[0]
                negative = zero
            outcome.outputs[i] = (positive, negative, generator_state(seeded_generator(seeds[i])))
            outcome.seconds[i] = 0.0

    @torch.inference_mode()
    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, bytes]]:
        """One prior call for rows that share `PRIOR_CALL_KEY`; one fresh generator per row."""
        rows, first = call.rows, call.rows[0]
        generators = [seeded_generator(row["seed"]) for row in rows]
        if first["prior_kind"] == PRIOR_INTERPOLATE.name:
            (row,), (items,) = rows, call.inputs
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
            if first["prior_kind"] == PRIOR_TEXT.name:
                image_embeds, negative_image_embeds = self.pipe(**kwargs)
            else:
                image_embeds, negative_image_embeds = self.emb2emb(
                    image=list(call.inputs), strength=first["prior_strength"], **kwargs
                )
        image_embeds = image_embeds.float().cpu().numpy()
        negative_image_embeds = negative_image_embeds.float().cpu().numpy()
        return [(image_embeds[i], negative_image_embeds[i], generator_state(generators[i])) for i in range(len(rows))]

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """``table`` with `embed_fields` appended (null where the prior produced nothing)."""
        n, dim = table.num_rows, self.embedding_dim
        self._given(table, outcome)
        done = np.array([o is not None for o in outcome.outputs], dtype=bool)
        image_embeds = np.zeros((n, dim), np.float32)
        negative_image_embeds = np.zeros((n, dim), np.float32)
        for i in np.flatnonzero(done):
            image_embeds[i], negative_image_embeds[i] = outcome.outputs[i][0], outcome.outputs[i][1]
        columns = [
            embeds_array(image_embeds, num_rows=n, dim=dim, valid=done),
            embeds_array(negative_image_embeds, num_rows=n, dim=dim, valid=done),
            pa.array([o[2] if o is not None else None for o in outcome.outputs], pa.binary()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        result = with_errors(table, outcome.errors)
        for field, column in zip(embed_fields(dim), columns):
            result = result.append_column(field, column)
        return result.cast(embed_schema(dim))
