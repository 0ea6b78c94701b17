"""What the pipelines' schedulers cannot run is refused at planning as ``invalid_row``, with the reason: each edge is
found again here by trying the schedulers the checkpoints hold (the tiny ones copy the public configs) and compared
with what `schemas.validation.row_problems` refuses, so a diffusers upgrade that moves an edge fails this test."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from schemas.manifest import Limits, RenderDefaults, fill_defaults, normalize
from schemas.validation import row_problems

DECODERS = ("decoder", "decoder-inpaint", "controlnet-depth")
PRIOR_STEPS = (1, 2, 3, 999, 1000, 1001)
DECODER_STEPS = (1, 2, 3, 500, 999, 1000, 1001)
STRENGTHS = (None, 1.0, 0.999, 0.5)  # None: a full schedule (text2img); else img2img's partial one
LIMITS = Limits(max_num_inference_steps=5000)


def scheduler(models: str, name: str) -> object:
    from diffusers import DDPMScheduler, UnCLIPScheduler

    cls = UnCLIPScheduler if name == "prior" else DDPMScheduler
    return cls.from_pretrained(str(Path(models) / name), subfolder="scheduler")


def runs(schedule: object, steps: int, strength: float | None) -> bool:
    """Whether ``schedule`` runs ``steps`` steps as the pipelines call it: set_timesteps, the partial schedule's
    start (diffusers' get_timesteps) and noising at its first timestep, then every step."""
    try:
        schedule.set_timesteps(steps)
        timesteps = schedule.timesteps
        if strength is not None:
            init = min(int(steps * strength), steps)
            timesteps = timesteps[max(steps - init, 0) :]
            schedule.add_noise(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), timesteps[:1])
        sample, generator = torch.zeros(1, 4, 2, 2), torch.Generator().manual_seed(0)
        for i, t in enumerate(timesteps):
            if type(schedule).__name__ == "UnCLIPScheduler":  # as the prior pipeline calls it
                following = None if i + 1 == len(timesteps) else timesteps[i + 1]
                sample = schedule.step(sample, t, sample, prev_timestep=following, generator=generator).prev_sample
            else:
                sample = schedule.step(sample, t, sample, generator=generator).prev_sample
        return bool(timesteps.numel()) and bool(torch.isfinite(sample).all())
    except (ValueError, IndexError, ZeroDivisionError, RuntimeError):
        return False


def refusals(rows: list[dict]) -> list[str | None]:
    names = list(dict.fromkeys(name for row in rows for name in row))
    table = pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])
    return row_problems(fill_defaults(normalize(table, file="m"), RenderDefaults()), limits=LIMITS, manifest="/m")


def test_prior_step_counts_refused_are_those_its_scheduler_cannot_run(tiny_models: str) -> None:
    schedule = scheduler(tiny_models, "prior")
    rows = [{"id": f"p{n}", "prompt": "x", "prior_num_inference_steps": n} for n in PRIOR_STEPS]
    rows += [{"id": f"e{n}", "image_embeds": [0.0] * 32, "prior_num_inference_steps": n} for n in PRIOR_STEPS]
    problems = dict(zip([row["id"] for row in rows], refusals(rows)))
    for n in PRIOR_STEPS:
        assert (problems[f"p{n}"] is None) == runs(schedule, n, None), (n, problems[f"p{n}"])
        assert problems[f"e{n}"] is None  # given embeddings skip the prior: its steps do not matter
    assert "UnCLIPScheduler needs at least 2 steps" in problems["p1"]


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_step_counts_refused_are_those_its_scheduler_cannot_run(tiny_models: str, name: str) -> None:
    schedule = scheduler(tiny_models, name)
    rows, tried = [], {}
    for n in DECODER_STEPS:
        for strength in STRENGTHS:
            row_id = f"{n}-{strength}"
            tried[row_id] = runs(schedule, n, strength)
            mode = {"mode": "img2img", "image": "s3://b/i.png", "strength": strength} if strength else {}
            rows.append({"id": row_id, "prompt": "x", "num_inference_steps": n, **mode})
    problems = dict(zip([row["id"] for row in rows], refusals(rows)))
    assert {row_id: problems[row_id] is None for row_id in tried} == tried
    assert "start at timestep 1000, past its last (999" in problems["1000-None"]
    assert "more than the 1000 training steps" in problems["1001-0.5"]


def test_the_prior_pipeline_fails_at_one_step_as_the_refusal_says(tiny_models: str) -> None:
    """The edge as users met it: every image of such a row failed with render_failed (ZeroDivisionError)."""
    from diffusers import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline.from_pretrained(str(Path(tiny_models) / "prior"))
    with pytest.raises(ZeroDivisionError):
        pipe("a fox", num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert pipe("a fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds.shape[0] == 1
