"""The command line end to end: the bundled example on local Ray, exit codes, python -m, S3 in and out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actors.storage import Storage
from jobs.dev.example import example_manifest_path, example_table
from jobs.job import run_job
from jobs.reporting.results import read_results
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.results import final_results
from tests.helpers.cli import in_process, run
from tests.helpers.docs import page_blocks
from tests.helpers.reference import assert_close_to_reference, load_png, text2img_reference
from tests.helpers.rows import write_manifest


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The README's command as a user types it: a process of its own (a fresh interpreter, a private local Ray)."""
    module, *rest = args
    return run(*rest, module=module, env=env, timeout=timeout)


def test_bundled_example_is_up_to_date_and_covers_every_mode() -> None:
    from jobs.dev.example import EXAMPLE_DIR, example_images
    from schemas.modes import MODES

    table = pq.read_table(example_manifest_path())
    assert table.equals(example_table())
    for name, data in example_images().items():
        assert (Path(EXAMPLE_DIR) / name).read_bytes() == data, name
    rows = table.to_pylist()
    assert {row["mode"] for row in rows} == set(MODES)
    assert any(row["prior_image"] for row in rows) and any(row["interpolate"] for row in rows)
    assert any(row["mode"] == "controlnet" and not row["hint"] for row in rows)  # depth estimated


def test_example_on_local_ray(tmp_path: Path) -> None:
    """README's first command and its example recipe: the bundled example, tiny models, a local Ray, a local folder."""
    output = tmp_path / "example-out"
    cache = tmp_path / "cache"
    env = {"KANDINSKY_RENDER_CACHE": str(cache)}
    proc = run_cli("jobs.cli", "render", "--example", "--output", str(output), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (cache / "tiny-models" / "prior" / "model_index.json").exists()
    assert (output / "_SUCCESS").exists()
    stats = json.loads((output / "stats.json").read_text())
    expected = sum(row.get("num_images") or 1 for row in example_table().to_pylist())
    assert stats["output"]["by_status"] == {"ok": expected}
    assert stats["stages"]["runner"] == "ray"
    final = final_results(read_results(Storage(str(output))))
    assert final.num_rows == expected
    for row in final.to_pylist():
        assert Path(row["uri"]).is_file() and Path(row["uri"]).is_relative_to(output / "images")
    assert "rendered" in proc.stdout
    # the default output says what the job does: the defaults it chose, the summary with its timings, no
    # library notices a user cannot act on
    shown = proc.stdout + proc.stderr
    assert "defaults for the Ray cluster" in shown and " --batch-size 16 " in shown
    assert "seconds to first image stored" in proc.stdout and "seconds to gallery" in proc.stdout
    for noise in ("torchvision", "Token authentication", "Writing model shards", "CPU reservations scaled"):
        assert noise not in shown, noise

    # A rerun renders nothing new and keeps every result.
    again = run_cli("jobs.render", "--example", "--output", str(output), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["num_rendered"] == 0 and stats["num_skipped_already_final"] == expected

    # README's first command ends with this render; its recipe, as written but for the folder: the same render
    # (the rerun above), then status.
    first, _ = [b.code for b in page_blocks("README.md") if b.section == "The two commands"]
    assert first.strip().endswith("&& kandinsky-render render --example --output ./kandinsky-example")
    (recipe,) = [b.code for b in page_blocks("README.md") if b.section == "Recipe: the bundled example"]
    assert recipe.splitlines()[0] == "kandinsky-render render --example --output ./kandinsky-example"
    status = recipe.splitlines()[1].replace("./kandinsky-example", str(output)).split()
    assert status[:2] == ["kandinsky-render", "status"]
    shown = run_cli("jobs.cli", *status[1:], env=env)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"images: {expected} (ok {expected}, error 0)" in shown.stdout, shown.stdout


def test_malformed_manifest_exits_2_before_model_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "x", "mode": "paint"}])
    result = in_process(
        capsys, "render", "--manifest", manifest, "--output", str(tmp_path / "out"), "--models", "/does/not/exist"
    )
    assert result.code == 2
    assert "m.parquet" in result.err and "'mode'" in result.err and "paint" in result.err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_help_documents_defaults(capsys: pytest.CaptureFixture) -> None:
    result = in_process(capsys, "render", "--help")
    assert result.code == 0
    for flag in ("--manifest", "--output", "--models", "--num-decoder-actors", "--prior-gpus", "--batch-size"):
        assert flag in result.out
    assert "kandinsky-community/kandinsky-2-2-prior" in result.out and "(default: chosen for the machine" in result.out


def test_tiny_models_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    result = in_process(capsys, "tiny-models", str(tmp_path / "m"))
    assert result.code == 0, result.err
    for name in ("prior", "decoder", "decoder-inpaint", "controlnet-depth"):
        assert (tmp_path / "m" / name / "model_index.json").exists()


@pytest.mark.usefixtures("ray_two_gpus")
def test_s3_manifest_and_output_on_loopback_endpoint(tmp_path: Path, tiny_models: str, s3_options: dict) -> None:
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(**options)
    rows = [
        {"id": "s3/one", "prompt": "a boat", "height": 64, "width": 64, "seed": 1, "num_images": 2},
        {"id": "s3-two", "prompt": "a tree", "negative_prompt": "fog", "height": 64, "width": 64, "seed": 2},
    ]
    for row in rows:
        row.update(num_inference_steps=3, prior_num_inference_steps=3)
    local = write_manifest(tmp_path / "part-0.parquet", rows)
    fs.put(local, f"{bucket}/manifests/day=1/part-0.parquet")
    config = JobConfig(
        manifest=f"s3://{bucket}/manifests/",
        output=f"s3://{bucket}/renders/run",
        models=ModelPaths.resolve(models_dir=tiny_models),
        storage_options=options,
    )
    run_job(config)
    assert fs.exists(f"{bucket}/renders/run/_SUCCESS")
    final = final_results(read_results(Storage(config.output, storage_options=options)))
    assert sorted(final.column("status").to_pylist()) == ["ok"] * 3
    for result in final.to_pylist():
        assert result["uri"].startswith(f"s3://{bucket}/renders/run/images/")
        fetched = tmp_path / "fetched.png"
        fs.get(result["uri"], str(fetched))
        row = next(r for r in rows if r["id"] == result["id"])
        assert_close_to_reference(
            load_png(str(fetched)), text2img_reference(tiny_models, row, result["seed"]), what=row["id"]
        )


@pytest.mark.parametrize(
    "command",
    [["render"], ["status"], ["calibrate"], ["reuse-embeddings"], ["tiny-models"], ["benchmark"], ["benchmark", "cpu"],
     ["benchmark", "plan"], ["benchmark", "gpu"], ["benchmark", "score"]],
    ids=" ".join,
)  # fmt: skip
def test_every_help_reads_cleanly(command: list[str], capsys: pytest.CaptureFixture) -> None:
    """No ==SUPPRESS==, no '(default: None)' on a required option, no raw backticks; named as the user types it."""
    from jobs.cli import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: kandinsky-render {' '.join(command)} ")
    for wrong in ("==SUPPRESS==", "(default: None)", "(default: )", "`"):
        assert wrong not in text, wrong


def test_version(capsys: pytest.CaptureFixture) -> None:
    from jobs.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("kandinsky-render 0.1.0 (python ")
    with pytest.raises(SystemExit):
        main(["render", "--version"])
    assert " ray 2." in capsys.readouterr().out
