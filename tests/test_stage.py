"""The stage contract (grouping, row fallback, out-of-memory splits, kept rows) and the mode table."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.stage import GROW_AFTER, Call, Outcome, Stage, is_out_of_memory
from jobs.planning.run_plan import manifest_work
from schemas.config import JobConfig
from schemas.models import HUB_MODELS, ModelPaths
from schemas.modes import DECODER_INPUT_KWARGS, MODES, PRIOR_KINDS
from schemas.work import binary_views, embeds_array, embeds_numpy
from tests.helpers.rows import write_manifest


def cuda_out_of_memory() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class Activations:
    """Stands for the tensors a failed call allocated (weak-referenceable)."""


class Recorder(Stage):
    """Records each call's ids; fails calls holding ``bad``; runs out of memory above ``memory`` rows
    (or in any call holding ``hungry``), raising a fresh ``oom()`` and leaving `Activations` in its frame."""

    name = "recorder"
    call_key = ("mode",)

    def __init__(
        self,
        *,
        bad: str | None = None,
        memory: int | None = None,
        hungry: str | None = None,
        oom: Callable[[], BaseException] = cuda_out_of_memory,
        **base: object,
    ) -> None:
        super().__init__(**base)
        self.bad, self.memory, self.hungry, self.oom, self.calls = bad, memory, hungry, oom, []
        self.events: list[str] = []  # "release" and, per call, whether the last failed call's memory was alive
        self.failed_call: weakref.ref | None = None

    def run(self, call: Call, arrays: dict) -> list[float]:
        if self.failed_call is not None:
            self.events.append("alive" if self.failed_call() is not None else "freed")
        ids = [row["id"] for row in call.rows]
        if (self.memory is not None and len(ids) > self.memory) or self.hungry in ids:
            activations = Activations()
            self.failed_call = weakref.ref(activations)
            raise self.oom()
        if self.bad in ids:
            raise RuntimeError("cannot draw this one")
        self.calls.append(ids)
        return [float(arrays["image_embeds"][i].sum()) for i in call.positions]

    def release_memory(self) -> None:
        self.events.append("release")

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
    assert stage.max_batch_size == 2  # kept for the next calls
    assert out.column("error_kind").null_count == 7
    stage(table_of(["a"] * 4))
    assert stage.calls[-2:] == [["r0", "r1"], ["r2", "r3"]]  # later calls start at the smaller size
    single = Recorder(memory=0)
    message = single(table_of(["a"])).column("error").to_pylist()[0]
    assert message.startswith("recorder ran out of memory rendering this row alone: OutOfMemoryError")


def test_a_passing_spike_costs_one_retry_and_a_cut_size_grows_back_after_good_calls() -> None:
    """Out of memory once (another process's spike): the same call once more, at the same size. Out of memory
    for good at 4 rows: halves, then after `GROW_AFTER` good calls in a row the size doubles back."""
    stage = Recorder(max_batch_size=4)
    spikes = iter([True])
    run = stage.run

    def spiky(call: Call, arrays: dict) -> list[float]:
        if next(spikes, False):
            raise cuda_out_of_memory()
        return run(call, arrays)

    stage.run = spiky
    stage(table_of(["a"] * 4))
    assert stage.calls == [["r0", "r1", "r2", "r3"]] and stage.max_batch_size == 4  # retried whole, not halved
    stage.memory = 2
    stage(table_of(["a"] * 4))
    assert stage.max_batch_size == 2
    stage.memory = None  # the pressure is gone
    for _ in range(GROW_AFTER // 2 - 2):  # with the two halves above: GROW_AFTER - 2 good calls in a row
        stage(table_of(["a"] * 4))  # two good calls each
    assert stage.max_batch_size == 2
    stage(table_of(["a"] * 4))
    assert stage.max_batch_size == 4  # GROW_AFTER good calls in a row: doubled back, never above the configured
    stage(table_of(["a"] * 8))
    assert stage.calls[-2:] == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]]


# Allocation failures as torch 2.13 raises them (texts from torch's and the libraries' own checks).
ALLOCATION_FAILURES = {
    "caching allocator": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (GPU 0)"),
    "CUDA runtime": lambda: torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be ..."),
    "CUDA driver": lambda: RuntimeError("CUDA driver error: out of memory"),
    "cuBLAS": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    "cuDNN 8": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    "cuDNN 9 device": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    "cuDNN 9 host": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"),
    "ROCm": lambda: torch.OutOfMemoryError("HIP out of memory. Tried to allocate 2.00 GiB"),
    "CPU": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    "host": MemoryError,
}


@pytest.mark.parametrize("kind", sorted(ALLOCATION_FAILURES))
def test_every_allocation_failure_frees_the_call_then_splits(kind: str) -> None:
    """Each kind splits the call; before each retry the failed call's memory is gone and the cache released."""
    stage = Recorder(memory=2, oom=ALLOCATION_FAILURES[kind])
    out = stage(table_of(["a"] * 4))
    assert stage.calls == [["r0", "r1"], ["r2", "r3"]] and stage.max_batch_size == 2
    assert out.column("error").null_count == 4
    # released, tried once more at 4 rows with it freed, released again, then both halves ran with it freed
    assert stage.events == ["release", "freed", "release", "freed", "freed"]


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("cuDNN error: CUDNN_STATUS_BAD_PARAM"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
    ],
)
def test_other_failures_are_not_out_of_memory(exc: BaseException) -> None:
    assert not is_out_of_memory(exc)


def test_a_row_out_of_memory_alone_is_its_error_and_the_others_render() -> None:
    stage = Recorder(hungry="r1")
    out = stage(table_of(["a"] * 3)).to_pylist()
    assert [r["error_kind"] for r in out] == [None, "render_failed", None]
    assert out[1]["error"].startswith("recorder ran out of memory rendering this row alone: ")
    assert "CUDA out of memory" in out[1]["error"]
    assert [ids for ids in stage.calls] == [["r0"], ["r2"]]


class Overlapper(Recorder):
    """Takes two calls from two threads; ``overlap`` decides whether only `run` holds the device lock.

    The first call's host work (`collect`) waits a while for the second call's `run` to start.
    """

    def __init__(self, *, overlap: bool) -> None:
        super().__init__()
        self.overlap = overlap
        self.runs = 0
        self.second_run = threading.Event()
        self.overlapped: bool | None = None  # whether the second call ran during the first one's collect

    @property
    def overlapping(self) -> bool:
        return self.overlap

    def run(self, call: Call, arrays: dict) -> list[float]:
        self.runs += 1
        if self.runs == 2:
            self.second_run.set()
        return super().run(call, arrays)

    def collect(self, call: Call, produced: list[float]) -> list[float]:
        if self.runs == 1:
            self.overlapped = self.second_run.wait(timeout=10 if self.overlap else 0.5)
        return produced


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapping_stages_hold_the_device_lock_only_while_running(overlap: bool) -> None:
    """Overlapping: call 2 runs on the device while call 1 does its host work. Otherwise the whole call 1
    holds the lock, so call 2 cannot start before call 1 ends (the CPU path: one call at a time)."""
    stage = Overlapper(overlap=overlap)
    threads = [threading.Thread(target=stage, args=(table_of(["a"]),)) for _ in range(2)]
    threads[0].start()
    while stage.runs == 0:  # call 1 is in its run or past it
        threading.Event().wait(0.01)
    threads[1].start()
    for thread in threads:
        thread.join(timeout=30)
    assert stage.overlapped is overlap
    assert stage.calls == [["r0"], ["r0"]]


def test_only_overlapping_stages_ask_for_two_calls_at_once() -> None:
    from actors.decoder import DecoderActor
    from actors.prior import PriorActor

    assert DecoderActor.concurrency("cuda") == 2 and DecoderActor.concurrency("cpu") == 1
    assert PriorActor.concurrency("cuda") == 1 and Stage.concurrency("cuda") == 1


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
    assert MODES["img2img"].size_problem(height=68, width=64, scale=2) is None  # multiples of 2 ** 2 suffice
    assert "silently crop it to 64" in MODES["img2img"].size_problem(height=65, width=64, scale=8)
    assert "would crash" in MODES["img2img"].size_problem(height=72, width=64, scale=8)  # a latent of 9
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
    from tests.helpers.reference import max_level_difference

    rows = [{"id": f"r{i}", "prompt": f"a picture {i}", "seed": i, "height": 64, "width": 64,
             "num_inference_steps": 3, "prior_num_inference_steps": 2} for i in range(5)]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=tiny_models))
    work = manifest_work(config).batches.work
    embeds = PriorActor(f"{tiny_models}/prior")(work)
    models = {"text2img": f"{tiny_models}/decoder"}
    plain = DecoderActor(models)(embeds).to_pylist()

    split = DecoderActor(models, max_batch_size=8)
    real, sizes = split.pipes["text2img"], []

    class Pipe:
        """The real pipeline, whose calls above 2 rows raise CUDA out-of-memory."""

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def __call__(self, **kwargs: object) -> object:
            sizes.append(len(kwargs["image_embeds"]))
            if sizes[-1] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
            return real(**kwargs)

    split.pipes["text2img"] = Pipe()
    results = split(embeds).to_pylist()
    # 5 (and once more) -> 3 (and once more) + 2 -> 2 + 1 + 2
    assert sizes == [5, 5, 3, 3, 2, 1, 2] and split.max_batch_size == 2
    assert [r["error"] for r in results] == [None] * 5

    def pixels(row: dict) -> np.ndarray:
        return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)

    for a, b in zip(plain, results):
        assert max_level_difference(pixels(a), pixels(b)) <= 1


def test_the_img2img_size_rule_is_what_diffusers_does(tiny_models: str) -> None:
    """The refusal says what the pipeline would do: a source cut to the MoVQ's multiple, or a latent the UNet's
    downsampling cannot take (the tiny checkpoints: MoVQ scale 2, UNet halving once)."""
    from diffusers import KandinskyV22Img2ImgPipeline
    from PIL import Image

    pipe = KandinskyV22Img2ImgPipeline.from_pretrained(f"{tiny_models}/decoder")
    embeds = torch.zeros(1, pipe.unet.config.encoder_hid_dim)
    image = Image.new("RGB", (64, 64), (120, 30, 200))

    def render(height: int) -> tuple[int, ...]:
        out = pipe(image=image, image_embeds=embeds, negative_image_embeds=embeds, height=height, width=64,
                   num_inference_steps=2, strength=0.5, output_type="np")  # fmt: skip
        return out.images.shape[1:3]

    assert MODES["img2img"].size_problem(height=64, width=64, scale=2) is None and render(64) == (64, 64)
    assert "silently crop it to 64" in MODES["img2img"].size_problem(height=65, width=64, scale=2)
    assert render(65) == (64, 64)
    assert "would crash" in MODES["img2img"].size_problem(height=66, width=64, scale=2)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        render(66)
