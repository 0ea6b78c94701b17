"""The scoring stage: CLIP scores equal a direct transformers computation on the tiny checkpoints; rows pass through."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors.scorer import ScoreActor
from actors.stage import with_errors
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.work import SCORE_FIELDS
from tests.helpers.reference import reference_cosines
from tests.helpers.rows import write_manifest

LONG_PROMPT = "a misty lighthouse on a cliff above a stormy sea at dusk, " * 12  # about 170 tokens
STEPS = {"num_inference_steps": 2, "prior_num_inference_steps": 2}
ROWS = [
    {"id": "fox", "prompt": "a red fox", "seed": 1, "height": 64, "width": 64, **STEPS},
    {"id": "wide", "prompt": "a red dog and an owl", "seed": 2, "height": 32, "width": 96, **STEPS},
    {"id": "long", "prompt": LONG_PROMPT, "seed": 3, "height": 64, "width": 64, **STEPS},
    {"id": "tall", "prompt": "the golden tree", "negative_prompt": "blurry", "seed": 4, "height": 128, "width": 64,
     **STEPS},
    {"id": "interp", "interpolate": [{"prompt": "a cat", "weight": 0.6}, {"prompt": "a dog", "weight": 0.4}],
     "seed": 5, "height": 64, "width": 64, **STEPS},
    {"id": "broken", "prompt": "never rendered", "seed": 6, "height": 64, "width": 64, **STEPS},
]  # fmt: skip
SCORED = ["fox", "wide", "long", "tall"]


@pytest.fixture(scope="module")
def decoded(tiny_models: str, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """Decoded rows of varied sizes from the tiny prior and decoder; ``broken`` failed before the prior."""
    from actors.decoder import DecoderActor
    from actors.prior import PriorActor

    tmp = tmp_path_factory.mktemp("score")
    manifest = write_manifest(tmp / "m.parquet", ROWS)
    config = JobConfig(manifest=manifest, output=str(tmp / "o"), models=ModelPaths.resolve(models_dir=tiny_models))
    work = manifest_work(config).batches.work
    broken = work.column("id").to_pylist().index("broken")
    work = with_errors(work, {broken: ("input_error", "image: cannot be read")})
    embeds = PriorActor(f"{tiny_models}/prior")(work)
    return DecoderActor({"text2img": f"{tiny_models}/decoder"})(embeds)


@pytest.fixture(scope="module")
def scorer(tiny_models: str) -> ScoreActor:
    return ScoreActor(f"{tiny_models}/prior", device="cpu")


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in table.to_pylist()}


def test_scores_equal_the_transformers_computation(tiny_models: str, decoded: pa.Table, scorer: ScoreActor) -> None:
    rows = by_id(decoded)
    cosines = reference_cosines(f"{tiny_models}/prior", [rows[name] for name in SCORED])
    out = by_id(scorer(decoded))
    for name in SCORED:
        assert out[name]["clip_score"] == pytest.approx(max(100 * cosines[name], 0.0), abs=1e-4), name
    # both sides of the clamp are exercised by these rows (random weights: cosines of either sign)
    assert any(c > 0.01 for c in cosines.values()) and any(c < -0.01 for c in cosines.values()), cosines
    assert len(scorer.tokenizer(LONG_PROMPT)["input_ids"]) > 77  # the long prompt was truncated


def test_rows_pass_through_with_their_scores_appended(decoded: pa.Table, scorer: ScoreActor) -> None:
    out = scorer(decoded)
    assert out.schema.names == decoded.schema.names + [field.name for field in SCORE_FIELDS]
    assert out.select(decoded.schema.names).equals(decoded)  # pixels, errors, prior/decoder timings untouched
    rows = by_id(out)
    assert rows["interp"]["prompt"] is None and rows["interp"]["pixels"] is not None
    assert rows["interp"]["clip_score"] is None and rows["interp"]["score_seconds"] is None
    assert rows["broken"]["clip_score"] is None and rows["broken"]["error_kind"] == "input_error"
    for name in SCORED:
        assert rows[name]["score_seconds"] > 0 and rows[name]["score_worker"] == scorer.worker
        assert rows[name]["prior_seconds"] > 0 and rows[name]["decoder_seconds"] > 0
    assert out.schema.field("clip_score").type == pa.float64()


def test_a_batched_call_equals_one_row_calls(decoded: pa.Table, scorer: ScoreActor) -> None:
    calls: list[list[str]] = []
    run = scorer.run

    def recording(call: Any, arrays: dict) -> list[float]:
        calls.append([row["id"] for row in call.rows])
        return run(call, arrays)

    scorer.run = recording  # type: ignore[method-assign]
    try:
        scorer.max_batch_size = None
        batched = by_id(scorer(decoded))
        scorer.max_batch_size = 1
        single = by_id(scorer(decoded))
        scorer.max_batch_size = 2
        pairs = scorer(decoded)
    finally:
        del scorer.run
        scorer.max_batch_size = None
    order = [name for name in decoded.column("id").to_pylist() if name in SCORED]  # the table's order
    assert calls == [order] + [[name] for name in order] + [order[:2], order[2:]]
    for name in SCORED:
        assert batched[name]["clip_score"] == pytest.approx(single[name]["clip_score"], abs=1e-4), name
    seconds = by_id(pairs)
    assert seconds[order[0]]["score_seconds"] == seconds[order[1]]["score_seconds"]  # a call's time is shared


def test_a_row_the_encoders_fail_on_keeps_its_image_and_the_rest_are_scored(
    decoded: pa.Table, scorer: ScoreActor
) -> None:
    ids = decoded.column("id").to_pylist()
    prompts = decoded.column("prompt").to_pylist()
    prompts[ids.index("wide")] = "poison"
    table = decoded.set_column(decoded.schema.get_field_index("prompt"), "prompt", pa.array(prompts, pa.string()))
    heights = decoded.column("pixel_height").to_pylist()
    heights[ids.index("tall")] = 100  # its pixels no longer match its size
    index = table.schema.get_field_index("pixel_height")
    table = table.set_column(index, "pixel_height", pa.array(heights, pa.int32()))
    tokenizer = scorer.tokenizer

    def failing(texts: list[str], **kwargs: Any) -> Any:
        if "poison" in texts:
            raise RuntimeError("cannot tokenize this")
        return tokenizer(texts, **kwargs)

    scorer.tokenizer = failing  # type: ignore[assignment]
    try:
        out = by_id(scorer(table))
    finally:
        scorer.tokenizer = tokenizer
    reference = by_id(scorer(decoded))
    assert out["wide"]["error"] is None and out["wide"]["pixels"] is not None  # the image is kept, unscored
    assert out["wide"]["clip_score"] is None
    assert out["wide"]["score_error"] == "score failed: RuntimeError: cannot tokenize this"
    assert out["tall"]["error_kind"] == "input_error" and "100x64x3" in out["tall"]["error"]
    assert out["tall"]["clip_score"] is None and out["tall"]["pixels"] is None  # unusable pixels: an error row
    for name in ("fox", "long"):
        assert out[name]["error"] is None and out[name]["pixels"] is not None
        assert out[name]["clip_score"] == pytest.approx(reference[name]["clip_score"], abs=1e-4)


def test_only_the_clip_parts_of_the_prior_checkpoint_are_loaded(
    tiny_models: str, decoded: pa.Table, scorer: ScoreActor, tmp_path: Path
) -> None:
    clip_only = tmp_path / "prior"
    for part in ("text_encoder", "image_encoder", "tokenizer", "image_processor"):
        shutil.copytree(Path(tiny_models) / "prior" / part, clip_only / part)
    scores = ScoreActor(str(clip_only), device="cpu")(decoded).column("clip_score").to_pylist()
    assert scores == scorer(decoded).column("clip_score").to_pylist()


def test_an_empty_table_and_a_table_without_prompts(decoded: pa.Table, scorer: ScoreActor) -> None:
    assert scorer(decoded.slice(0, 0)).num_rows == 0
    unprompted = decoded.filter(pc.is_null(decoded.column("prompt")))
    out = scorer(unprompted)
    assert out.num_rows == 1 and out.column("clip_score").null_count == 1
