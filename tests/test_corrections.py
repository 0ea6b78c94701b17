"""Corrections (docs/corrections.md): files under ``corrections/`` of the manifest folder supersede rendered rows by id.

Renders run in-process with the local runner and the tiny models (32x32, 2 steps); each output has 4 rows in 2
shards, and the corrected row ``a1`` shares its shard with ``a0``, which must survive the republish.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import jobs.publishing.corrections as corrections_pass
import jobs.publishing.republish as republish_module
from actors.storage import Storage
from jobs.job import run_job
from jobs.reporting.results import read_results
from jobs.reporting.status import read_final, summary
from schemas.config import JobConfig
from schemas.keys import LAST_CHECKPOINT_FILE, sample_key
from schemas.manifest import ManifestError
from schemas.shards import FORMAT_FILES, FORMAT_PARQUET, FORMAT_WEBDATASET
from tests.helpers.images import png
from tests.helpers.rows import config_for, write_manifest

IDS = [f"a{i}" for i in range(4)]


def row(row_id: str, seed: int, prompt: str = "a red square", **extra: object) -> dict:
    small = {"height": 32, "width": 32, "num_inference_steps": 2, "prior_num_inference_steps": 2}
    return {"id": row_id, "prompt": prompt, "seed": seed, **small, **extra}


def rendered(
    tmp_path: Path, tiny_models: str, output_format: str = FORMAT_FILES, **options: object
) -> tuple[JobConfig, Path]:
    """An output of 4 rows in 2 shards, rendered; the config renders it again (the manifest folder's files)."""
    folder = tmp_path / "m"
    (folder / "corrections").mkdir(parents=True)
    write_manifest(folder / "part-0.parquet", [row(row_id, seed) for seed, row_id in enumerate(IDS)])
    output = str(tmp_path / "out")
    config = config_for(
        str(folder), output, tiny_models, runner="local", shard_rows=2, output_format=output_format, **options
    )
    assert run_job(config).stats["num_rendered"] == 4
    return config, folder


def correct(folder: Path, name: str, *rows: dict) -> None:
    write_manifest(folder / "corrections" / name, list(rows))


def images(output: str) -> dict[str, list[bytes]]:
    """Every PNG the output's data holds, by sample key (all formats)."""
    found: dict[str, list[bytes]] = {}
    root = Path(output)
    for path in root.glob("images/*/*.png"):
        found.setdefault(path.stem, []).append(path.read_bytes())
    for path in root.glob("data/*.tar"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    found.setdefault(member.name[: -len(".png")], []).append(tar.extractfile(member).read())
    for path in root.glob("data/*.parquet"):
        for sample in pq.read_table(path, columns=["key", "png"]).to_pylist():
            found.setdefault(sample["key"], []).append(sample["png"])
    return found


A1 = sample_key("a1", 0)


def all_result_rows(output: str) -> list[dict]:
    """Every results row of every part the markers name now (not reduced to final rows)."""
    storage = Storage(output)
    rows = []
    for key in sorted(str(p.relative_to(output)) for p in Path(output).glob("results/*.parquet")):
        rows += pq.read_table(
            io.BytesIO(storage.read_bytes(key)), columns=["id", "prompt", "manifest_file"]
        ).to_pylist()
    return rows


def assert_corrected(output: str, old_png: bytes, prompt: str) -> None:
    """a1's corrected image is in the output exactly once, its earlier image nowhere; the other ids once each."""
    final = {r["id"]: r for r in read_results(Storage(output)).to_pylist()}  # every part's rows
    assert sorted(final) == IDS and all(r["status"] == "ok" for r in final.values())
    view = read_final(output, columns=["id", "image_index", "status", "prompt"]).to_pylist()  # the final view
    assert [(r["id"], r["prompt"]) for r in view] == [(i, prompt if i == "a1" else "a red square") for i in IDS]
    assert final["a1"]["prompt"] == prompt and "corrections/" in final["a1"]["manifest_file"]
    assert [r["prompt"] for r in all_result_rows(output) if r["id"] == "a1"] == [prompt]
    found = images(output)
    assert sorted(found) == sorted(sample_key(i, 0) for i in IDS) and all(len(v) == 1 for v in found.values())
    assert found[A1] != [old_png]
    assert old_png not in [png for pngs in found.values() for png in pngs]
    status = summary(output, verify=True)
    assert (status["num_images"], status["by_status"]) == (4, {"ok": 4})
    assert status["log"]["checkpoint_agrees"] is True
    pointer = json.loads(Path(output, LAST_CHECKPOINT_FILE).read_bytes())  # the gallery's sample: each image once
    assert sorted((e["id"], e.get("prompt")) for e in pointer["sample"]) == [
        (i, prompt if i == "a1" else "a red square") for i in IDS
    ]


def loaded_prompts(output: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """id -> prompt of each image `datasets` loads from the output (with its dataset card), in a cache of the test's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    found: dict[str, str] = {}
    for sample in datasets.load_dataset(output, split="train"):
        meta = sample.get("json", sample)
        assert meta["id"] not in found, "an image loaded twice"
        found[meta["id"]] = meta["prompt"]
    return found


def output_files(output: str) -> dict[str, int]:
    """The output's data, results and markers, with their modification times (what a no-op run must not touch)."""
    root = Path(output)
    globs = ("images/**/*", "data/*", "results/*", "shards/**/*.json")
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for g in globs for p in root.glob(g) if p.is_file()}


@pytest.mark.parametrize("output_format", [FORMAT_FILES, FORMAT_WEBDATASET, FORMAT_PARQUET])
def test_a_corrected_row_replaces_its_image_exactly_once(
    tmp_path: Path, tiny_models: str, output_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"score": "clip", "save_embeddings": "float16"} if output_format == FORMAT_PARQUET else {}
    config, folder = rendered(tmp_path, tiny_models, output_format, **extra)
    output = config.output
    old = images(output)[A1][0]
    correct(folder, "fix-1.parquet", row("a1", 41, "a blue circle"))
    summary_ = run_job(config)
    assert summary_.stats["num_rendered"] == 1  # only the correction's row renders
    assert_corrected(output, old, "a blue circle")
    if extra:  # scores and saved embeddings follow the images into the republished part
        scores = json.loads(Path(output, LAST_CHECKPOINT_FILE).read_bytes())["scores"]
        assert scores["count"] == 4 and sum(scores["histogram"]) == 4
        named = {e["results"] for e in scores["lowest"] + scores["highest"]}
        assert named and all(Path(output, key).exists() for key in named)
        data = [pq.read_table(p, columns=["id", "image_embeds"]) for p in Path(output, "data").glob("*.parquet")]
        embeds = {r["id"]: r["image_embeds"] for t in data for r in t.to_pylist()}
        assert sorted(embeds) == IDS and all(e is not None for e in embeds.values())
    assert images(output)[sample_key("a0", 0)] and (tmp_path / "m" / "part-0.parquet").exists()
    assert loaded_prompts(output, tmp_path, monkeypatch) == {
        i: "a blue circle" if i == "a1" else "a red square" for i in IDS
    }
    before = output_files(output)
    again = run_job(config)  # nothing new: nothing renders, nothing is republished or deleted
    assert again.stats["num_rendered"] == 0 and output_files(output) == before
    assert_corrected(output, old, "a blue circle")


def test_a_first_run_with_the_manifest_and_its_correction_keeps_only_the_correction(
    tmp_path: Path, tiny_models: str
) -> None:
    folder = tmp_path / "m"
    (folder / "corrections").mkdir(parents=True)
    write_manifest(folder / "part-0.parquet", [row(row_id, seed) for seed, row_id in enumerate(IDS)])
    correct(folder, "fix-1.parquet", row("a1", 41, "a blue circle"))
    output = str(tmp_path / "out")
    config = config_for(str(folder), output, tiny_models, runner="local", shard_rows=2)
    assert run_job(config).stats["num_rendered"] == 5  # the superseded row too: it goes at the end of the run
    found = images(output)
    assert sorted(found) == sorted(sample_key(i, 0) for i in IDS) and all(len(v) == 1 for v in found.values())
    assert [r["prompt"] for r in all_result_rows(output) if r["id"] == "a1"] == ["a blue circle"]
    status = summary(output, verify=True)
    assert (status["num_images"], status["by_status"], status["log"]["checkpoint_agrees"]) == (4, {"ok": 4}, True)


def test_a_correction_with_an_error_keeps_the_old_image_until_a_later_file_corrects_it(
    tmp_path: Path, tiny_models: str
) -> None:
    config, folder = rendered(tmp_path, tiny_models)
    output = config.output
    old = images(output)[A1][0]
    correct(folder, "fix-1.parquet", row("a1", 41, "a blue circle", width=33))  # refused: unsupported size
    run_job(config)
    final = {r["id"]: r for r in read_results(Storage(output)).to_pylist()}
    assert final["a1"]["status"] == "ok" and final["a1"]["prompt"] == "a red square"  # the old row stays final
    assert images(output)[A1] == [old]
    status = summary(output)  # the held correction's error row is counted beside the row it would replace
    assert (status["num_images"], status["by_status"]) == (5, {"ok": 4, "error": 1})
    correct(folder, "fix-2.parquet", row("a1", 42, "a green triangle"))  # the later file wins
    assert run_job(config).stats["num_rendered"] == 1
    assert_corrected(output, old, "a green triangle")


def dies(*args: object, **kwargs: object) -> None:
    raise RuntimeError("the driver died")


@pytest.mark.parametrize("stop", ["before the switch", "after the switch"])
def test_a_crash_while_applying_a_correction_is_finished_by_the_rerun(
    tmp_path: Path, tiny_models: str, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    config, folder = rendered(tmp_path, tiny_models)
    output = config.output
    old = images(output)[A1][0]
    correct(folder, "fix-1.parquet", row("a1", 41, "a blue circle"))
    if stop == "before the switch":  # the correction is published, its superseded shard not republished yet
        monkeypatch.setattr(corrections_pass, "republish", dies)
    else:  # the marker names the new part; the old parts are not deleted yet
        monkeypatch.setattr(republish_module, "delete_parts", dies)
    with pytest.raises(RuntimeError, match="the driver died"):
        run_job(config)
    monkeypatch.undo()
    assert old in images(output)[A1]  # the old image is still on storage either way
    view = {r["id"]: r["prompt"] for r in read_final(output, columns=["id", "image_index", "prompt"]).to_pylist()}
    if stop == "before the switch":  # the window: both rows readable, and counted (docs/corrections.md)
        prompts = sorted(r["prompt"] for r in read_results(Storage(output)).to_pylist() if r["id"] == "a1")
        assert prompts == ["a blue circle", "a red square"] and summary(output)["num_images"] == 5
    else:  # the new state: the final view and the counts hold the corrected row only; the old files are left
        assert view["a1"] == "a blue circle" and len(images(output)[A1]) == 2
        assert (summary(output)["num_images"], summary(output)["by_status"]) == (4, {"ok": 4})
    assert run_job(config).stats["num_rendered"] == 0  # nothing renders again: the rerun finishes the switch
    assert_corrected(output, old, "a blue circle")


def test_retry_errors_on_a_republished_shard_adds_a_part_after_its_last(tmp_path: Path, tiny_models: str) -> None:
    folder = tmp_path / "m"
    (folder / "corrections").mkdir(parents=True)
    late = row("a0", 0, mode="img2img", image=str(tmp_path / "late.png"), strength=0.5)  # an error until it exists
    write_manifest(folder / "part-0.parquet", [late, *(row(row_id, seed) for seed, row_id in enumerate(IDS) if seed)])
    output = str(tmp_path / "out")
    config = config_for(str(folder), output, tiny_models, runner="local", shard_rows=2)
    run_job(config)
    correct(folder, "fix-1.parquet", row("a1", 41, "a blue circle"))
    run_job(config)  # a0's shard is republished as <shard>.retry-1, holding a0's error only
    (tmp_path / "late.png").write_bytes(png(7, side=32))
    assert run_job(dataclasses.replace(config, retry_errors=True)).stats["num_rendered"] == 1
    shard = next(p.stem for p in Path(output, "results").glob("part-0-*-0000000000-0000000002*.parquet"))
    assert sorted(p.name for p in Path(output, "results").glob(f"{shard.split('.')[0]}*")) == [
        f"{shard.split('.')[0]}.retry-1.parquet",
        f"{shard.split('.')[0]}.retry-2.parquet",
    ]
    view = {r["id"]: r for r in read_final(output, columns=["id", "image_index", "status", "prompt"]).to_pylist()}
    assert sorted(view) == IDS and {r["status"] for r in view.values()} == {"ok"}
    assert view["a1"]["prompt"] == "a blue circle"
    status = summary(output, verify=True)
    assert (status["num_images"], status["by_status"], status["log"]["checkpoint_agrees"]) == (4, {"ok": 4}, True)


def test_a_correction_of_an_id_not_in_the_manifest_is_refused_before_model_work(
    tmp_path: Path, tiny_models: str
) -> None:
    folder = tmp_path / "m"
    (folder / "corrections").mkdir(parents=True)
    write_manifest(folder / "part-0.parquet", [row("a0", 0), row("a1", 1)])
    correct(folder, "fix-1.parquet", row("a1", 5), row("zz", 6))
    config = config_for(str(folder), str(tmp_path / "out"), tiny_models, runner="local")
    with pytest.raises(ManifestError, match=r"fix-1\.parquet: column 'id', row 1: id 'zz' is not in the manifest"):
        run_job(config)
    assert not (tmp_path / "out" / "results").exists() and not (tmp_path / "out" / "shards").exists()


def test_ordinary_files_still_refuse_a_repeated_id(tmp_path: Path, tiny_models: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    write_manifest(folder / "part-0.parquet", [row("a0", 0), row("a1", 1)])
    write_manifest(folder / "part-1.parquet", [row("a1", 5)])
    config = config_for(str(folder), str(tmp_path / "out"), tiny_models, runner="local")
    with pytest.raises(ManifestError, match="id 'a1' appears in both"):
        run_job(config)
    correct_in = folder / "corrections"
    correct_in.mkdir()
    (folder / "part-1.parquet").unlink()
    correct(folder, "fix-1.parquet", row("a1", 5), row("a1", 6))
    with pytest.raises(ManifestError, match="duplicate ids"):  # within one correction file: refused too
        run_job(config)
