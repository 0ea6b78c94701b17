"""Reports under the output: a static ``index.html`` gallery of a sample of the images and a contact-sheet PNG.

Both sit at the top of the output prefix and reference images by their keys relative to it, so
they open straight from a local folder or an object store's web endpoint (no server, no script).
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import logging
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from actors.storage import Storage
from schemas.keys import STATS_FILE, image_key
from schemas.results import STATUS_OK

logger = logging.getLogger(__name__)

GALLERY_FILE = "index.html"
CONTACT_SHEET_FILE = "contact_sheet.png"
SAMPLE_SIZE = 48  # images shown: enough to judge a run, small enough to load from object storage
CELL = 160  # contact sheet thumbnail side, pixels
COLUMNS = 8
_CONTENT_TYPE_KWARG = {"s3": "ContentType", "s3a": "ContentType", "gs": "content_type", "gcs": "content_type"}


def busy_seconds(results: pa.Table) -> dict[str, float]:
    """Seconds each stage spent on these results rows (sums of ``prior_seconds`` / ``decoder_seconds``)."""
    busy = {}
    for stage in ("prior", "decoder"):
        column = f"{stage}_seconds"
        total = pc.sum(results.column(column)).as_py() if column in results.column_names and results.num_rows else 0
        busy[stage] = round(total or 0.0, 3)
    return busy


def sample(final: pa.Table, *, size: int = SAMPLE_SIZE) -> list[dict[str, Any]]:
    """A stable sample of final results rows: the same output always shows the same images.

    Rows are ranked by a hash of (id, image_index), so the sample spreads over the whole manifest
    instead of showing its first rows; error rows come first (up to a quarter of the sample), as
    they are what a reader looks for. Only the chosen rows are materialised as dicts.
    """
    ids = final.column("id").to_pylist()
    indexes = final.column("image_index").to_pylist()
    ok = [status == STATUS_OK for status in final.column("status").to_pylist()]
    rank = lambda i: _digest(ids[i], indexes[i])  # noqa: E731
    errors = heapq.nsmallest(max(size // 4, 1), (i for i in range(final.num_rows) if not ok[i]), key=rank)
    oks = heapq.nsmallest(size - len(errors), (i for i in range(final.num_rows) if ok[i]), key=rank)
    chosen = sorted(errors + oks, key=lambda i: (ids[i], indexes[i]))
    columns = ["id", "image_index", "status", "error", "error_kind", "seed", "width", "height", "mode", "prompt"]
    return final.select(columns).take(pa.array(chosen, pa.int64())).to_pylist()


def _digest(row_id: str, image_index: int) -> str:
    return hashlib.sha256(f"{row_id}\x00{image_index}".encode("utf-8", "surrogatepass")).hexdigest()


def gallery_html(rows: list[dict[str, Any]], *, stats: dict[str, Any], num_images: int) -> str:
    """The gallery page: one card per sampled image (thumbnail, prompt, mode, seed, size, status)."""
    output = stats.get("output", {})
    by_status = output.get("by_status", {})
    cards = "\n".join(_card(row) for row in rows)
    title = f"kandinsky-render: {num_images} image(s), {by_status.get('ok', 0)} ok, {by_status.get('error', 0)} error"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }}
header p {{ margin: .3rem 0; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 1rem; align-items: start; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
figure img {{ width: 100%; height: auto; image-rendering: pixelated; background: #eee; display: block; }}
figure .placeholder {{ aspect-ratio: 1; background: #f3d6d6; display: flex; align-items: center;
  justify-content: center; color: #8a1c1c; font-weight: bold; }}
figure.missing img {{ display: none; }}
figure.missing figcaption::before {{ content: "image missing"; color: #8a1c1c; font-weight: bold; display: block; }}
figcaption {{ font-size: .8rem; line-height: 1.3; margin-top: .4rem; overflow-wrap: anywhere; }}
.status-ok {{ color: #1b6e2a; }} .status-error {{ color: #8a1c1c; font-weight: bold; }}
.prompt {{ font-style: italic; }}
</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<p>Showing {len(rows)} of {num_images} image(s), a stable sample (errors first).
Last run <code>{html.escape(str(stats.get("run_id", "")))}</code>,
finished {html.escape(str(stats.get("finished_at", "")))}:
{stats.get("num_rendered", 0)} rendered, {stats.get("images_per_s", 0)} images/s.</p>
<p><a href="{CONTACT_SHEET_FILE}">contact sheet</a> · <a href="{STATS_FILE}">stats.json</a> ·
results in <code>results/*.parquet</code></p>
</header>
<main>
{cards}
</main>
</body>
</html>
"""


def _card(row: dict[str, Any]) -> str:
    key = image_key(row["id"], row["image_index"])
    ok = row["status"] == STATUS_OK
    if ok:
        # onerror marks a card whose image is gone (e.g. deleted objects) instead of a broken icon.
        visual = (
            f'<img src="{html.escape(key)}" alt="{html.escape(row["id"])} #{row["image_index"]}" '
            f"onerror=\"this.closest('figure').classList.add('missing')\">"
        )
    else:
        visual = f'<div class="placeholder">{html.escape(row["error_kind"] or "error")}</div>'
    size = f"{row['width']}x{row['height']}" if row["width"] else ""
    details = [
        f"<b>{html.escape(row['id'])}</b> #{row['image_index']}",
        f'<span class="prompt">{html.escape(row["prompt"] or "")}</span>',
        f"{html.escape(row['mode'] or '')} · seed {row['seed']} {size}",
        f'<span class="status-{html.escape(row["status"])}">{html.escape(row["status"])}</span>',
    ]
    if not ok:
        details.append(html.escape(row["error"] or ""))
    return f'<figure class="card">{visual}<figcaption>{"<br>".join(details)}</figcaption></figure>'


def contact_sheet(rows: list[dict[str, Any]], images: dict[tuple[str, int], bytes | None]) -> bytes:
    """A PNG grid of the sampled images (``COLUMNS`` wide), each captioned with its id; errors in red."""
    from PIL import Image, ImageDraw

    columns = max(1, min(COLUMNS, len(rows)))
    num_rows = max(1, math.ceil(len(rows) / columns))
    caption = 14
    sheet = Image.new("RGB", (columns * CELL, num_rows * (CELL + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x, y = (n % columns) * CELL, (n // columns) * (CELL + caption)
        data = images.get((row["id"], row["image_index"]))
        if row["status"] == STATUS_OK and data:
            thumb = Image.open(io.BytesIO(data)).convert("RGB")
            scale = (CELL - 4) / max(thumb.width, thumb.height)
            # Small images are enlarged with visible pixels rather than blurred; large ones downsampled smoothly.
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))), resample)
            sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        else:
            draw.rectangle((x + 2, y + 2, x + CELL - 3, y + CELL - 3), fill=(243, 214, 214))
            draw.text((x + 8, y + CELL // 2 - 6), row["error_kind"] or "missing", fill=(138, 28, 28))
        draw.text((x + 4, y + CELL), f"{row['id'][:22]} #{row['image_index']}", fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def write_report(storage: Storage, final: pa.Table, *, stats: dict[str, Any]) -> dict[str, str]:
    """Write ``index.html`` and ``contact_sheet.png`` under the output; returns their keys.

    On object stores the objects get their content type, so a browser shows them instead of
    downloading them.
    """
    rows = sample(final)
    images: dict[tuple[str, int], bytes | None] = {}
    for row in rows:
        if row["status"] == STATUS_OK:
            try:
                images[(row["id"], row["image_index"])] = storage.read_bytes(image_key(row["id"], row["image_index"]))
            except FileNotFoundError:
                images[(row["id"], row["image_index"])] = None
    _write(storage, CONTACT_SHEET_FILE, contact_sheet(rows, images), content_type="image/png")
    page = gallery_html(rows, stats=stats, num_images=final.num_rows)
    _write(storage, GALLERY_FILE, page.encode("utf-8"), content_type="text/html; charset=utf-8")
    logger.info("gallery of %d image(s) at %s", len(rows), storage.uri(GALLERY_FILE))
    return {"gallery": GALLERY_FILE, "contact_sheet": CONTACT_SHEET_FILE}


def _write(storage: Storage, key: str, data: bytes, *, content_type: str) -> None:
    protocols = (storage.fs.protocol,) if isinstance(storage.fs.protocol, str) else tuple(storage.fs.protocol)
    kwarg = next((_CONTENT_TYPE_KWARG[p] for p in protocols if p in _CONTENT_TYPE_KWARG), None)
    if kwarg is None or storage.is_local:
        storage.write_bytes(key, data)
    else:
        storage.fs.pipe_file(storage.path(key), data, **{kwarg: content_type})
