"""An output knows what made it: the models (their content), dtype, row defaults and seed are pinned by the first
run; a resume needs only --output; a change is refused before any model loads unless --mixed-output; results,
card and status name the checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.planning import identity
from jobs.planning.identity import folder_digest
from tests.helpers.cli import Outcome, in_process
from tests.helpers.rows import write_manifest

ROWS = [{"id": f"r{i}", "prompt": f"a fox {i}", "seed": i, "height": 64, "width": 64} for i in range(2)]
QUICK = ("--num-inference-steps", "2", "--prior-num-inference-steps", "2", "--runner", "local")
NEW = [{"id": "new", "prompt": "a cat", "seed": 9, "height": 64, "width": 64}]  # a row a later file adds


def resume(capsys: pytest.CaptureFixture, output: Path, *flags: str) -> Outcome:
    """``kandinsky-render render --output OUTPUT FLAGS`` with the local runner: what the output pinned does the rest."""
    return in_process(capsys, "render", "--output", str(output), "--runner", "local", *flags)


@pytest.fixture()
def rendered(tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture) -> tuple[Path, Path, str]:
    """A first run over a manifest folder with one file: (manifest folder, output, models copied to tmp_path)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    folder = tmp_path / "manifests"
    folder.mkdir()
    write_manifest(folder / "a.parquet", ROWS)
    output = tmp_path / "out"
    first = in_process(capsys, "render", "--manifest", str(folder), "--output", str(output), "--models", str(models),
                       *QUICK)  # fmt: skip
    assert first.code == 0, first.err[-2000:]
    return folder, output, str(models)


def test_a_resume_needs_only_the_output_and_uses_the_pinned_models(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, output, models = rendered
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never asked: the pinned folder is loaded
    write_manifest(folder / "b.parquet", NEW)
    again = resume(capsys, output)
    assert again.code == 0, again.err[-2000:]
    final = pq.read_table(output / "results").to_pylist()
    new = next(row for row in final if row["id"] == "new")
    pixels = json.loads((output / "_dataset.json").read_text())["pixels"]
    assert pixels["models"]["decoder"] == f"{models}/decoder" and pixels["defaults"]["num_inference_steps"] == 2
    assert new["status"] == "ok" and new["num_inference_steps"] == 2  # the pinned default, not diffusers' 100
    assert new["decoder_model"] == f"decoder@{pixels['checkpoints']['decoder']['content']}"
    assert new["prior_model"].startswith("prior@") and new["dtype"] == "float32"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--num-inference-steps", "3"), "--num-inference-steps: 2 (pinned) vs 3 (this run)"),
        (("--guidance-scale", "5"), "--guidance-scale: 4.0 (pinned) vs 5.0 (this run)"),
        (("--dtype", "bfloat16"), "--dtype: float32 (pinned) vs bfloat16 (this run)"),
        (("--seed", "7"), "--seed: 0 (pinned) vs 7 (this run)"),
    ],
)
def test_a_changed_setting_is_refused_naming_it_unless_mixed(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture, flags: tuple[str, ...], named: str
) -> None:
    _, output, _ = rendered
    before = (output / "_dataset.json").read_bytes()
    refused = resume(capsys, output, *flags)
    assert refused.code == 2 and named in refused.err and "--mixed-output" in refused.err, refused.err[-2000:]
    assert (output / "_dataset.json").read_bytes() == before  # nothing written
    mixed = resume(capsys, output, "--mixed-output", *flags)
    assert mixed.code == 0, mixed.err[-2000:]
    pinned = json.loads((output / "_dataset.json").read_text())["pixels"]
    assert pinned["mixed"][-1]["changes"] == [named] and pinned["mixed"][-1]["run_id"]
    assert resume(capsys, output, *flags).code == 0  # new pins


def test_a_checkpoint_whose_content_changed_is_refused_before_any_model_loads(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture
) -> None:
    folder, output, models = rendered
    config = Path(models) / "decoder" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"beta_end": 0.012', '"beta_end": 0.013'))
    write_manifest(folder / "b.parquet", NEW)
    refused = resume(capsys, output)
    assert refused.code == 2, refused.err[-2000:]
    assert "checkpoint decoder:" in refused.err and "(pinned) vs" in refused.err, refused.err[-2000:]
    assert not (output / "results").joinpath("new").exists()
    assert len(pq.read_table(output / "results")) == len(ROWS)  # nothing rendered
    # The same content from another folder is the same checkpoint: a moved folder is not a change.
    config.write_text(config.read_text().replace('"beta_end": 0.013', '"beta_end": 0.012'))
    moved = Path(models).with_name("moved")
    shutil.copytree(models, moved)
    again = resume(capsys, output, "--models", str(moved))
    assert again.code == 0, again.err[-2000:]


def test_a_pinned_folder_that_moved_is_named_as_the_pinned_one(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture
) -> None:
    folder, output, models = rendered
    moved = Path(models).with_name("moved")
    Path(models).rename(moved)
    write_manifest(folder / "b.parquet", NEW)
    refused = resume(capsys, output)
    assert refused.code == 2 and f"is the one {output} pinned" in refused.err, refused.err[-2000:]
    assert "Hugging Face hub" not in refused.err  # the hub's weights would be another model
    again = resume(capsys, output, "--models", str(moved))
    assert again.code == 0, again.err[-2000:]


def test_the_dtype_pinned_is_the_one_that_made_the_images_and_auto_keeps_it(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture
) -> None:
    folder, output, _ = rendered
    assert json.loads((output / "_dataset.json").read_text())["pixels"]["dtype"] == "float32"  # auto, resolved
    write_manifest(folder / "b.parquet", NEW)
    for dtype in ("float32", "auto"):  # the dtype its images were made in, by name or as auto's choice
        again = resume(capsys, output, "--dtype", dtype)
        assert again.code == 0, again.err[-2000:]
    assert set(pq.read_table(output / "results").column("dtype").to_pylist()) == {"float32"}


def test_every_change_is_listed_at_once_and_a_run_with_nothing_to_render_pins_nothing(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    folder, output, models = rendered
    other = Path(models).with_name("other")
    shutil.copytree(models, other)
    config = other / "prior" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": 999'))
    write_manifest(folder / "b.parquet", NEW)
    changed = ("--prior", str(other / "prior"), "--num-inference-steps", "5", "--seed", "9")
    refused = resume(capsys, output, *changed)
    assert refused.code == 2, refused.err[-2000:]
    for change in ("--num-inference-steps: 2 (pinned) vs 5", "--seed: 0 (pinned) vs 9", "checkpoint prior: "):
        assert change in refused.err, refused.err[-2000:]
    # Nothing to render: other model folders are not pinned (nothing compared them), and a resume still loads
    # the pinned ones.
    (folder / "b.parquet").unlink()
    before = json.loads((output / "_dataset.json").read_text())["pixels"]
    with caplog.at_level("WARNING", logger="kandinsky_render"):
        noop = resume(capsys, output, "--models", str(other))
    assert noop.code == 0, noop.err[-2000:]
    assert json.loads((output / "_dataset.json").read_text())["pixels"] == before
    assert f"--prior {other}/prior (pinned: {models}/prior)" in caplog.text
    write_manifest(folder / "c.parquet", [{**NEW[0], "id": "later"}])
    resumed = resume(capsys, output)
    assert resumed.code == 0, resumed.err[-2000:]


def test_status_and_the_card_name_the_checkpoints(
    rendered: tuple[Path, Path, str], capsys: pytest.CaptureFixture
) -> None:
    _, output, models = rendered
    pinned = json.loads((output / "_dataset.json").read_text())["pixels"]["checkpoints"]
    status = in_process(capsys, "status", str(output))
    assert status.code == 0
    for name in ("prior", "decoder"):
        line = f"{name}@{pinned[name]['content']}  {models}/{name}"
        assert line in status.out, status.out
        assert f"`{pinned[name]['content']}`" in (output / "README.md").read_text()


def test_a_folder_digest_follows_configs_and_pieces_of_large_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ckpt"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    weights = folder / "unet" / "weights.bin"
    weights.write_bytes(bytes(1000))
    monkeypatch.setattr(identity, "WHOLE_FILE_BYTES", 100)  # weights.bin is "large": read in pieces
    monkeypatch.setattr(identity, "SAMPLE_BYTES", 10)
    first = folder_digest(str(folder))
    assert folder_digest(str(folder)) == first
    data = bytearray(bytes(1000))
    data[990] = 1  # inside the last piece
    weights.write_bytes(bytes(data))
    changed = folder_digest(str(folder))
    assert changed != first
    (folder / "model_index.json").write_text('{"a": 1}')
    assert folder_digest(str(folder)) not in (first, changed)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("hidden files are not the checkpoint")
    assert folder_digest(str(folder)) == folder_digest(str(folder))


def test_relative_model_folders_are_pinned_absolute_so_a_resume_works_from_anywhere(
    tmp_path: Path, tiny_models: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_models, tmp_path / "models")
    folder = tmp_path / "manifests"
    folder.mkdir()
    write_manifest(folder / "a.parquet", ROWS)
    monkeypatch.chdir(tmp_path)
    first = in_process(capsys, "render", "--manifest", "manifests", "--output", "out", "--models", "models", *QUICK)
    assert first.code == 0, first.err[-2000:]
    assert json.loads((tmp_path / "out" / "_dataset.json").read_text())["pixels"]["models"]["prior"] == str(
        tmp_path / "models" / "prior"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write_manifest(folder / "b.parquet", NEW)
    again = in_process(capsys, "render", "--output", str(tmp_path / "out"), "--runner", "local")
    assert again.code == 0, again.err[-2000:]
