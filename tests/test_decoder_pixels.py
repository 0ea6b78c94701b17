"""The decoder's hot path: uint8 pixels made on the device equal diffusers' "np" + to_uint8 bit for bit,
partial batches padded only when compiled, and a compile that fails falls back to eager."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pyarrow as pa
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from actors.common import restore_generator
from actors.decoder import DecoderActor
from actors.images import to_uint8
from actors.pixels import Pixels, pixels_column
from actors.prior import PriorActor
from jobs.planning.run_plan import manifest_work
from schemas.accel import AccelOptions
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.modes import DECODER_INPUT_KWARGS, MODES
from schemas.results import ERROR_NON_FINITE
from schemas.work import embeds_array, embeds_numpy
from tests.helpers.rows import write_manifest

STEPS = {"num_inference_steps": 2, "prior_num_inference_steps": 2}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread, as a decoder actor with one CPU has: bitwise repeatable (pixels move with the
    thread count) and cheap on a shared 2-core machine, where two OpenMP threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_rows(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> pa.Table:
    """Three text2img rows through the tiny prior."""
    rows = [{"id": f"r{i}", "prompt": f"p {i}", "seed": i} for i in range(3)]
    return embeddings(tmp_path_factory.mktemp("text"), tiny_models, rows)


class Spy:
    """Wraps a decoder actor's ``run``: first renders the call's rows the way the decoder rendered them before its
    scheduler was planned (diffusers' own scheduler drawing each step's noise from the rows' CPU generators, PIL
    inputs, ``output_type="np"``, the same batch composition, padding included): today's pixels, kept per
    generator state; and each call's size."""

    def __init__(self, actor: DecoderActor) -> None:
        self.actor = actor
        self.references: dict[bytes, np.ndarray] = {}
        self.sizes: list[int] = []
        run = actor.run

        def spied(call: Any, arrays: dict) -> Any:
            self.record(call, arrays)
            return run(call, arrays)

        actor.run = spied

    def stock(self, mode: str) -> Any:
        """The mode's pipeline on the actor's modules, with diffusers' own scheduler and image processor."""
        pipe = self.actor.pipes[mode]
        components = {**pipe.components, "scheduler": DDPMScheduler.from_config(pipe.scheduler.config)}
        stock = getattr(diffusers, MODES[mode].pipeline)(**components)
        stock.set_progress_bar_config(disable=True)
        return stock

    def record(self, call: Any, arrays: dict) -> None:
        actor = self.actor
        padding = max(0, (actor.max_batch_size or 0) - len(call.positions)) if actor.compiled else 0
        positions, rows = call.positions + call.positions[-1:] * padding, call.rows + call.rows[-1:] * padding
        self.sizes.append(len(rows))
        mode = MODES[rows[0]["mode"]]
        pipe = self.stock(mode.name)

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(values)).to(dtype=pipe.unet.dtype)

        kwargs: dict[str, Any] = {
            "image_embeds": tensor(arrays["image_embeds"][positions]),
            "negative_image_embeds": tensor(arrays["negative_image_embeds"][positions]),
            **{name: rows[0][name] for name in ("height", "width", "num_inference_steps", "guidance_scale")},
            "generator": [restore_generator(row["generator_state"]) for row in rows],
            "output_type": "np",
        }
        images = [actor._images(row) for row in rows]
        for column in sorted(images[0]):
            values = [item[column] for item in images]
            kwargs[DECODER_INPUT_KWARGS[column]] = tensor(np.stack(values)) if column == "hint" else values
        if mode.partial_schedule:
            kwargs["strength"] = rows[0]["strength"]
        for row, image in zip(rows, pipe(**kwargs).images):
            self.references.setdefault(row["generator_state"], image)


def spy_on(actor: DecoderActor) -> Spy:
    return Spy(actor)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def embeddings(tmp_path: Path, models: str, rows: list[dict]) -> pa.Table:
    manifest = write_manifest(tmp_path / "m.parquet", [{**STEPS, "height": 64, "width": 64, **row} for row in rows])
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=models))
    return PriorActor(f"{models}/prior")(manifest_work(config).batches.work)


def decoded(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["pixel_height"], row["pixel_width"], 3)


def with_nan_embedding(table: pa.Table, row_id: str) -> pa.Table:
    values = embeds_numpy(table.column("image_embeds")).copy()
    values[table.column("id").to_pylist().index(row_id)] = np.nan
    column = embeds_array(values, num_rows=table.num_rows, dim=values.shape[1])
    return table.set_column(table.schema.get_field_index("image_embeds"), "image_embeds", column)


def test_every_mode_gives_todays_pixels_bit_for_bit(tmp_path: Path, tiny_models: str) -> None:
    """Two rows per decoder mode and one NaN row: each image equals the pipeline's "np" output of the same
    call through `to_uint8`, exactly; the NaN row is ``non_finite_output`` as before, its call-mates render."""
    rng = np.random.default_rng(0)
    for name, pixels in {
        "photo.png": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8),
        "mask.png": np.pad(np.full((32, 32), 255, np.uint8), 16),
        "depth.png": np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None], (1, 64)),
    }.items():
        (tmp_path / name).write_bytes(png(pixels))
    photo, mask, depth = (str(tmp_path / name) for name in ("photo.png", "mask.png", "depth.png"))
    inputs = {
        "text2img": {},
        "img2img": {"image": photo, "strength": 0.6},
        "inpaint": {"image": photo, "mask": mask},
        "controlnet": {"hint": depth},
        "controlnet_img2img": {"image": photo, "hint": depth, "strength": 0.5},
    }
    rows = [
        {"id": f"{mode}-{k}", "mode": mode, "prompt": f"a {mode} {k}", "seed": 10 * i + k, **extra}
        for i, (mode, extra) in enumerate(inputs.items())
        for k in range(2)
    ]
    rows.append({"id": "nan", "prompt": "a text2img 2", "seed": 99})
    embeds = with_nan_embedding(embeddings(tmp_path, tiny_models, rows), "nan")
    models = {mode: f"{tiny_models}/{MODES[mode].checkpoint}" for mode in inputs}
    actor = DecoderActor(models, device="cpu", max_batch_size=4)
    spy = spy_on(actor)
    results = {row["id"]: row for row in actor(embeds).to_pylist()}
    states = dict(zip(embeds.column("id").to_pylist(), embeds.column("generator_state").to_pylist()))
    # one call per mode, each as planned (eager: a partial batch is not padded to max_batch_size)
    assert sorted(spy.sizes) == [2, 2, 2, 2, 3]
    for row_id, result in results.items():
        reference = spy.references[states[row_id]]
        if row_id == "nan":
            assert not np.isfinite(reference).all()
            assert result["error_kind"] == ERROR_NON_FINITE and result["pixels"] is None
            assert result["error"] == "decoder produced non-finite pixels (NaN/inf)"
            continue
        assert result["error"] is None, result["error"]
        np.testing.assert_array_equal(decoded(result), to_uint8(reference), err_msg=row_id)


def test_pixels_column_points_into_the_buffers_it_is_given() -> None:
    buffer = pa.py_buffer(np.arange(5 * 12, dtype=np.uint8))
    other = pa.py_buffer(np.full(12, 7, np.uint8))

    def image(source: pa.Buffer, k: int) -> Pixels:
        return Pixels(buffer=source, offset=12 * k, height=2, width=2, finite=True)

    # one call in row order with an error row between its images; then a row of another call; then
    # an image that is not next to the previous one
    images = [image(buffer, 0), None, image(buffer, 1), image(other, 0), image(buffer, 3), image(buffer, 4)]
    column = pixels_column(images)
    assert column.type == pa.binary() and column.null_count == 1
    assert [chunk.buffers()[2].address for chunk in column.chunks] == [
        buffer.address,
        other.address,
        buffer.address + 36,
    ]  # zero-copy slices: three runs of adjacent images
    expected = [None if i is None else i.array().tobytes() for i in images]
    assert column.to_pylist() == expected
    assert pixels_column([None, None]).to_pylist() == [None, None] and len(pixels_column([])) == 0


@pytest.fixture()
def fake_compile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """``Module.compile`` replaced by a stand-in (inductor takes minutes on 2 cores): the module's
    compiled call runs its plain forward and records each input's shape, or raises what ``failure``
    holds, as torch.compile raises when compiling fails. The compile cache goes to ``tmp_path``."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset-below")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("KANDINSKY_RENDER_CACHE", str(tmp_path / "cache"))
    state: dict[str, Any] = {"shapes": [], "failure": None}

    def compile(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        plain = self._call_impl

        def compiled(*inputs: Any, **named: Any) -> Any:
            if state["failure"] is not None:
                raise state["failure"]()
            state["shapes"].append(tuple((inputs[0] if inputs else named["sample"]).shape))
            return plain(*inputs, **named)

        state["dynamic"] = kwargs.get("dynamic")
        self._compiled_call_impl = compiled

    def compile_function(function: Any, **kwargs: Any) -> Any:  # torch.compile of the MoVQ's decode
        def compiled(*inputs: Any, **named: Any) -> Any:
            if state["failure"] is not None:
                raise state["failure"]()
            state["decodes"].append(tuple(inputs[0].shape))
            return function(*inputs, **named)

        return compiled

    state["decodes"] = []
    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    monkeypatch.setattr(torch, "compile", compile_function)
    return state


def test_compiled_runs_pad_partial_batches_and_drop_the_padding(
    tmp_path: Path, tiny_models: str, fake_compile: dict, text_rows: pa.Table
) -> None:
    """(Eager runs keep their batches: see the sizes in the bit-for-bit test.)"""
    models = {"text2img": f"{tiny_models}/decoder"}
    compiled = DecoderActor(models, device="cpu", max_batch_size=4, accel=AccelOptions(compile=True))
    assert fake_compile["dynamic"] is False and (tmp_path / "cache" / "inductor").is_dir()
    spy = spy_on(compiled)
    padded = compiled(text_rows).to_pylist()
    assert spy.sizes == [4] and len(padded) == 3  # padded to the batch size; the padding row dropped
    for state, row in zip(text_rows.column("generator_state").to_pylist(), padded):
        np.testing.assert_array_equal(decoded(row), to_uint8(spy.references[state]))


def test_warm_up_compiles_each_shape_before_the_actor_is_ready(tiny_models: str, fake_compile: dict) -> None:
    models = {"text2img": f"{tiny_models}/decoder", "img2img": f"{tiny_models}/decoder"}
    with pytest.raises(ValueError, match="warmup entry"):
        DecoderActor(models, device="cpu", warmup=[("inpaint", 64, 64, 1)])
    warmup = [("text2img", 64, 64, 1), ("img2img", 32, 32, 3), ("text2img", 64, 64, 1)]
    actor = DecoderActor(models, device="cpu", max_batch_size=2, accel=AccelOptions(compile=True), warmup=warmup)
    # each (mode, size) at max_batch_size and the sizes out-of-memory splits make (2 -> 1), with guidance (the UNet
    # batch doubled) and without; the tiny MoVQ's scale is 2
    unet = {(1, 4, 32, 32), (2, 4, 32, 32), (2, 4, 16, 16), (4, 4, 16, 16), (1, 4, 16, 16)}
    assert set(fake_compile["shapes"]) == unet
    assert set(fake_compile["decodes"]) == {(1, 4, 32, 32), (2, 4, 16, 16), (1, 4, 16, 16)}
    # after the warm-up a shape nobody compiled runs eagerly, with one warning
    calls = len(fake_compile["shapes"])
    actor.pipes["text2img"].unet(
        torch.zeros(3, 4, 8, 8), 1, None, added_cond_kwargs={"image_embeds": torch.zeros(3, 32)}
    )
    assert len(fake_compile["shapes"]) == calls


@pytest.mark.parametrize("warm_up", [True, False], ids=["at-start", "first-call"])
def test_a_failed_compile_falls_back_to_eager_with_one_warning(
    tiny_models: str, fake_compile: dict, caplog: pytest.LogCaptureFixture, warm_up: bool, text_rows: pa.Table
) -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    fake_compile["failure"] = lambda: BackendCompilerFailed(print, RuntimeError("no working C++ compiler"), None)
    models = {"text2img": f"{tiny_models}/decoder"}
    warmup = [("text2img", 64, 64, 1)] if warm_up else []
    with caplog.at_level(logging.WARNING):
        actor = DecoderActor(models, device="cpu", accel=AccelOptions(compile=True), warmup=warmup)
        spy = spy_on(actor)
        results = actor(text_rows).to_pylist()
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "torch.compile failed, running eagerly from now on" in warnings[0]
    assert "no working C++ compiler" in warnings[0]
    assert actor.compiled == [] and actor.pipes["text2img"].unet._compiled_call_impl is None
    assert spy.sizes == ([3] if warm_up else [3, 3])  # the failed first call, then the same call eagerly
    for state, row in zip(text_rows.column("generator_state").to_pylist(), results):
        assert row["error"] is None
        np.testing.assert_array_equal(decoded(row), to_uint8(spy.references[state]))
