"""How a work row is recorded with its image: its inputs (URIs without credentials, or digests), its caption,
the parameters its mode uses and the checkpoints that made it. `schemas.results` puts these in every row."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from schemas.modes import MODES, PRIOR_KINDS
from schemas.text import public_uri

# One input image as recorded: its URI, ``sha256:<hex>`` of inline bytes, or `HINT_ESTIMATED` for a depth
# hint the depth stage estimated from ``image``. Recorded, never fetched again by readers.
HINT_ESTIMATED = "estimated"


def describe_input(ref: Mapping[str, Any] | None, *, estimated: bool = False) -> str | None:
    """How an input image (an `IMAGE_REF` value) is recorded: its URI, else ``sha256:<hex>`` of its bytes.

    A URI is recorded without user, password, query or fragment: what is published with the images
    never carries a credential (a presigned URL's signature, ``user:token@``).
    """
    if ref is None:
        return None
    if estimated:
        return HINT_ESTIMATED
    uri = ref.get("uri")
    if not uri:
        return "sha256:" + hashlib.sha256(ref.get("data") or b"").hexdigest()
    return public_uri(uri)


def interpolate_items(items: list[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A row's ``interpolate`` items as recorded: prompt, image (`describe_input`) and weight each."""
    if items is None:
        return None
    return [
        {"prompt": item.get("prompt"), "image": describe_input(item.get("image")), "weight": item.get("weight")}
        for item in items
    ]


def caption(prompt: str | None, items: list[Mapping[str, Any]] | None) -> str | None:
    """The image's caption: its prompt, or for an interpolation the items with their weights
    (``a red house (0.6) + [image house.png] (0.4)``); None when the row has neither (given embeddings)."""
    if prompt is not None or not items:
        return prompt
    parts = []
    for item in items:
        text = item.get("prompt")
        if text is None:
            text = f"[image {str(item.get('image') or '').rsplit('/', 1)[-1]}]"
        parts.append(f"{text} ({item.get('weight', 0.0):g})")
    return " + ".join(parts)


def recorded_parameters(row: Mapping[str, Any]) -> dict[str, Any]:
    """A work row's parameters as recorded: those its mode or prior input does not use are null."""
    mode, kind = MODES.get(row.get("mode") or ""), PRIOR_KINDS.get(row.get("prior_kind") or "")
    uses_prior = kind is None or kind.pipeline is not None
    return {
        "strength": row.get("strength") if mode is None or mode.partial_schedule else None,
        "prior_strength": row.get("prior_strength") if kind is not None and kind.partial_schedule else None,
        "prior_num_inference_steps": row.get("prior_num_inference_steps") if uses_prior else None,
        "prior_guidance_scale": row.get("prior_guidance_scale") if uses_prior else None,
    }


def model_columns(row: Mapping[str, Any], model_ids: Mapping[str, str]) -> dict[str, Any]:
    """A work row's ``prior_model``, ``decoder_model`` and ``depth_model`` from the run's checkpoint ids (checkpoint
    name -> ``name@content``): the prior's when it ran, its mode's decoder, the depth estimator for an estimated
    hint."""
    mode, kind = MODES.get(row.get("mode") or ""), PRIOR_KINDS.get(row.get("prior_kind") or "")
    return {
        "prior_model": model_ids.get("prior") if kind is None or kind.pipeline is not None else None,
        "decoder_model": model_ids.get(mode.checkpoint) if mode is not None else None,
        "depth_model": model_ids.get("depth") if row.get("hint_estimated") else None,
    }
