"""What the dataset ecosystem needs of the output's schemas and files, checked without a render: typed webdataset
members whatever the sample order, card features equal to what `datasets` writes, older part names, image
signatures, unpublished parts, credential-free input URIs (the rendered outputs: tests/test_datasets.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from jobs.reporting.card import feature
from schemas.results import RESULTS_SCHEMA, SAMPLE_SCHEMA


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`datasets` converts what it loads into a cache: this module's, not the user's home."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
        yield


def test_webdataset_member_types_do_not_depend_on_which_samples_come_first(tmp_path: Path) -> None:
    """`datasets` types a tar's members from its first five samples: a null there (no strength, no interpolate, no
    negative prompt) made every later sample with that value fail ("Couldn't cast array of type list<item: struct<
    image: null, prompt: string, weight: double>> to null"); the json holds no null now."""
    import datasets

    from actors.formats import WebDatasetFormat
    from actors.storage import Storage

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    base = {name: None for name in SAMPLE_SCHEMA.names} | {"image_index": 0, "run_id": "r", "mode": "text2img"}
    items = [{"prompt": "a fox", "image": None, "weight": 0.5}, {"prompt": None, "image": "a.png", "weight": 0.5}]
    later = {
        "k6": {"mode": "img2img", "image": "a.png", "strength": 0.5, "negative_prompt": "", "clip_score": 20.0},
        "k7": {"interpolate": items, "caption": "a fox (0.5) + [image a.png] (0.5)", "filtered": True},
        "k8": {"prior_strength": 0.3, "prior_image": "a.png", "prior_num_inference_steps": 2},
    }
    metas = {f"k{i}": {"prompt": "x", "caption": "x", "seed": i} for i in range(6)} | later
    writer = WebDatasetFormat(Storage(str(tmp_path / "out")), part="p", spool_dir=str(tmp_path))
    for key, meta in metas.items():
        writer.add(key, png.getvalue(), base | {"key": key, "id": key} | meta)
    tar = writer.close()
    loaded = {row["__key__"]: row["json"] for row in datasets.load_dataset("webdataset", data_files=[tar])["train"]}
    assert list(loaded) == list(metas)
    assert json.loads(loaded["k7"]["interpolate"]) == items and loaded["k7"]["filtered"] is True
    assert (loaded["k6"]["strength"], loaded["k0"]["strength"], loaded["k6"]["clip_score"]) == (0.5, -1.0, 20.0)
    assert (loaded["k6"]["negative_prompt"], loaded["k6"]["has_negative_prompt"]) == ("", True)
    assert (loaded["k0"]["negative_prompt"], loaded["k0"]["has_negative_prompt"]) == ("", False)
    assert (loaded["k8"]["prior_image"], loaded["k8"]["prior_num_inference_steps"], loaded["k0"]["image"]) == (
        "a.png",
        2,
        "",
    )


@pytest.mark.parametrize("schema", [SAMPLE_SCHEMA, RESULTS_SCHEMA], ids=["sample", "results"])
def test_card_features_are_the_ones_datasets_writes(schema: pa.Schema) -> None:
    import datasets

    ours = [feature(f.name, f.type) for f in schema]
    assert ours == datasets.Features.from_arrow_schema(schema.remove_metadata())._to_yaml_list()


def test_parts_written_before_attempt_existed_read_with_their_part_number(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from actors.storage import Storage
    from jobs.planning.output_index import read_part_results
    from schemas.shards import Part

    (tmp_path / "results").mkdir()
    old = pa.table({"id": ["a"], "image_index": pa.array([0], pa.int32()), "status": ["ok"]})
    pq.write_table(old, tmp_path / "results" / "s.retry-2.parquet")
    part = Part(
        name="s.retry-2", run_id="r", results="results/s.retry-2.parquet", data=None, num_images=1, by_status={"ok": 1}
    )
    table = read_part_results(Storage(str(tmp_path)), part, columns=["id", "attempt", "caption"])
    assert table.to_pylist() == [{"id": "a", "attempt": 2, "caption": None}]


def test_image_signatures_see_what_decides_pixels_and_only_that() -> None:
    from jobs.planning.duplicates import DuplicateImages
    from schemas.work import WORK_SCHEMA

    base = {name: None for name in WORK_SCHEMA.names} | {
        "id": "a", "image_index": 0, "seed": 1, "mode": "text2img", "prompt": "p", "has_negative_prompt": False,
        "height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 4.0, "prior_num_inference_steps": 2,
        "prior_guidance_scale": 4.0, "strength": 0.3, "prior_strength": 0.3, "prior_kind": "text", "inputs_key": "",
        "manifest_file": "m", "hint_estimated": False,
    }  # fmt: skip
    inline = {"uri": None, "data": b"png bytes"}
    variants = [
        {"id": "same-but-unused-strength", "strength": 0.9},  # text2img does not use strength
        {"id": "other-seed", "seed": 2},
        {"id": "other-negative", "negative_prompt": ""},  # "" is a negative prompt, null is none
        {"id": "inline-1", "mode": "img2img", "image": inline},
        {"id": "inline-2", "mode": "img2img", "image": inline},
        {"id": "inline-other-strength", "mode": "img2img", "image": inline, "strength": 0.5},
    ]
    table = pa.Table.from_pylist([base, *({**base, **v} for v in variants)], schema=WORK_SCHEMA)
    duplicates = DuplicateImages(num_images=10**7)  # several partitions on disk
    duplicates.add(table)
    found = duplicates.finish()
    assert found.num_images == 7 and found.num_repeated == 2
    assert sorted(found.examples) == [(("a", 0), ("same-but-unused-strength", 0)), (("inline-1", 0), ("inline-2", 0))]


def test_an_unpublished_files_part_leaves_no_metadata_for_datasets_to_read(tmp_path: Path) -> None:
    from actors.storage import Storage
    from jobs.planning.index_reader import read_index
    from jobs.publishing.orphans import delete_orphans
    from schemas.shards import data_key, image_key, shard_name

    part = shard_name("m.parquet", 0, 4)
    for key in (data_key(part, "files"), image_key(part, "a", 0), "images/ab/legacy-layout.png"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    storage = Storage(str(tmp_path))
    assert delete_orphans(storage, read_index(storage, output_format="files")) == [data_key(part, "files")]
    assert (tmp_path / image_key(part, "a", 0)).is_file() and (tmp_path / "images/ab/legacy-layout.png").is_file()


def test_recorded_input_uris_carry_no_credentials() -> None:
    from schemas.recorded import describe_input, interpolate_items

    presigned = {"uri": "https://user:token@images.example:8443/a/b.png?X-Amz-Signature=abc#part", "data": None}
    assert describe_input(presigned) == "https://images.example:8443/a/b.png"
    assert describe_input({"uri": "s3://bucket/a b.png", "data": None}) == "s3://bucket/a b.png"
    assert describe_input({"uri": None, "data": b"x"}).startswith("sha256:")
    assert interpolate_items([{"prompt": None, "image": presigned, "weight": 1.0}])[0]["image"].endswith("/a/b.png")
