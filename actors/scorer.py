"""Scoring stage (``--score clip``): decoded pixels + prompt -> CLIP score, by the prior checkpoint's CLIP encoders."""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.accel import set_attention
from actors.common import ModelStage, prior_pipeline_key, shared_model
from actors.stage import Call, InputError, Outcome, with_errors
from schemas.accel import AccelOptions
from schemas.loggers import logger_for
from schemas.results import ERROR_SCORE
from schemas.stages import SCORE
from schemas.work import SCORE_FIELDS

logger = logger_for(__name__)

# The decoded columns a failed row loses, so that rows with ``error`` set carry no pixels (schemas.work).
_PIXEL_COLUMNS = ("pixels", "pixel_height", "pixel_width")


def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per row, ``max(100 * cos(image_embeds, text_embeds), 0)`` in float32 (torchmetrics' CLIPScore, per image)."""
    image = image_embeds.float()
    text = text_embeds.float()
    image = image / image.norm(p=2, dim=-1, keepdim=True)
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    return (100 * (image * text).sum(dim=-1)).clamp(min=0)


class ScoreActor(ModelStage):
    """Holds the CLIP text and image encoders of a Kandinsky 2.2 prior checkpoint; scores decoded rows.

    ``model`` is the prior checkpoint (a folder or hub id in diffusers' layout). Only its
    ``text_encoder`` (`CLIPTextModelWithProjection`), ``image_encoder``
    (`CLIPVisionModelWithProjection`), ``tokenizer`` and ``image_processor`` are loaded, each with
    transformers' ``from_pretrained(model, subfolder=...)``; the prior transformer is not.

    The score is torchmetrics' CLIPScore (``torchmetrics.functional.multimodal.clip_score``, Lightning-AI/
    torchmetrics): ``CLIPScore(I, C) = max(100 * cos(E_I, E_C), 0)``, the cosine similarity of the
    image's projected CLIP embedding ``E_I`` and the caption's projected CLIP text embedding ``E_C``,
    times 100, clamped at 0, here per image (torchmetrics clamps the mean of a batch). The image is
    preprocessed from its uint8 pixels by the checkpoint's own `CLIPImageProcessor` (resize, centre
    crop, normalise); the prompt is tokenised with truncation to the tokenizer's maximum length
    (77), which keeps the end token last as CLIP's own tokenizer does (torchmetrics slices the token
    ids instead, which drops the end token of a longer prompt). Embeddings are compared in float32.

    Input: decoded rows (`schemas.work.DECODED_FIELDS`). Output: the same rows, in order, every
    column unchanged, with `schemas.work.SCORE_FIELDS` appended: ``clip_score`` (float64),
    ``score_worker`` and ``score_seconds``. Served: rows without ``error`` that have a prompt. Rows
    without a prompt (interpolation rows, or any row rendered without one) and rows that already
    carry an ``error`` get a null score and pass through. A row whose pixels are missing or do not
    match ``pixel_height`` x ``pixel_width`` becomes ``input_error`` (and loses its pixels, like the
    decoder's error rows); a row the encoders fail on keeps its image with a null score and
    ``score_error`` "score failed: ...", and the rest of its call is still scored.
    """

    name = SCORE.name
    call_key = ()  # any decoded rows share a call: every image is resized to the encoder's size
    buffer_columns = ("pixels",)
    failure_kind = ERROR_SCORE

    def __init__(self, model: str, *, accel: AccelOptions | None = None, **stage: Any) -> None:
        """Load the four CLIP parts of ``model``; ``accel``: only ``attention`` applies (no UNet or prior here);
        ``stage``: see `actors.common.ModelStage`."""
        super().__init__(**stage)
        from transformers import (
            CLIPImageProcessor,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        prior = shared_model(prior_pipeline_key(model, dtype=self.dtype, device=self.device))
        if prior is not None:  # the CLIP group: the prior in this process holds these encoders already
            self.text_encoder, self.image_encoder = prior.text_encoder, prior.image_encoder
            self.tokenizer, self.processor = prior.tokenizer, prior.image_processor
        else:
            revision, model = self.revision(model), self.checkpoint(model)
            self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder", revision=revision, dtype=self.dtype
            )
            self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                model, subfolder="image_encoder", revision=revision, dtype=self.dtype
            )
            self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)
            self.processor = CLIPImageProcessor.from_pretrained(model, subfolder="image_processor", revision=revision)
        encoders = {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder}
        set_attention(types.SimpleNamespace(components=encoders), (accel or AccelOptions()).attention)
        for encoder in encoders.values():
            encoder.to(self.device).eval()
        self.max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)

    def wants(self, row: dict[str, Any]) -> bool:
        """Rows with a prompt (rows with an ``error`` never reach here)."""
        return row.get("prompt") is not None

    def load(self, row: dict[str, Any]) -> np.ndarray:
        """The row's (pixel_height, pixel_width, 3) uint8 image, a view of its ``pixels``; raises `InputError`."""
        pixels, height, width = row.get("pixels"), row.get("pixel_height"), row.get("pixel_width")
        if pixels is None or height is None or width is None:
            raise InputError("pixels: missing on a row without error (the decoder did not run?)")
        if pixels.size != height * width * 3:
            raise InputError(f"pixels: {pixels.size} bytes for {height}x{width}x3 (height x width x RGB)")
        return pixels.reshape(height, width, 3)

    @torch.inference_mode()
    def run(self, call: Call, arrays: dict[str, np.ndarray]) -> list[float]:
        """One scoring call: both encoders once over the call's rows; one score per row."""
        text = self.tokenizer(
            [row["prompt"] for row in call.rows],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        images = list(call.inputs)
        pixel_values = self.processor(images=images, input_data_format="channels_last", return_tensors="pt")
        pixel_values = pixel_values["pixel_values"]
        text_embeds = self.text_encoder(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        ).text_embeds
        image_embeds = self.image_encoder(pixel_values=pixel_values.to(self.device, self.dtype)).image_embeds
        return clip_scores(image_embeds, text_embeds).cpu().tolist()

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        """``table`` with `SCORE_FIELDS` appended.

        A row the encoders failed on keeps its image: its score is null and ``score_error`` says why (a
        rendered image is not lost to its score). A row whose pixels are unusable gets its error and loses them.
        """
        n = table.num_rows
        score_errors = [None] * n
        for position, (kind, message) in list(outcome.errors.items()):
            if kind == ERROR_SCORE:
                score_errors[position] = message
                del outcome.errors[position]
        result = with_errors(table, outcome.errors)
        if outcome.errors:
            failed = pa.array(np.isin(np.arange(n), list(outcome.errors)))
            for name in _PIXEL_COLUMNS:
                if name in result.column_names:
                    column = result.column(name)
                    nulled = pc.if_else(failed, pa.scalar(None, column.type), column)
                    result = result.set_column(result.schema.get_field_index(name), name, nulled)
        columns = [
            pa.array(outcome.outputs, pa.float64()),
            pa.array(score_errors, pa.string()),
            pa.array([self.worker] * n, pa.string()),
            pa.array(outcome.seconds, pa.float64()),
        ]
        for field, column in zip(SCORE_FIELDS, columns):
            result = result.append_column(field, column)
        return result
