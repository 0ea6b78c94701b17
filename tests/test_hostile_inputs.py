"""Odd objects, worker-local files, bombs, extreme seeds and huge texts cost their row at most, never the job."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from actors.inputs import ImageLoader
from actors.retry import ATTEMPTS_ENV, SECONDS_ENV, StorageUnavailableError
from actors.stage import InputError
from actors.storage import Storage
from jobs.job import run_job
from jobs.planning.run_plan import manifest_work
from jobs.reporting.results import read_results
from schemas.manifest import Limits
from schemas.results import final_results
from tests.helpers.faulty_proxy import Faults, FaultyProxy
from tests.helpers.images import png
from tests.helpers.rows import MARKERS, STEPS, config_for, write_manifest

I2I = {"mode": "img2img", "prompt": "p", "strength": 0.7, **STEPS}


def claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (what a decompression bomb's header says)."""
    data = bytearray(png(0, side=8))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


def final_by_id(output: str, **options: object) -> dict[str, dict]:
    table = final_results(read_results(Storage(output, storage_options=options or None)))
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture()
def transcoding(s3_endpoint: str) -> Iterator[FaultyProxy]:
    """A proxy in front of moto serving gzip-encoded objects decoded, as GCS decompressive transcoding does."""
    server = FaultyProxy(s3_endpoint, transcode_gzip=True).start()
    try:
        yield server
    finally:
        server.stop()


def test_objects_that_disagree_with_their_size_and_worker_files_cost_their_row(
    transcoding: FaultyProxy, s3_options: dict, tiny_models: str, tmp_path: Path
) -> None:
    """A manifest on S3: objects served decoded (their size is the compressed one) render or are their row's
    input_error; worker-local paths are refused unless --allowed-protocols opts in; --max-input-bytes holds."""
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    # no checksum stored (as GCS's and many tools' uploads): the client cannot check the decoded body against one
    fs = s3fs.S3FileSystem(**options, config_kwargs={"request_checksum_calculation": "when_required"})
    fs.pipe_file(f"{bucket}/in/gz.png", gzip.compress(png(1)), ContentEncoding="gzip")
    fs.pipe_file(f"{bucket}/in/gz-text.png", gzip.compress(b"not an image " * 40), ContentEncoding="gzip")
    fs.pipe_file(f"{bucket}/in/big.png", png(2, side=128))  # ~49 KB, above the 20 KB limit below
    local = tmp_path / "local.png"
    local.write_bytes(png(3))
    rows = [
        {"id": "ok", "prompt": "p", "seed": 1, **STEPS},
        {"id": "gz-png", **I2I, "image": f"s3://{bucket}/in/gz.png"},
        {"id": "gz-text", **I2I, "image": f"s3://{bucket}/in/gz-text.png"},
        {"id": "big", **I2I, "image": f"s3://{bucket}/in/big.png"},
        {"id": "environ", **I2I, "image": "/proc/self/environ"},
        {"id": "file-uri", **I2I, "image": f"file://{local}"},
    ]
    fs.pipe_file(f"{bucket}/in/m.parquet", Path(write_manifest(tmp_path / "m.parquet", rows)).read_bytes())
    via = {**options, "client_kwargs": {"endpoint_url": transcoding.url}}
    limits = Limits(max_input_bytes=20_000)
    output = f"s3://{bucket}/out"
    config = config_for(f"s3://{bucket}/in/m.parquet", output, tiny_models, runner="local", storage_options=via)
    run_job(dataclasses.replace(config, limits=limits))
    results = final_by_id(output, **options)
    assert fs.size(f"{bucket}/in/gz.png") != len(png(1))  # the store's size is not what a read gives
    assert results["ok"]["status"] == results["gz-png"]["status"] == "ok"
    assert results["gz-text"]["error_kind"] == "input_error" and "not a decodable image" in results["gz-text"]["error"]
    assert results["big"]["error_kind"] == "input_error" and "--max-input-bytes" in results["big"]["error"]
    for key in ("environ", "file-uri"):  # refused at planning: no worker ever opened them
        assert results[key]["error_kind"] == "invalid_row", results[key]
        assert "protocol 'file'" in results[key]["error"] and "--allowed-protocols" in results[key]["error"]

    # An explicit opt-in lets worker files through planning (the workers then read them: test_local_oddities_...).
    opted = dataclasses.replace(config, limits=Limits(max_input_bytes=20_000, allowed_protocols=("s3", "file")))
    assert {row["id"] for row in manifest_work(opted).refused.to_pylist()} == set()


def test_an_object_read_short_every_time_is_a_store_failure_not_a_row_error(
    s3_endpoint: str, s3_options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that disagree with the size and with each other (a store cutting every transfer) stop the job."""
    import s3fs

    bucket, options = s3_options["bucket"], s3_options["options"]
    # uploaded without a checksum (as many tools do): botocore cannot validate the body it gets back
    plain = s3fs.S3FileSystem(**options, config_kwargs={"request_checksum_calculation": "when_required"})
    plain.pipe_file(f"{bucket}/in/src.png", png(4))
    monkeypatch.setenv(ATTEMPTS_ENV, "2")
    monkeypatch.setenv(SECONDS_ENV, "60")
    proxy = FaultyProxy(s3_endpoint).start()
    try:  # every GET of the object cut short, at a random point, with no length to betray it
        proxy.set(Faults(rate=1.0, weights={"cut": 1.0}, applies=lambda method, path: method == "GET", seed=5))
        loader = ImageLoader(storage_options={**options, "client_kwargs": {"endpoint_url": proxy.url}})
        with pytest.raises(StorageUnavailableError, match=f"image: read s3://{bucket}/in/src.png"):
            loader.fetch({"uri": f"s3://{bucket}/in/src.png"}, column="image")
    finally:
        proxy.stop()
    assert proxy.counts["cut"] >= 4  # two reads per attempt, two attempts


def test_local_oddities_bombs_and_extreme_seeds(tmp_path: Path, tiny_models: str) -> None:
    """A local manifest: procfs, devices and pipes are their row's input_error (no retries, no hang), a bomb's
    error names --max-input-pixels, error texts hold no memory address, and the seed bound is README's."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(claiming(20_000, 10_000))  # 200 MP: above Pillow's own guard (2 x 89.5 MP) too
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"id": "procfs", **I2I, "image": "/proc/self/cmdline"},
        {"id": "device", **I2I, "image": "/dev/zero"},
        {"id": "fifo", **I2I, "image": str(fifo)},
        {"id": "corrupt", **I2I, "image": str(corrupt)},
        {"id": "bomb", **I2I, "image": str(bomb)},
        {"id": "seed-max", "prompt": "p", "seed": 2**62 - 1, **STEPS},
        {"id": "seed-over", "prompt": "p", "seed": 2**62 - 1, "num_images": 2, **STEPS},
    ]
    output = str(tmp_path / "out")
    run_job(config_for(write_manifest(tmp_path / "m.parquet", rows), output, tiny_models, runner="local"))
    results = final_by_id(output)
    expected = {
        "procfs": "not a decodable image",
        "device": "not a regular file",
        "fifo": "not a regular file",
        "corrupt": "not a decodable image",
        "bomb": "is more than 80000000 pixels, above the limit of 40000000 (--max-input-pixels)",
    }
    for key, phrase in expected.items():
        assert results[key]["error_kind"] == "input_error" and phrase in results[key]["error"], results[key]
        assert " at 0x" not in results[key]["error"]  # the same input gives the same text in every run
    assert results["seed-max"]["status"] == "ok" and results["seed-max"]["seed"] == 2**62 - 1
    assert results["seed-over"]["error_kind"] == "invalid_row"
    assert "seed=4611686018427387903 is outside [0, 2**62 - num_images]" in results["seed-over"]["error"]


def test_max_input_pixels_decides_whatever_pillows_guard_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's process-wide bomb guard (here lowered to 1000 pixels) neither refuses an image within our limit
    nor names itself instead of our limit; it is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = png(5)  # 64 x 64 = 4096 pixels: over twice the guard
    assert ImageLoader(max_pixels=40_000_000).decode(image, column="image", source="x").size == (64, 64)
    with pytest.raises(InputError, match=r"x is more than 4000 pixels, above the limit of 2000 \(--max-input-pix"):
        ImageLoader(max_pixels=2000).decode(image, column="image", source="x")
    with pytest.raises(InputError, match=r"x is 64x64 = 4096 pixels, above the limit of 4095"):
        ImageLoader(max_pixels=4095).decode(image, column="image", source="x")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_huge_row_text_leaves_markers_and_the_gallery_small(tmp_path: Path, tiny_models: str) -> None:
    """A 5 MB prompt (refused), a 200 KB id (rendered) and a 2 MB URI (refused): every marker and the gallery stay
    a few KB, error texts are bounded, the long id's image is in the gallery, the results keep the rows whole."""
    long_id = "i" * 200_000
    rows = [
        {"id": "ok", "prompt": "p", "seed": 1, **STEPS},
        {"id": "big-prompt", "prompt": "w" * 5_000_000, "seed": 2, **STEPS},
        {"id": long_id, "prompt": "p " * 2000, "seed": 3, **STEPS},
        {"id": "huge-uri", **I2I, "image": "http://" + "u" * 2_000_000},
    ]
    output = tmp_path / "out"
    run_job(config_for(write_manifest(tmp_path / "m.parquet", rows), str(output), tiny_models, runner="local"))
    markers = list(output.glob(MARKERS))
    assert markers and max(path.stat().st_size for path in markers) < 64_000
    page = (output / "index.html").read_text()
    assert len(page) < 200_000 and page.count('class="card"') == 4
    results = final_by_id(str(output))
    assert results[long_id]["status"] == "ok" and len(results["big-prompt"]["prompt"]) == 5_000_000
    assert results["big-prompt"]["error"] == "prompt is longer than 10000 characters"
    assert results["huge-uri"]["error_kind"] == "invalid_row" and len(results["huge-uri"]["error"]) < 1000
    (marker,) = [json.loads(path.read_text()) for path in markers]
    shown = {entry["id"]: entry for entry in marker["sample"]}
    assert len(shown) == 4 and long_id not in shown  # kept as its start and a digest
    (kept,) = [entry for key, entry in shown.items() if key.startswith("iii")]
    relative = kept["uri"]  # images/<part>/<key>.png, relative to the output, linked by the gallery
    image = Path(output) / relative
    assert image == Path(results[long_id]["uri"]) and f'src="{relative}"' in page and image.is_file()
