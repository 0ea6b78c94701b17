"""Outputs the dataset ecosystem reads as they are: each format of one mixed manifest, rendered once, read with
Hugging Face `datasets` (the output's card; streaming and not), `webdataset` and pandas, as docs/output.md shows;
the final view after ``--retry-errors`` (`kandinsky-render status`); duplicates; the pinned manifest."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs.cli import main as cli
from jobs.job import run_job
from jobs.reporting.status import read_final
from schemas.config import JobConfig
from schemas.models import ModelPaths
from tests.helpers.docs import blocks_in
from tests.helpers.places import REPO
from tests.helpers.reference import load_result
from tests.helpers.rows import write_manifest

FORMATS = ("webdataset", "parquet", "files")
SIDE = 32  # tiny: the tiny MoVQ (scale 2) renders multiples of 4
SIZE = {"height": SIDE, "width": SIDE, "num_inference_steps": 2, "prior_num_inference_steps": 2}
# Sorted by key, the first samples have nulls (negative_prompt, interpolate, inputs); a duplicate by construction
# (a-null-first #1 and b-twin #0 share prompt and seed 11); every prior input; three bad rows.
ROWS = [
    {"id": "a-null-first", "prompt": "a lighthouse", "seed": 10, "num_images": 2},
    {"id": "b-twin", "prompt": "a lighthouse", "seed": 11},
    {"id": "c-negative", "prompt": "a cat", "negative_prompt": "blurry", "seed": 3},
    {"id": "d-interp", "seed": 4, "interpolate": [
        {"prompt": "a red fox", "image": None, "weight": 0.6}, {"prompt": None, "image": "source.png", "weight": 0.4}]},
    {"id": "e-img2img", "mode": "img2img", "prompt": "a sunset", "image": "source.png", "strength": 0.5, "seed": 5},
    {"id": "f-guided", "prompt": "a statue", "prior_image": "source.png", "prior_strength": 0.5, "seed": 6},
    {"id": "g-missing", "mode": "img2img", "prompt": "a boat", "image": "late.png", "strength": 0.5, "seed": 7},
    {"id": "h-no-prompt", "seed": 8},
    {"id": "i-bad-size", "prompt": "a tree", "seed": 9, "height": 65},
]  # fmt: skip
OK_IMAGES = {
    ("a-null-first", 0),
    ("a-null-first", 1),
    ("b-twin", 0),
    ("c-negative", 0),
    ("d-interp", 0),
    ("e-img2img", 0),
    ("f-guided", 0),
}
ERRORS = {("g-missing", 0): "input_error", ("h-no-prompt", 0): "invalid_row", ("i-bad-size", 0): "unsupported_size"}
INTERP_CAPTION = "a red fox (0.6) + [image source.png] (0.4)"


def manifest_rows() -> tuple[list[dict], pa.Schema]:
    item = pa.struct([("prompt", pa.string()), ("image", pa.string()), ("weight", pa.float64())])
    texts = ("id", "mode", "prompt", "negative_prompt", "image", "prior_image")
    schema = pa.schema(
        [*((name, pa.string()) for name in texts), ("interpolate", pa.list_(item))]
        + [(name, pa.float64()) for name in ("prior_strength", "strength")]
        + [(name, pa.int64()) for name in ("seed", "num_images", *SIZE)]
    )
    return [{name: ({**SIZE, **row}).get(name) for name in schema.names} for row in ROWS], schema


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`datasets` converts what it loads into a cache: this module's, not the user's home."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
        yield


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, tiny_models: str) -> dict:
    """The mixed manifest rendered once into each format (in-process: Ray adds nothing to reading outputs)."""
    root = tmp_path_factory.mktemp("datasets")
    shutil.copy(REPO / "jobs/dev/examples/source.png", root / "source.png")
    rows, schema = manifest_rows()
    manifest = write_manifest(root / "manifest.parquet", rows, schema=schema)
    models = ModelPaths.resolve(models_dir=tiny_models)
    found = {"root": root, "manifest": manifest, "models": tiny_models}
    for output_format in FORMATS:
        output = root / output_format
        config = JobConfig(
            manifest=manifest,
            output=str(output),
            models=models,
            runner="local",
            score="clip",
            save_embeddings="float16",
            output_format=output_format,
        )
        found[output_format] = {"output": output, "stats": run_job(config).stats}
    return found


def expected_images(found: dict) -> dict[tuple[str, int], np.ndarray]:
    """Each ok image's pixels, read back through its results row (the ground truth of the readers below)."""
    final = read_final(str(found["output"])).to_pylist()
    return {(r["id"], r["image_index"]): load_result(r) for r in final if r["status"] == "ok"}


def metadata(sample: dict) -> dict:
    """The sample's metadata with its nulls: other formats' columns, or webdataset's json decoded (it has no null:
    "" for no text, -1 for an unused number, `interpolate` as JSON text, `has_negative_prompt`)."""
    if "json" not in sample:
        return sample
    meta = dict(sample["json"])
    meta["negative_prompt"] = meta["negative_prompt"] if meta.pop("has_negative_prompt") else None
    meta["interpolate"] = json.loads(meta["interpolate"]) if meta["interpolate"] else None
    for name in ("strength", "prior_strength", "prior_guidance_scale", "prior_num_inference_steps", "clip_score"):
        meta[name] = None if meta[name] == -1 else meta[name]
    return meta


def check_sample(sample: dict, images: dict[tuple[str, int], np.ndarray]) -> tuple[str, int]:
    """One image as `datasets` gives it: typed metadata, its caption and seed, the pixels of its results row."""
    meta = metadata(sample)
    key = (meta["id"], meta["image_index"])
    row = next(r for r in ROWS if r["id"] == key[0])
    assert isinstance(meta["image_index"], int) and meta["width"] == SIDE and meta["height"] == SIDE
    assert meta["seed"] == row["seed"] + key[1]
    assert meta["caption"] == (INTERP_CAPTION if key[0] == "d-interp" else row["prompt"])
    assert meta["negative_prompt"] == row.get("negative_prompt")
    assert isinstance(meta["clip_score"], float) != (key[0] == "d-interp")  # no prompt to score an interpolation by
    assert meta["strength"] == (0.5 if key[0] == "e-img2img" else None)
    np.testing.assert_array_equal(np.asarray(sample["png"].convert("RGB")), images[key])
    if "json" in sample:
        assert sample["txt"] == meta["caption"] and np.asarray(sample["npy"]).shape == (2, 32)
        assert (meta["interpolate"] is None) == (key[0] != "d-interp")
    else:
        assert len(sample["image_embeds"]) == 32
    return key


@pytest.mark.parametrize("output_format", FORMATS)
def test_every_format_loads_typed_from_its_dataset_card(rendered: dict, output_format: str) -> None:
    import datasets

    found, output = rendered[output_format], str(rendered[output_format]["output"])
    images = expected_images(found)
    assert set(images) == OK_IMAGES
    loaded = datasets.load_dataset(output, split="train")
    features = loaded.features["json"] if output_format == "webdataset" else loaded.features
    assert isinstance(loaded.features["png"], datasets.Image)
    assert features["negative_prompt"] == datasets.Value("string") and features["width"] == datasets.Value("int32")
    assert {check_sample(sample, images) for sample in loaded} == OK_IMAGES
    streamed = datasets.load_dataset(output, split="train", streaming=True)
    assert {check_sample(sample, images) for sample in streamed} == OK_IMAGES
    results = datasets.load_dataset(output, data_dir="results", split="train")
    assert results.num_rows == len(OK_IMAGES) + len(ERRORS) and results.features["width"] == datasets.Value("int32")
    if output_format == "parquet":  # the one format whose results are a config of the card too (datasets#7101)
        assert datasets.load_dataset(output, "results", split="train").num_rows == results.num_rows


def test_results_record_inputs_relative_uris_and_integer_sizes(rendered: dict) -> None:
    root = rendered["root"]
    for output_format in FORMATS:
        output = rendered[output_format]["output"]
        frame = pd.read_parquet(output / "results")
        assert str(frame["width"].dtype) == "Int32" and str(frame["attempt"].dtype) == "Int32"
        rows = {(r["id"], r["image_index"]): r for r in frame.to_dict("records")}
        assert {k: r["error_kind"] for k, r in rows.items() if r["status"] == "error"} == ERRORS
        for key in OK_IMAGES:  # relative to the output: the folder can move
            assert not rows[key]["uri"].startswith("/") and (output / rows[key]["uri"]).is_file()
        source = str(root / "source.png")
        items = [
            {"prompt": "a red fox", "image": None, "weight": 0.6},
            {"prompt": None, "image": source, "weight": 0.4},
        ]
        assert [dict(item) for item in rows[("d-interp", 0)]["interpolate"]] == items
        assert pd.isna(rows[("d-interp", 0)]["prompt"]) and rows[("d-interp", 0)]["caption"] == INTERP_CAPTION
        assert rows[("f-guided", 0)]["prior_image"] == source and rows[("f-guided", 0)]["prior_strength"] == 0.5
        assert rows[("e-img2img", 0)]["image"] == source and rows[("e-img2img", 0)]["strength"] == 0.5
        assert pd.isna(rows[("c-negative", 0)]["strength"]) and pd.isna(rows[("c-negative", 0)]["prior_strength"])
        # an error row records the size it asked for (an integer, as on ok rows), though no image was made
        assert rows[("h-no-prompt", 0)]["status"] == "error" and rows[("h-no-prompt", 0)]["width"] == 32


def run_example(code: str, output: Path) -> dict:
    assert 'OUTPUT = "kandinsky-example"' in code
    namespace: dict = {}
    exec(code.replace('OUTPUT = "kandinsky-example"', f"OUTPUT = {str(output)!r}"), namespace)
    return namespace


def test_docs_reader_examples_read_every_format(rendered: dict) -> None:
    """docs/output.md's three readers, as written, on an output of each format."""
    with_datasets, with_webdataset, with_pandas = blocks_in("docs/output.md", "Reading the output", "python")
    for output_format in FORMATS:
        output = rendered[output_format]["output"]
        found = run_example(with_datasets, output)
        assert len(found["images"]) == len(OK_IMAGES) and found["meta"]["caption"] == found["meta"]["prompt"]
        assert metadata(found["sample"])["key"] and found["results"].num_rows == len(OK_IMAGES) + len(ERRORS)
        found = run_example(with_pandas, output)
        final = found["final"]
        assert len(final) == len(OK_IMAGES) + len(ERRORS) and set(found["failed"]["id"]) == {k for k, _ in ERRORS}
        assert all(Path(path).is_file() for path in found["paths"])
        library = read_final(str(output), absolute_uris=False).to_pandas()
        columns = ["id", "image_index", "status", "attempt", "uri", "member", "seed", "caption"]
        pd.testing.assert_frame_equal(final[columns], library[columns], check_dtype=False)
    found = run_example(with_webdataset, rendered["webdataset"]["output"])
    assert found["image"].size == (SIDE, SIDE) and found["caption"] == found["meta"]["caption"]
    assert found["images"].num_rows == len(OK_IMAGES)  # the tars alone, with datasets


def test_webdataset_members_follow_the_conventions(rendered: dict) -> None:
    import webdataset as wds

    tars = sorted((rendered["webdataset"]["output"] / "data").glob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    keys = {name.split(".", 1)[0] for name in names}
    assert sorted(names) == sorted(f"{key}.{ext}" for key in keys for ext in ("json", "npy", "png", "txt"))
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("pil"))
    assert len(samples) == len(OK_IMAGES)
    for sample in samples:
        assert sample["__key__"] == sample["json"]["key"] and sample["txt"] == sample["json"]["caption"]
        assert (
            sample["png"].size == (SIDE, SIDE) and sample["npy"].shape == (2, 32) and sample["npy"].dtype == np.float16
        )


def test_the_tars_load_with_datasets_alone(rendered: dict) -> None:
    """`load_dataset("webdataset", data_files=<the tars>)`, as webdataset users stream them: no card, types inferred."""
    import datasets

    tars = sorted(str(path) for path in (rendered["webdataset"]["output"] / "data").glob("*.tar"))
    loaded = datasets.load_dataset("webdataset", data_files=tars, split="train")
    images = expected_images(rendered["webdataset"])
    assert {check_sample(sample, images) for sample in loaded} == OK_IMAGES


def test_docs_embeddings_round_trip(rendered: dict, tmp_path: Path) -> None:
    """docs/output.md's reuse-embeddings commands, with its placeholders replaced and the render made tiny."""
    (block,) = blocks_in("docs/output.md", "Embeddings and scores in the same pass", "bash")
    commands = [line.split()[1:] for line in block.splitlines() if line.startswith("kandinsky-render ")]
    places = {
        "OUTPUT": str(rendered["webdataset"]["output"]),
        "NEW_MANIFEST": str(tmp_path / "again-manifest"),
        "OUT2": str(tmp_path / "again"),
    }
    tiny = f"--models {rendered['models']} --runner local --progress off"
    small = f"{tiny} --height 48 --width 48 --num-inference-steps 2".split()  # the documented size, made tiny
    for argv in commands:
        argv = [places.get(arg, arg) for arg in argv]
        assert cli(argv + (small if argv[0] == "render" else [])) == 0, argv
    saved = {(r["id"], r["image_index"]): r for r in read_final(places["OUTPUT"]).to_pylist()}
    again = read_final(places["OUT2"]).to_pylist()
    assert {r["id"] for r in again} == {f"{i}/{n}" for i, n in OK_IMAGES}
    for row in again:
        row_id, index = row["id"].rsplit("/", 1)
        first = saved[(row_id, int(index))]
        assert row["status"] == "ok" and row["seed"] == first["seed"] and row["prompt"] == first["prompt"]
        assert row["prior_seconds"] == 0.0 and row["width"] == 48  # no prior call; the new size


def test_status_after_retry_errors_gives_one_row_per_image(
    rendered: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "retried"
    shutil.copytree(rendered["webdataset"]["output"], output)
    shutil.copy(rendered["root"] / "source.png", rendered["root"] / "late.png")  # the missing input arrives
    try:
        tiny = f"--models {rendered['models']} --runner local --progress off"
        assert cli(["render", "--output", str(output), "--retry-errors", *tiny.split()]) == 0  # the pinned manifest
    finally:
        (rendered["root"] / "late.png").unlink()
    capsys.readouterr()
    stats = json.loads((output / "stats.json").read_text())
    assert stats["this_run"]["num_images"] == 1 and stats["num_skipped_already_final"] == len(OK_IMAGES) + 2
    assert stats["output"]["by_status"] == {"ok": len(OK_IMAGES) + 1, "error": 2}
    history = pd.read_parquet(output / "results")
    assert len(history) == len(OK_IMAGES) + len(ERRORS) + 1  # the superseded error stays in results/; refusals once

    printed = {}  # docs/output.md's status commands, as written, on this output: what each printed
    (commands,) = blocks_in("docs/output.md", "Reading the output", "bash")
    for line in commands.splitlines():
        argv = line.split(">")[0].split()[1:]
        argv = [
            str(output) if a == "kandinsky-example" else str(tmp_path / a) if a == "final.parquet" else a for a in argv
        ]
        assert cli(argv) == 0, line
        printed[" ".join(line.split()[3:])] = capsys.readouterr().out
    rows = [json.loads(line) for line in printed["--all --json > final.jsonl"].splitlines()]
    assert len(rows) == len({(r["id"], r["image_index"]) for r in rows}) == len(OK_IMAGES) + len(ERRORS)
    final = {(r["id"], r["image_index"]): r for r in rows}
    assert final[("g-missing", 0)]["status"] == "ok" and final[("g-missing", 0)]["attempt"] == 1
    errors = {key: row["attempt"] for key, row in final.items() if row["status"] == "error"}
    assert errors == {("h-no-prompt", 0): 0, ("i-bad-size", 0): 0}  # kept, not written again
    library = read_final(str(output)).to_pylist()
    listed = sorted(rows, key=lambda r: (r["id"], r["image_index"]))
    assert [(r["id"], r["status"], r["uri"]) for r in library] == [(r["id"], r["status"], r["uri"]) for r in listed]
    (pandas_read,) = [b for b in blocks_in("docs/output.md", "Reading the output", "python") if "drop_duplicates" in b]
    assert len(run_example(pandas_read, output)["final"]) == len(rows)
    assert pd.read_parquet(tmp_path / "final.parquet")["id"].tolist() == [r["id"] for r in library]
    assert "h-no-prompt\t0\terror\tinvalid_row" in printed["--errors"]
    assert "i-bad-size\t0\terror\tunsupported_size" in printed["--errors"]
    assert "error invalid_row: 1 (first: h-no-prompt #0)" in printed[""]
    assert cli(["status", str(output), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["first_failed"] == {"invalid_row": [["h-no-prompt", 0]], "unsupported_size": [["i-bad-size", 0]]}
    assert cli(["status", str(tmp_path / "nothing-here")]) == 2


def test_duplicates_and_first_failures_are_named(rendered: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.reporting.progress import summary_table

    stats = rendered["files"]["stats"]
    assert stats["duplicates"]["num_repeated"] == 1
    assert stats["duplicates"]["examples"] == [[["a-null-first", 1], ["b-twin", 0]]]
    assert stats["this_run"]["first_failed"] == {kind: [[key[0], 0]] for key, kind in ERRORS.items()}
    table = summary_table(stats)
    assert "same inputs, settings and seed: a-null-first #1 = b-twin #0" in table
    assert "first failed (input_error): g-missing #0" in table
    argv = [
        "render",
        "--manifest",
        rendered["manifest"],
        "--output",
        str(tmp_path / "new"),
        "--dry-run",
        "--models",
        rendered["models"],
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out  # 8 renderable images (g-missing's input is found missing only when rendering)
    assert "duplicate images (the same prompt inputs, settings and seed): 1 of 8 image(s), e.g. a-null-first #1" in out


def test_gallery_shows_each_cards_inputs_and_captions(rendered: dict) -> None:
    page = (rendered["webdataset"]["output"] / "index.html").read_text()
    sample = page.split("<main>", 1)[1].split("</main>", 1)[0]  # the sample's cards (the score section follows)
    cards = {re.search(r"<b>([^<]+)</b>", card).group(1): card for card in sample.split('<figure class="card">')[1:]}
    assert 'class="inputs"' in cards["e-img2img"] and "image: " in cards["e-img2img"]
    assert "prior_image: " in cards["f-guided"] and "data:image/png;base64," in cards["f-guided"].split("<img")[1]
    assert "interpolate: 0.6 x &#x27;a red fox&#x27;" in cards["d-interp"] and INTERP_CAPTION in cards["d-interp"]
    assert 'class="inputs"' not in cards["c-negative"]  # nothing but text went in
    finished = re.search(r"finished (\S+): \d+ rendered", page).group(1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", finished), finished


def test_pinned_manifest_does_not_depend_on_the_working_directory(
    rendered: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    output = str(rendered["parquet"]["output"])
    pinned = json.loads(Path(output, "_dataset.json").read_text())["manifest"]
    assert pinned == rendered["manifest"] and Path(pinned).is_absolute()
    dry = ["--dry-run", "--models", rendered["models"]]
    monkeypatch.chdir(rendered["root"])
    assert cli(["render", "--manifest", "manifest.parquet", "--output", output, *dry]) == 0  # relative, same file
    monkeypatch.chdir(tmp_path)
    assert cli(["render", "--output", output, *dry]) == 0  # left out: the pinned one
    assert "0 shard(s) to render" in capsys.readouterr().out
    write_manifest(tmp_path / "manifest.parquet", [{"id": "x", "prompt": "p"}])
    assert cli(["render", "--manifest", "manifest.parquet", "--output", output, *dry]) == 2  # another file
    assert cli(["render", "--output", str(tmp_path / "new"), *dry]) == 2
    assert "--manifest is required" in capsys.readouterr().err


def test_png_previews_decode(rendered: dict) -> None:
    frame = pd.read_parquet(rendered["files"]["output"] / "results")
    previews = [p for value in frame["input_thumbnails"].dropna() for p in value if p["png"] is not None]
    assert previews and all(Image.open(io.BytesIO(p["png"])).size[0] <= 160 for p in previews)
