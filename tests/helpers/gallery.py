"""What a finished render of the bundled example holds: its stats, its summary lines and a gallery that opens in a
headless browser (skipped, saying why, where none is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.dev.example import example_table

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def check_example_render(output: Path, shown: str, scratch: Path, *, cluster_gpus: float) -> None:
    """The example rendered whole into ``output`` on a Ray cluster of ``cluster_gpus`` GPUs; ``shown`` is what the
    job printed (progress lines, then the summary table and the gallery path); then the gallery is opened."""
    expected = sum(row.get("num_images") or 1 for row in example_table().to_pylist())
    assert f"finished: {expected}/{expected} images (100%)" in shown
    assert "summary" in shown and f"gallery: {output}/index.html" in shown
    stats = json.loads((output / "stats.json").read_text())
    assert stats["output"]["by_status"] == {"ok": expected}
    assert stats["stages"]["runner"] == "ray" and stats["stages"]["cluster_gpus"] == cluster_gpus
    assert stats["busy_seconds"]["prior"] > 0 and stats["busy_seconds"]["decoder"] > 0
    assert set(stats["versions"]) >= {"torch", "diffusers", "ray"}
    assert (output / "_SUCCESS").read_text().strip() == stats["run_id"]

    chrome = browser()
    if chrome is None:
        pytest.skip("no headless browser (chromium) installed: the gallery screenshot is not checked")
    gallery = f"file://{output}/index.html"
    flags = [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={scratch / 'browser'}", "--window-size=1280,1000"]
    shot = scratch / "gallery.png"
    subprocess.run([*flags, f"--screenshot={shot}", gallery], capture_output=True, timeout=120, check=True)
    dom = subprocess.run([*flags, "--dump-dom", gallery], capture_output=True, text=True, timeout=120, check=True)
    inputs = dom.stdout.count('alt="">')  # the rows' input previews (source, mask, hint) above their images
    assert dom.stdout.count("<img ") - inputs == expected and "card missing" not in dom.stdout
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 100  # the tiny models draw saturated noise
    assert saturated.mean() > 0.05, "the screenshot shows no rendered images"
