"""The stage contract (grouping, row fallback, out-of-memory splits, kept rows) and the mode table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.stage import Call, Outcome, Stage
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from schemas.models import HUB_MODELS, ModelPaths
from schemas.modes import DECODER_INPUT_KWARGS, MODES, PRIOR_KINDS
from schemas.work import binary_views, embeds_array, embeds_numpy
from tests.conftest import write_manifest


class Recorder(Stage):
    """Records each call's ids; fails calls holding ``bad``; runs out of memory above ``memory`` rows."""

    name = "recorder"
    call_key = ("mode",)

    def __init__(self, *, bad: str | None = None, memory: int | None = None, **base: object) -> None:
        super().__init__(**base)
        self.bad, self.memory, self.calls = bad, memory, []

    def run(self, call: Call, arrays: dict) -> list[float]:
        ids = [row["id"] for row in call.rows]
        if self.memory is not None and len(ids) > self.memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.bad in ids:
            raise RuntimeError("cannot draw this one")
        self.calls.append(ids)
        return [float(arrays["image_embeds"][i].sum()) for i in call.positions]

    def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
        errors = [outcome.errors.get(i, (None, None)) for i in range(table.num_rows)]
        return pa.table(
            {
                "id": table.column("id"),
                "sum": pa.array(outcome.outputs, pa.float64()),
                "error_kind": pa.array([kind for kind, _ in errors], pa.string()),
                "error": pa.array([message for _, message in errors], pa.string()),
                "seconds": pa.array(outcome.seconds, pa.float64()),
            }
        )


def table_of(modes: list[str]) -> pa.Table:
    n = len(modes)
    embeds = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "mode": modes,
            "error": pa.nulls(n, pa.string()),
            "image_embeds": embeds_array(embeds, num_rows=n, dim=4),
        }
    )


def test_calls_group_by_key_are_capped_and_embeddings_arrive_as_arrays() -> None:
    stage = Recorder(max_batch_size=2)
    table = table_of(["a", "b", "a", "a", "b"])
    out = stage(table)
    assert stage.calls == [["r0", "r2"], ["r3"], ["r1", "r4"]]
    assert out.column("sum").to_pylist() == [float(sum(range(4 * i, 4 * i + 4))) for i in range(5)]
    assert all(s is not None and s >= 0 for s in out.column("seconds").to_pylist())


def test_a_failing_call_is_retried_row_by_row() -> None:
    stage = Recorder()
    out = stage(table_of(["a", "a", "a"])).to_pylist()
    assert [r["error_kind"] for r in out] == [None, None, None]
    stage = Recorder(bad="r1")
    out = stage(table_of(["a", "a", "a"])).to_pylist()
    assert [r["error_kind"] for r in out] == [None, "render_failed", None]
    assert out[1]["error"] == "recorder failed: RuntimeError: cannot draw this one"
    assert stage.calls == [["r0"], ["r2"]]


def test_out_of_memory_splits_in_halves_and_keeps_the_smaller_size() -> None:
    stage = Recorder(memory=2)
    out = stage(table_of(["a"] * 7))
    assert stage.calls == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"], ["r6"]]  # 7 -> 4 + 3 -> 2 + 2 + 2 + 1
    assert stage.max_batch_size == 2  # kept for the rest of the run
    assert out.column("error_kind").null_count == 7
    stage(table_of(["a"] * 4))
    assert stage.calls[-2:] == [["r0", "r1"], ["r2", "r3"]]  # later calls start at the smaller size
    single = Recorder(memory=0)
    assert single(table_of(["a"])).column("error").to_pylist()[0].startswith("recorder failed: OutOfMemoryError")


def test_a_stage_must_keep_its_rows() -> None:
    class Dropper(Recorder):
        def finish(self, table: pa.Table, outcome: Outcome) -> pa.Table:
            return super().finish(table, outcome).slice(1)

    with pytest.raises(RuntimeError, match="stage recorder returned 2 rows for 3"):
        Dropper()(table_of(["a", "a", "a"]))


def test_embeddings_round_trip_without_python_floats() -> None:
    values = np.random.default_rng(0).standard_normal((5, 1280)).astype(np.float32)
    column = embeds_array(values, num_rows=5, dim=1280, valid=np.array([1, 1, 0, 1, 1], bool))
    assert column.type == pa.list_(pa.float32(), 1280) and column.null_count == 1
    back = embeds_numpy(pa.chunked_array([column.slice(0, 2), column.slice(2)]))
    assert back.dtype == np.float32 and back.shape == (5, 1280)
    np.testing.assert_array_equal(back[[0, 1, 3, 4]], values[[0, 1, 3, 4]])
    assert not back[2].any()


def test_buffer_columns_reach_the_hooks_as_views_of_the_arrow_buffers() -> None:
    """``pixels`` in ``buffer_columns``: read-only uint8 views (None where null), in sliced and chunked tables too."""

    class Viewer(Recorder):
        buffer_columns = ("pixels",)
        failure_kind = "viewer_failed"

        def wants(self, row: dict) -> bool:
            return row["pixels"] is not None

        def run(self, call: Call, arrays: dict) -> list[float]:
            if any(row["pixels"].size == 3 for row in call.rows):
                raise RuntimeError("three bytes")
            self.calls.append([row["id"] for row in call.rows])
            return [float(row["pixels"].sum()) for row in call.rows]

    values = [bytes(range(5)), None, b"", bytes([7] * 3), bytes([200] * 4)]
    for binary in (pa.binary(), pa.large_binary()):
        pixels = pa.array(values, binary)
        table = table_of(["a"] * 5).append_column("pixels", pixels)
        chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 3), table.slice(4)])
        for case in (table, chunked, table.slice(1)):
            stage = Viewer()
            out = stage(case).to_pylist()
            expected = [None if v is None or len(v) == 3 else float(sum(v)) for v in values][-case.num_rows :]
            assert [row["sum"] for row in out] == expected
            assert [row["error_kind"] for row in out][-2] == "viewer_failed"  # the 3-byte row, alone after the retry
    views = binary_views(pa.array(values, pa.binary()))
    assert views[1] is None and views[2].size == 0 and views[0].dtype == np.uint8 and not views[0].flags.writeable
    assert bytes(views[4]) == values[4]
    with pytest.raises(TypeError, match="binary column"):
        binary_views(pa.array(["text"]))


def test_mode_table_names_real_pipelines_checkpoints_and_inputs() -> None:
    import diffusers

    for mode in MODES.values():
        assert hasattr(diffusers, mode.pipeline), mode.pipeline
        assert mode.checkpoint in HUB_MODELS
        assert mode.required <= mode.reads and set(mode.reads) <= set(DECODER_INPUT_KWARGS)
        assert set(mode.batch_inputs) <= mode.reads
    for kind in PRIOR_KINDS.values():
        if kind.pipeline is None:  # given embeddings skip the prior
            assert kind.reads == "image_embeds"
        else:
            assert hasattr(diffusers, kind.pipeline.split(".")[0]) and kind.pipeline.startswith("KandinskyV22Prior")
    assert MODES["img2img"].size_problem(height=68, width=64, scale=2) is None  # multiples of 2 suffice
    assert "silently crop it to 64" in MODES["img2img"].size_problem(height=65, width=64, scale=8)
    assert "silently render 128" in MODES["text2img"].size_problem(height=96, width=64, scale=8)
    assert "would crash" in MODES["inpaint"].size_problem(height=96, width=64, scale=8)
    assert "square" in MODES["controlnet_img2img"].size_problem(height=128, width=64, scale=8)


def test_sizes_are_refused_at_plan_time_with_the_checkpoint_scale(tmp_path: Path, tiny_models: str) -> None:
    rows = [
        {"id": "fine", "prompt": "p", "height": 68, "width": 64},  # tiny decoder MoVQ: scale 2, multiples of 4
        {"id": "odd", "prompt": "p", "height": 66, "width": 64},
        {"id": "cn", "prompt": "p", "mode": "controlnet", "hint": "h.png", "height": 68, "width": 64},  # scale 8
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=tiny_models))
    plan = manifest_work(config)
    assert plan.batches.work.column("id").to_pylist() == ["fine"]
    refused = {r["id"]: r for r in plan.refused.to_pylist()}
    assert refused["odd"]["error_kind"] == refused["cn"]["error_kind"] == "unsupported_size"
    assert "height=66 is not a multiple of 4" in refused["odd"]["error"]
    assert "height=68 is not a multiple of 64" in refused["cn"]["error"]
    assert plan.movq_scales == {"decoder": 2, "controlnet-depth": 8}


def test_decoder_refuses_a_checkpoint_whose_scale_differs_from_the_plan(tmp_path: Path, tiny_models: str) -> None:
    from actors.decoder import DecoderActor

    with pytest.raises(ValueError, match="MoVQ scale is 2 but the plan checked sizes for 8"):
        DecoderActor({"text2img": f"{tiny_models}/decoder"}, movq_scales={"decoder": 8})


def test_decoder_out_of_memory_split_keeps_the_images(tmp_path: Path, tiny_models: str) -> None:
    """A real decoder whose pipeline call raises CUDA out-of-memory above 2 rows (a test double of the call:
    this machine has no GPU) renders the same images as an unsplit run, in calls of at most 2 rows."""
    from actors.decoder import DecoderActor
    from actors.prior import PriorActor
    from tests.reference import max_level_difference

    rows = [{"id": f"r{i}", "prompt": f"a picture {i}", "seed": i, "height": 64, "width": 64,
             "num_inference_steps": 3, "prior_num_inference_steps": 2} for i in range(5)]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=tiny_models))
    work = manifest_work(config).batches.work
    embeds = PriorActor(f"{tiny_models}/prior")(work)
    models = {"text2img": f"{tiny_models}/decoder"}
    plain = DecoderActor(models)(embeds).to_pylist()

    split = DecoderActor(models, max_batch_size=8)
    real_call, sizes = split.pipes["text2img"].__call__, []

    def call(**kwargs: object) -> object:
        sizes.append(len(kwargs["generator"]))
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real_call(**kwargs)

    split.pipes["text2img"] = type("Pipe", (), {"__call__": staticmethod(call), "unet": split.pipes["text2img"].unet})()
    results = split(embeds).to_pylist()
    assert sizes == [5, 3, 2, 1, 2] and split.max_batch_size == 2
    assert [r["error"] for r in results] == [None] * 5

    def pixels(row: dict) -> np.ndarray:
        return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)

    for a, b in zip(plain, results):
        assert max_level_difference(pixels(a), pixels(b)) <= 1
