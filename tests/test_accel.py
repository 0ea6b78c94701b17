"""Speed options keep diffusers' outputs; deterministic prior inputs are computed once per actor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.accel import PromptEncodings, prepare_pipeline
from schemas.accel import AccelOptions

CPU = torch.device("cpu")


def _prior(models: str, options: AccelOptions | None = None) -> object:
    from diffusers import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline.from_pretrained(f"{models}/prior")
    pipe.set_progress_bar_config(disable=True)
    return pipe if options is None else prepare_pipeline(pipe, device=CPU, options=options)


def _decoder(models: str, options: AccelOptions | None = None) -> object:
    from diffusers import KandinskyV22Pipeline

    pipe = KandinskyV22Pipeline.from_pretrained(f"{models}/decoder")
    pipe.set_progress_bar_config(disable=True)
    return pipe if options is None else prepare_pipeline(pipe, device=CPU, options=options)


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Forward calls of ``module``, one entry (the batch size) per call."""
    calls: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        calls.append(len(args[0] if args else next(iter(kwargs.values()))))

    module.register_forward_hook(hook, with_kwargs=True)
    return calls


@torch.inference_mode()
def _embed(pipe: object, prompts: list[str], negatives: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(
        prompt=prompts,
        negative_prompt=negatives,
        generator=generators + generators if negatives else generators,
        num_inference_steps=4,
        output_type="pt",
        return_dict=False,
    )


@pytest.mark.parametrize("negatives", [None, ["ugly", "", "blurry", "ugly"]])
def test_cached_prior_equals_diffusers_and_encodes_each_prompt_once(tiny_models: str, negatives: list | None) -> None:
    prompts = ["a red fox", "a boat", "a red fox", "a tree at night"]
    plain = _embed(_prior(tiny_models), prompts, negatives)
    cached = _prior(tiny_models, AccelOptions())
    text_calls = _count_calls(cached.text_encoder)
    image_calls = _count_calls(cached.image_encoder)
    for _ in range(2):  # the second call is served from the caches
        got = _embed(cached, prompts, negatives)
        for a, b in zip(plain, got):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    distinct = set(prompts) | set(negatives or [""])
    assert len(text_calls) == len(distinct) and set(text_calls) == {1}  # one string per call, once each
    assert len(image_calls) == (0 if negatives else 1)  # the zero-image embedding, computed once
    assert isinstance(cached._encode_prompt, PromptEncodings) and cached._encode_prompt.hits > 0


def test_a_prompts_encoding_does_not_depend_on_its_batch(tiny_models: str) -> None:
    first = _prior(tiny_models, AccelOptions())
    second = _prior(tiny_models, AccelOptions())
    with torch.inference_mode():
        first._encode_prompt(["a cat", "a dog", "a fish"], CPU, 1, True)
        a = first._encode_prompt(["a dog"], CPU, 1, True)
        b = second._encode_prompt(["a dog"], CPU, 1, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_cache_is_bounded_and_can_be_off(tiny_models: str) -> None:
    small = _prior(tiny_models, AccelOptions(prompt_cache_size=2))
    with torch.inference_mode():
        small._encode_prompt([f"prompt {i}" for i in range(5)], CPU, 1, False)
    assert len(small._encode_prompt._entries) == 2
    off = _prior(tiny_models, AccelOptions(prompt_cache_size=0))
    assert not isinstance(off._encode_prompt, PromptEncodings)


@pytest.mark.parametrize(
    "options", [AccelOptions(channels_last=True), AccelOptions(attention="default")], ids=["channels_last", "default"]
)
def test_decoder_options_keep_pixels_within_one_level(tiny_models: str, options: AccelOptions) -> None:
    embeds, negative = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 32)

    @torch.inference_mode()
    def render(pipe: object) -> np.ndarray:
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        kwargs = {"height": 64, "width": 64, "num_inference_steps": 3, "output_type": "np"}
        return pipe(image_embeds=embeds, negative_image_embeds=negative, generator=generators, **kwargs).images

    plain = (render(_decoder(tiny_models)) * 255).round()
    fast = (render(_decoder(tiny_models, options)) * 255).round()
    assert np.abs(plain - fast).max() <= 1


def test_attention_choice_reaches_every_model(tiny_models: str) -> None:
    pipe = _prior(tiny_models, AccelOptions(attention="default"))
    assert {type(p).__name__ for p in pipe.prior.attn_processors.values()} == {"AttnProcessor"}
    assert pipe.text_encoder.config._attn_implementation == "eager"
    decoder = _decoder(tiny_models, AccelOptions(attention="sdpa"))
    assert {type(p).__name__ for p in decoder.unet.attn_processors.values()} == {"AttnAddedKVProcessor2_0"}


def test_options_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="attention"):
        AccelOptions(attention="flash")
    with pytest.raises(ValueError, match="prompt_cache_size"):
        AccelOptions(prompt_cache_size=-1)


def test_prior_actor_pipelines_share_one_cache(tiny_models: str) -> None:
    from actors.prior import PriorActor

    actor = PriorActor(f"{tiny_models}/prior", device="cpu", accel=AccelOptions(channels_last=True))
    assert isinstance(actor.pipe._encode_prompt, PromptEncodings)
    assert actor.emb2emb._encode_prompt is actor.pipe._encode_prompt
    assert actor.emb2emb.get_zero_embed is actor.pipe.get_zero_embed
