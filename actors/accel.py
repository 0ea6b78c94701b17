"""How a model actor runs its pipelines fast: placement, attention kernel, memory format, compile, encoding caches."""

from __future__ import annotations

import collections
from typing import Any

import torch

from actors.compiled import compile_pipeline, pipeline_modules
from schemas.accel import AccelOptions
from schemas.loggers import logger_for

logger = logger_for(__name__)


def prepare_pipeline(pipe: Any, *, device: torch.device, options: AccelOptions | None = None) -> Any:
    """Put a diffusers pipeline on ``device`` with ``options`` applied; returns ``pipe`` (changed in place).

    Every option keeps fp32 outputs within float noise of the plain pipeline (tests/test_accel.py).
    ``compile``: `actors.compiled.compile_pipeline` (the decoder warms every shape up at start). On a prior
    pipeline (one with ``_encode_prompt`` and ``get_zero_embed``) it also installs the per-actor
    caches of `cache_prior_encodings`. ``cpu_offload`` is ignored (with a warning) on CPU.
    """
    options = options or AccelOptions()
    set_attention(pipe, options.attention)
    if options.channels_last:
        for module in pipeline_modules(pipe).values():
            if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
                module.to(memory_format=torch.channels_last)
    if options.cpu_offload and device.type != "cpu":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if options.cpu_offload:
            logger.warning("cpu_offload ignored: the pipeline already runs on the CPU")
        pipe.to(device)
    if options.compile:
        compile_pipeline(pipe, cuda_graphs=options.cuda_graphs)
    if hasattr(pipe, "_encode_prompt") and hasattr(pipe, "get_zero_embed"):
        cache_prior_encodings(pipe, max_prompts=options.prompt_cache_size)
    return pipe


def set_attention(pipe: Any, attention: str) -> None:
    """``sdpa``: every attention layer calls torch's scaled_dot_product_attention; ``default``: plain matmuls.

    diffusers models get the matching attention processors; transformers models (the CLIP
    encoders) get the matching ``attn_implementation``. Processors other than diffusers' two plain
    ones (e.g. IP-adapter processors) are left alone.
    """
    from diffusers.models.attention_processor import (
        Attention,
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        AttnProcessor,
        AttnProcessor2_0,
    )

    if attention not in ("sdpa", "default"):
        raise ValueError(f"attention must be 'sdpa' or 'default', got {attention!r}")
    sdpa = attention == "sdpa"
    swap = (
        {AttnProcessor: AttnProcessor2_0, AttnAddedKVProcessor: AttnAddedKVProcessor2_0}
        if sdpa
        else {AttnProcessor2_0: AttnProcessor, AttnAddedKVProcessor2_0: AttnAddedKVProcessor}
    )
    for module in pipeline_modules(pipe).values():
        if hasattr(module, "set_attn_implementation"):  # transformers PreTrainedModel
            module.set_attn_implementation("sdpa" if sdpa else "eager")
            continue
        for layer in module.modules():
            if isinstance(layer, Attention) and type(layer.processor) in swap:
                layer.set_processor(swap[type(layer.processor)]())


class PromptEncodings:
    """LRU cache of one prior pipeline's text encodings, one entry per prompt string.

    Each string is encoded alone (a batch of one), so its encoding is a pure function of the
    string: it does not depend on which batch first asked for it, and equals what a diffusers call
    for that row alone computes. Entries live on the pipeline's device: (1, D) text embeddings,
    (1, 77, D) hidden states and the (1, 77) attention mask.
    """

    def __init__(self, encode: Any, *, max_prompts: int) -> None:
        self._encode = encode  # the pipeline's own bound _encode_prompt
        self._entries: collections.OrderedDict[tuple[str, str], tuple[torch.Tensor, ...]] = collections.OrderedDict()
        self.max_prompts = max_prompts
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        """Forget every encoding (and the counts)."""
        self._entries.clear()
        self.hits = self.misses = 0

    def one(self, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_embeds, hidden_states, mask) of ``text``, each with a leading batch dimension of 1."""
        key = (text, str(device))
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = self._encode([text], device, 1, False, None)
        self._entries[key] = entry
        if len(self._entries) > self.max_prompts:
            self._entries.popitem(last=False)
        return entry

    def batch(self, texts: list[str], device: torch.device, repeats: int) -> tuple[torch.Tensor, ...]:
        """Encodings of ``texts`` stacked in order, each row repeated ``repeats`` times in place."""
        parts = [self.one(text, device) for text in texts]
        return tuple(torch.cat([p[i] for p in parts]).repeat_interleave(repeats, dim=0) for i in range(3))

    def __call__(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop-in for ``_encode_prompt``: same arguments, same shapes and order ([uncond, cond] with guidance)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        uncond = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                uncond = [""] * len(prompts)
            elif isinstance(negative_prompt, list) and isinstance(prompt, list) and len(negative_prompt) == len(prompt):
                uncond = negative_prompt
            elif isinstance(negative_prompt, str) and isinstance(prompt, str):
                uncond = [negative_prompt]
        if not isinstance(prompts, list) or (do_classifier_free_guidance and uncond is None):
            # Shapes diffusers rejects or rarely sees: let diffusers raise or handle them.
            return self._encode(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt)
        cond = self.batch(prompts, device, num_images_per_prompt)
        if uncond is None:
            return cond
        negative = self.batch(uncond, device, num_images_per_prompt)
        return tuple(torch.cat([n, c]) for n, c in zip(negative, cond))


def cache_prior_encodings(pipe: Any, *, max_prompts: int) -> None:
    """Compute deterministic prior inputs once per actor instead of once per row.

    - The zero-image embedding (the negative embedding of rows without a negative prompt) is the
      image encoder's output on an all-zero image: the same for every row, so it is computed once
      per device and dtype.
    - Text encodings are cached per prompt string (`PromptEncodings`), ``max_prompts`` of them;
      0 keeps diffusers' own batched encoding.
    """
    original_zero_embed = pipe.get_zero_embed
    zero_embeds: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get_zero_embed(batch_size: int = 1, device: torch.device | None = None) -> torch.Tensor:
        device = device or pipe.device
        key = (str(device), pipe.image_encoder.dtype)
        if key not in zero_embeds:
            zero_embeds[key] = original_zero_embed(1, device=device)
        return zero_embeds[key].repeat(batch_size, 1)

    pipe.get_zero_embed = get_zero_embed
    if max_prompts > 0:
        pipe._encode_prompt = PromptEncodings(pipe._encode_prompt, max_prompts=max_prompts)


def share_prior_caches(source: Any, target: Any) -> Any:
    """Give ``target`` (a prior pipeline built from ``source``'s components) ``source``'s caches; returns it.

    Both pipelines then fill and read one cache per actor (e.g. the text prior and its Emb2Emb twin).
    """
    for name in ("_encode_prompt", "get_zero_embed"):
        if name in vars(source):  # installed by `cache_prior_encodings`
            setattr(target, name, vars(source)[name])
    return target
