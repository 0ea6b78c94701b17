"""Reports: the gallery and contact sheet, busy time per stage, calibration, and --dry-run without models."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.storage import Storage
from actors.writer import ShardWriter
from jobs.planning.calibration import (
    DEFAULT_CALIBRATION,
    ESTIMATED_FLOORS,
    Profile,
    estimate,
    load_calibration,
    unit_totals,
)
from jobs.reporting.calibrate import fit_profile
from jobs.reporting.gallery import CELL, write_report
from schemas.keys import sample_rank
from schemas.results import SAMPLE_ERRORS, SAMPLE_SIZE, THUMBNAIL_SIDE, result_from_work, results_table
from schemas.summary import Sample
from tests.helpers.cli import clean_env
from tests.helpers.places import REPO
from tests.helpers.rows import write_manifest


def work_row(row_id: str, image_index: int = 0, **overrides: object) -> dict:
    row = {
        "id": row_id,
        "image_index": image_index,
        "seed": 7 + image_index,
        "mode": "text2img",
        "prompt": f"prompt of {row_id}",
        "negative_prompt": None,
        "num_inference_steps": 10,
        "guidance_scale": 4.0,
        "prior_num_inference_steps": 5,
        "prior_guidance_scale": 4.0,
        "strength": 0.3,
        "manifest_file": "m.parquet",
        "prior_seconds": 0.25,
        "height": 64,
        "width": 64,
    }
    row.update(overrides)
    return row


def decoded(rows: list[dict], *, errors: dict[str, str] | None = None) -> pa.Table:
    """What the decoder hands the writers for ``rows``: flat-grey pixels per ok row, or the row's error."""
    pixels, heights, widths, error, kinds = [], [], [], [], []
    for n, row in enumerate(rows):
        message = (errors or {}).get(row["id"])
        error.append(message)
        kinds.append("invalid_row" if message else None)
        if message:
            pixels.append(None), heights.append(None), widths.append(None)
            continue
        values = np.full((row["height"], row["width"], 3), (n * 40) % 255, dtype=np.uint8)
        pixels.append(values.tobytes()), heights.append(row["height"]), widths.append(row["width"])
    columns = {name: [row.get(name) for row in rows] for name in rows[0]}
    columns.update(error=error, error_kind=kinds, pixels=pixels, pixel_height=heights, pixel_width=widths,
                   decoder_seconds=[1.5] * len(rows), decoder_worker=["w"] * len(rows))  # fmt: skip
    return pa.table(columns)


def publish(root: Path, rows: list[dict], *, output_format: str = "files", **kwargs: object) -> Sample:
    """Render ``rows`` through a real writer as one shard part and return the gallery candidates of its marker."""
    writer = ShardWriter(output=str(root), output_format=output_format, run_id="run-1")
    writer.add("shard-a", decoded(rows, **kwargs))
    summary = writer.finalize("shard-a")
    return Sample(summary.sample)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        if tag == "a":
            self.links.append(values["href"] or "")


def test_gallery_and_contact_sheet_work_from_the_output_folder(tmp_path: Path) -> None:
    rows = [work_row("fox"), work_row("cats", 0), work_row("cats", 1), work_row("wide", width=128)]
    rows.append(work_row("bad <script>alert(1)</script>", prompt="<b>not bold</b> & co"))
    candidates = publish(tmp_path, rows, errors={"bad <script>alert(1)</script>": "height=7 is too small"})
    stats = {"run_id": "run-1", "output": {"by_status": {"ok": 4, "error": 1}, "num_images": 5}}
    keys = write_report(Storage(str(tmp_path)), candidates.chosen(), stats=stats)
    assert keys == {"gallery": "index.html", "contact_sheet": "contact_sheet.png"}

    page = (tmp_path / "index.html").read_text()
    links = Links()
    links.feed(page)
    assert len(links.images) == 4  # one per ok image; the error row gets a placeholder card
    for src in links.images + links.links:
        assert "://" not in src and not src.startswith("/"), src  # relative: opens from any prefix
    for src in links.images:
        assert (tmp_path / src).is_file()
    assert set(links.links) == {"contact_sheet.png", "stats.json", *links.images}  # each image opens full size
    assert "<script>alert" not in page and "&lt;b&gt;not bold&lt;/b&gt; &amp; co" in page
    assert "height=7 is too small" in page and "invalid_row" in page
    for text in ("prompt of fox", "seed 7", "seed 8", "128x64", "text2img", "status-ok", "status-error"):
        assert text in page, text
    assert "steps " in page and "guidance " in page  # the parameters that decided each image, from its results
    assert "No run has rendered an image yet." in page  # these stats name no run that rendered (no last_render)

    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.width == 5 * CELL  # 5 sampled images, one row
    # Each cell shows its own image (flat greys here) or, for the error row, a pink placeholder.
    pixels = np.asarray(sheet.convert("RGB"))
    centers = [tuple(int(v) for v in pixels[CELL // 2, CELL * i + CELL // 2]) for i in range(5)]
    assert (243, 214, 214) in centers and len(set(centers)) == 5


def test_gallery_of_a_sharded_format_shows_previews_inline(tmp_path: Path) -> None:
    rows = [work_row(f"img-{i}", height=256, width=256) for i in range(3)]
    candidates = publish(tmp_path, rows, output_format="webdataset")
    write_report(Storage(str(tmp_path)), candidates.chosen(), stats={"output": {"num_images": 3}})
    links = Links()
    links.feed((tmp_path / "index.html").read_text())
    assert len(links.images) == 3 and all(src.startswith("data:image/png;base64,") for src in links.images)
    import base64

    preview = Image.open(io.BytesIO(base64.b64decode(links.images[0].split(",", 1)[1])))
    assert max(preview.size) == THUMBNAIL_SIDE  # a preview, not the 256x256 image
    assert not (tmp_path / "images").exists() and (tmp_path / "data" / "shard-a.tar").is_file()


def test_sample_merged_shard_by_shard_equals_ranking_everything() -> None:
    """Each shard keeps its lowest ranks; merging them gives the sample a ranking of every image would."""
    entries = [
        {"id": f"row-{i:03d}", "image_index": 0, "status": "error" if i % 10 == 0 else "ok",
         "rank": sample_rank(f"row-{i:03d}", 0)}
        for i in range(300)
    ]  # fmt: skip
    everything = Sample(entries)
    merged = Sample()
    for shard in range(10):  # each shard's writer keeps its own lowest ranks, as a marker's sample does
        own = Sample(entries[shard::10])
        merged.add_entries(own.entries())
    chosen = merged.chosen()
    assert chosen == everything.chosen()
    assert len(chosen) == SAMPLE_SIZE and sum(e["status"] == "error" for e in chosen) == SAMPLE_ERRORS
    oks = sorted((e for e in entries if e["status"] == "ok"), key=lambda e: e["rank"])[: SAMPLE_SIZE - SAMPLE_ERRORS]
    assert {e["id"] for e in chosen if e["status"] == "ok"} == {e["id"] for e in oks}
    assert [e["id"] for e in chosen] == sorted(e["id"] for e in chosen)


def test_calibration_fit_recovers_known_costs_and_estimates_plans() -> None:
    truth = Profile(
        name="t",
        prior_step_seconds=0.01,
        decoder_step_seconds=0.05,
        decoder_image_seconds=0.2,
        measured=True,
        source="",
        **dict.fromkeys(ESTIMATED_FLOORS, 0.0),  # the FLOP terms alone; the floors' fit is the next test
    )
    rows = []
    for i, (steps, side, guidance) in enumerate([(10, 512, 4.0), (50, 512, 4.0), (20, 1024, 1.0), (30, 768, 6.0)]):
        scale = side * side / 512**2
        decoder = (
            steps * (1.0 if guidance > 1 else 0.5) * truth.decoder_step_seconds + truth.decoder_image_seconds
        ) * scale
        row = work_row(f"r{i}", num_inference_steps=steps, height=side, width=side, guidance_scale=guidance)
        row["prior_seconds"] = row["prior_num_inference_steps"] * truth.prior_step_seconds
        rows.append(result_from_work(row, run_id="r", uri="x", width=side, height=side, decoder_seconds=decoder))
    fitted = fit_profile(results_table(rows), name="fit", source="synthetic")
    assert fitted.prior_step_seconds == pytest.approx(0.01)
    assert fitted.decoder_step_seconds == pytest.approx(0.05)
    assert fitted.decoder_image_seconds == pytest.approx(0.2)

    batch = pa.Table.from_pylist([work_row("x", num_inference_steps=100), work_row("y", num_inference_steps=100)])
    seconds = estimate(unit_totals(batch), truth)
    scale = 64 * 64 / 512**2
    assert seconds["prior"] == pytest.approx(2 * 5 * 0.01)
    assert seconds["decoder"] == pytest.approx(2 * (100 * 0.05 + 0.2) * scale)
    img2img = pa.Table.from_pylist([work_row("z", mode="img2img", num_inference_steps=100, strength=0.3)])
    assert estimate(unit_totals(img2img), truth)["decoder"] == pytest.approx(
        (30 * 0.05 + 0.2) * scale
    )  # 30 of 100 steps run
    with pytest.raises(ValueError, match="no ok results rows"):
        fit_profile(results_table([]), name="x", source="")


def test_calibration_fits_the_floors_of_a_run_whose_rows_vary_in_size_and_steps() -> None:
    """Each row's decoder seconds: its FLOP terms plus its share of its call's floors (per step and per call, shared
    by the run's batch of 8): with rows that vary in size and steps the fit recovers all four."""
    batch, step, image, fixed_step, call = 8, 0.05, 0.2, 0.016, 0.024
    rows = []
    for i, (steps, side) in enumerate([(10, 512), (50, 256), (20, 1024), (30, 768), (40, 128), (25, 640)]):
        scale = side * side / 512**2
        decoder = (steps * step + image) * scale + (steps * fixed_step + call) / batch
        row = work_row(f"r{i}", num_inference_steps=steps, height=side, width=side)
        row["prior_seconds"] = 0.1
        rows.append(result_from_work(row, run_id="r", uri="x", width=side, height=side, decoder_seconds=decoder))
    fitted = fit_profile(results_table(rows), name="fit", source="synthetic", batch_size=batch)
    assert fitted.floors_measured
    assert (fitted.decoder_step_seconds, fitted.decoder_image_seconds) == (pytest.approx(step), pytest.approx(image))
    assert fitted.decoder_fixed_step_seconds == pytest.approx(fixed_step)
    assert fitted.decoder_call_seconds == pytest.approx(call)
    unknown = fit_profile(results_table(rows), name="fit", source="synthetic")  # no batch size: floors estimated
    assert not unknown.floors_measured and unknown.decoder_call_seconds == ESTIMATED_FLOORS["decoder_call_seconds"]


def test_stored_calibration_loads_and_says_what_was_measured(tmp_path: Path) -> None:
    profiles = {profile.name: profile for profile in load_calibration(DEFAULT_CALIBRATION)}
    assert profiles["cpu-tiny"].measured is True
    assert set(profiles) == {"cpu-tiny"}  # GPU types: estimated from FLOP counts, nothing stored until measured
    (tmp_path / "bad.yaml").write_text("profiles:\n  X: {prior_step_seconds: 1}\n")
    with pytest.raises(ValueError, match="profile 'X'"):
        load_calibration(str(tmp_path / "bad.yaml"))


def test_dry_run_plans_without_models_or_writes(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "m.parquet",
        [
            {"id": "a", "prompt": "p", "height": 64, "width": 64, "num_images": 3},
            {"id": "b", "prompt": "p", "height": 64, "width": 64},
            {"id": "c", "prompt": "p", "height": 128, "width": 64},
            {"id": "d", "prompt": "p", "mode": "inpaint"},  # no image and mask: refused
            {"id": "e", "prompt": None},  # no prompt: refused
        ],
    )
    output = tmp_path / "out"
    script = (
        "import sys; from jobs.render import main; "
        f"code = main(['--manifest', {manifest!r}, '--output', {str(output)!r}, '--models', '/does/not/exist', "
        "'--dry-run', '--batch-size', '2']); "
        "loaded = sorted({'torch', 'diffusers', 'transformers'} & {m.split('.')[0] for m in sys.modules}); "
        "print('LOADED', loaded); sys.exit(code)"
    )
    env = clean_env()
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env)
    # The plan is printed; the run would stop before any model, for lack of them: exit 2, naming them.
    assert proc.returncode == 2 and "/does/not/exist/prior does not exist" in proc.stderr, proc.stderr
    assert "LOADED []" in proc.stdout
    table = {
        " ".join(match.group(1).split()): (int(match.group(2)), int(match.group(3)))
        for match in re.finditer(r"^\s+(text2img\s+\S+|refused \(\w+\)|to render)\s+(\d+)\s+(\d+)$", proc.stdout, re.M)
    }
    assert table["text2img 64x64"] == (2, 4)
    assert table["text2img 128x64"] == (1, 1)
    assert table["refused (invalid_row)"] == (2, 2)
    assert table["to render"] == (3, 5)
    assert "model calls per stage (decoder batch size 2, prior batch size 4): prior 2, decoder 3" in proc.stdout
    assert re.search(r"^\s+H100\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+estimated \(40% of peak\)$", proc.stdout, re.M)
    assert not output.exists()


def test_report_png_decodes(tmp_path: Path) -> None:
    write_report(Storage(str(tmp_path)), publish(tmp_path, [work_row("only")]).chosen(), stats={})
    data = (tmp_path / "contact_sheet.png").read_bytes()
    assert Image.open(io.BytesIO(data)).size == (CELL, CELL + 14)
