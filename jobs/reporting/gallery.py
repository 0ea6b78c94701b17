"""Reports under the output: a static ``index.html`` gallery of a sample of the images and a contact-sheet PNG.

Both sit at the top of the output prefix and reference images by their keys relative to it, so
they open straight from a local folder or an object store's web endpoint (no server, no script).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.reporting.scores import HISTOGRAM_FILE, extremes_html, histogram_png
from schemas.keys import CONTACT_SHEET_FILE, GALLERY_FILE, IMAGES_DIR, STATS_FILE
from schemas.loggers import logger_for
from schemas.results import STATUS_OK, THUMBNAIL_SIDE
from schemas.text import MAX_QUOTED_CHARS, clip, one_line, stored_entry, stored_id

logger = logger_for(__name__)

CELL = THUMBNAIL_SIDE  # contact sheet cell side, pixels: one preview each
COLUMNS = 8
_CONTENT_TYPE_KWARG = {"s3": "ContentType", "s3a": "ContentType", "gs": "content_type", "gcs": "content_type"}


ImagePreviews = dict[tuple[str, int], Any]


# The parameters that decided an image, as the card lists them: (results column, label).
CARD_PARAMETERS = (
    ("num_inference_steps", "steps"),
    ("guidance_scale", "guidance"),
    ("strength", "strength"),
    ("prior_num_inference_steps", "prior steps"),
    ("prior_guidance_scale", "prior guidance"),
    ("prior_strength", "prior strength"),
)


# Results columns a card shows beside the sample entry's own (markers keep a few fields per candidate).
CARD_COLUMNS = ("negative_prompt", "manifest_file", *(name for name, _ in CARD_PARAMETERS))


def read_previews(storage: Storage, rows: list[dict[str, Any]]) -> tuple[ImagePreviews, ImagePreviews, ImagePreviews]:
    """(image previews, input previews, `CARD_COLUMNS` values) of the chosen images, read from the results part
    that holds each one.

    Image previews exist for ok images; input previews (lists of ``name``, ``label``, ``png``) for
    every image a part kept as a gallery candidate (results written before they existed have none). Keyed
    by (`schemas.text.stored_id`, image_index): the ids gallery candidates keep.

    A part that is gone, or that cannot be read as the results the job writes (overwritten, truncated, another
    schema), gives no previews: its images' cards go without them, with one warning naming the file, so a
    damaged part never stops a run's report (``render --verify-parts`` finds and renders such a shard again).
    """
    wanted: dict[str, set[tuple[str, int]]] = {}
    for row in rows:
        wanted.setdefault(row["results"], set()).add((stored_id(row["id"]), row["image_index"]))
    images: ImagePreviews = {}
    inputs: ImagePreviews = {}
    details: ImagePreviews = {}
    for key, chosen in wanted.items():
        try:
            found = _part_previews(storage, key, chosen)
        except FileNotFoundError:
            continue
        except (pa.ArrowException, ValueError, TypeError, KeyError) as exc:  # ValueError: UnsafeObjectError too
            logger.warning(
                "gallery: %s cannot be read (%s: %s); its image(s) are shown without previews "
                "(render --verify-parts renders a damaged shard again)",
                key,
                type(exc).__name__,
                one_line(str(exc), 200),
            )
            continue
        images.update(found[0])
        inputs.update(found[1])
        details.update(found[2])
    return images, inputs, details


def _part_previews(
    storage: Storage, key: str, chosen: set[tuple[str, int]]
) -> tuple[ImagePreviews, ImagePreviews, ImagePreviews]:
    """`read_previews` of one results part ``key``, for its ``chosen`` images (raises what reading it raised)."""
    images: ImagePreviews = {}
    inputs: ImagePreviews = {}
    details: ImagePreviews = {}
    parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(key)))
    names = ("id", "image_index", "thumbnail", "input_thumbnails", *CARD_COLUMNS)
    columns = [c for c in names if c in parquet.schema_arrow.names]
    table = parquet.read(columns=columns)
    for entry in table.to_pylist():
        image = (stored_id(entry["id"]), entry["image_index"])
        if image in chosen:
            if entry.get("thumbnail") is not None:
                images[image] = entry["thumbnail"]
            if entry.get("input_thumbnails") is not None:
                inputs[image] = entry["input_thumbnails"]
            details[image] = {name: entry.get(name) for name in CARD_COLUMNS}
    return images, inputs, details


def read_thumbnails(storage: Storage, rows: list[dict[str, Any]]) -> ImagePreviews:
    """The image previews of the chosen ok images (`read_previews`)."""
    return read_previews(storage, [row for row in rows if row["status"] == STATUS_OK])[0]


def gallery_html(
    rows: list[dict[str, Any]],
    *,
    stats: dict[str, Any],
    num_images: int,
    thumbnails: ImagePreviews,
    inputs: ImagePreviews | None = None,
    extra: str = "",
) -> str:
    """The gallery page: one card per sampled image (its inputs, then the picture, caption, mode, seed, size,
    status); ``extra`` HTML (the score section) follows the sample."""
    output = stats.get("output", {})
    by_status = output.get("by_status", {})
    rows = [stored_entry(row) for row in rows]  # markers of older runs may hold whole row texts
    cards = "\n".join(
        _card(row, thumbnails.get((row["id"], row["image_index"])), (inputs or {}).get((row["id"], row["image_index"])))
        for row in rows
    )
    title = f"kandinsky-render: {num_images} image(s), {by_status.get('ok', 0)} ok, {by_status.get('error', 0)} error"
    last = stats.get("last_render") or {}
    if last:
        heading = (
            f"Last run that rendered: <code>{html.escape(str(last.get('run_id', '')))}</code>, finished "
            f"{html.escape(_when(last.get('finished_at')))}: {last.get('num_rendered', 0)} rendered, "
            f"{last.get('images_per_s', 0)} images/s."
        )
    else:
        heading = "No run has rendered an image yet."
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
figcaption {{ font-size: .8rem; line-height: 1.3; margin-top: .4rem; overflow-wrap: break-word; }}
.inputs {{ display: flex; flex-wrap: wrap; gap: .3rem; margin-bottom: .4rem; }}
.inputs figure {{ border: none; padding: 0; width: 4.5rem; font-size: .65rem; }}
.inputs figcaption {{ font-size: .65rem; margin-top: .1rem; }}
.status-ok {{ color: #1b6e2a; }} .status-error {{ color: #8a1c1c; font-weight: bold; }}
.prompt {{ font-style: italic; }}
</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
<p>Showing {len(rows)} of {num_images} image(s), a stable sample (errors first); click an image for its full size.
{heading}</p>
<p><a href="{CONTACT_SHEET_FILE}">contact sheet</a> · <a href="{STATS_FILE}">stats.json</a> ·
results in <code>results/*.parquet</code>, shards in <code>shards/*/*.json</code></p>
</header>
<main>
{cards}
</main>
{extra}
</body>
</html>
"""


def _when(timestamp: Any) -> str:
    """An ISO timestamp to the second (older stats.json files kept microseconds)."""
    text = str(timestamp or "")
    try:
        return dt.datetime.fromisoformat(text).isoformat(timespec="seconds")
    except ValueError:
        return text


def _inputs(previews: list[dict[str, Any]] | None, manifest: str | None = None) -> str:
    """The row's inputs, small, above its image: each with its picture (when it has one) and its label (a path
    relative to the row's manifest file when inside its folder, breakable at separators)."""
    if not previews:
        return ""
    items = []
    for entry in previews:
        picture = ""
        if entry.get("png"):
            picture = f'<img src="data:image/png;base64,{base64.b64encode(entry["png"]).decode()}" alt="">'
        label = _breakable(clip(relative_to_manifest(entry.get("label") or "", manifest), MAX_QUOTED_CHARS))
        items.append(f"<figure>{picture}<figcaption>{html.escape(entry['name'])}: {label}</figcaption></figure>")
    return f'<div class="inputs">{"".join(items)}</div>'


def relative_to_manifest(path: str, manifest: str | None) -> str:
    """``path`` relative to the folder of ``manifest`` when it lies inside it (``images/cat.png``), else as given."""
    if not manifest or "/" not in manifest:
        return path
    folder = manifest.rsplit("/", 1)[0] + "/"
    return path[len(folder) :] if path.startswith(folder) and len(path) > len(folder) else path


BREAKABLE_WORD = 24  # a word longer than this (a path, a URI) may break after its separators


def _breakable(text: str) -> str:
    """``text`` escaped for HTML, with a line-break opportunity after each path separator of its long words
    (a weight such as ``0.6`` or a short file name stays whole)."""
    return "".join(
        "".join(html.escape(part) + ("<wbr>" if part in "/_-." else "") for part in _separated(word))
        if len(word) > BREAKABLE_WORD
        else html.escape(word)
        for word in re.split(r"(\s+)", text)
    )


def _separated(text: str) -> list[str]:
    parts, current = [], ""
    for char in text:
        if char in "/_-.":
            parts += [current, char] if current else [char]
            current = ""
        else:
            current += char
    return [*parts, current] if current else parts


def _card(row: dict[str, Any], thumbnail: bytes | None, inputs: list[dict[str, Any]] | None = None) -> str:
    ok = row["status"] == STATUS_OK
    if ok:
        # The files format links the PNG itself (relative: opens from any prefix); other formats keep
        # images inside shard files, so the card shows the preview inline. onerror marks a card whose
        # image is gone (e.g. deleted objects) instead of a broken icon.
        alt = f"{html.escape(row['id'])} #{row['image_index']}"
        missing = "onerror=\"this.closest('figure').classList.add('missing')\""
        if row.get("member") is None:
            source = html.escape(_image_path(row))
            visual = f'<a href="{source}"><img src="{source}" alt="{alt}" {missing}></a>'
        else:
            source = "data:image/png;base64," + base64.b64encode(thumbnail or b"").decode()
            shard = html.escape(row["uri"].rsplit("/", 1)[-1])
            visual = f'<img src="{source}" alt="{alt}" title="full size: {shard}, member {html.escape(row["member"])}">'
    else:
        visual = f'<div class="placeholder">{html.escape(row["error_kind"] or "error")}</div>'
    size = f"{row['width']}x{row['height']}" if row.get("width") else ""
    parameters = [f"{label} {row[name]:g}" for name, label in CARD_PARAMETERS if row.get(name) is not None]
    details = [
        f"<b>{html.escape(row['id'])}</b> #{row['image_index']}",
        f'<span class="prompt">{html.escape(row.get("caption") or row["prompt"] or "")}</span>',
        f"{html.escape(row['mode'] or '')} · seed {row['seed']} {size}",
    ]
    if row.get("negative_prompt"):
        details.append(f'negative: <span class="prompt">{html.escape(row["negative_prompt"])}</span>')
    if parameters:
        details.append(html.escape(" · ".join(parameters)))
    details.append(f'<span class="status-{html.escape(row["status"])}">{html.escape(row["status"])}</span>')
    if not ok:
        details.append(html.escape(row["error"] or ""))
    elif row.get("member") is not None:
        details.append(f"<code>{html.escape(row['uri'].rsplit('/', 1)[-1])}</code>: {html.escape(row['member'])}")
    caption, above = "<br>".join(details), _inputs(inputs, row.get("manifest_file"))
    return f'<figure class="card">{above}{visual}<figcaption>{caption}</figcaption></figure>'


def _image_path(row: dict[str, Any]) -> str:
    """The files format's PNG of a candidate, relative to the output: its URI as candidates keep it (relative),
    or the ``images/...`` end of an absolute one (markers of older runs)."""
    uri = row.get("uri") or ""
    if "://" not in uri and not uri.startswith("/"):
        return uri
    tail = uri.split("/")
    start = max((k for k, name in enumerate(tail) if name == IMAGES_DIR), default=len(tail) - 1)
    return "/".join(tail[start:])


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
        data = images.get((stored_id(row["id"]), row["image_index"]))
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


def write_report(
    storage: Storage,
    rows: list[dict[str, Any]],
    *,
    stats: dict[str, Any],
    scores_summary: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``index.html`` and ``contact_sheet.png`` for the chosen sample ``rows``; returns their keys.

    With scores (``scores_summary``, the output's merged `actors.scores` summary) also
    ``score_histogram.png`` and a section with the lowest- and highest-scoring images.

    ``rows`` are the gallery's sample (`schemas.summary.Sample.chosen`); their previews come
    from the results parts that hold them. On object stores the objects get their content type, so
    a browser shows them instead of downloading them.
    """
    thumbnails, inputs, details = read_previews(storage, rows)
    rows = [{**details.get((stored_id(row["id"]), row["image_index"]), {}), **row} for row in rows]
    _write(storage, CONTACT_SHEET_FILE, contact_sheet(rows, thumbnails), content_type="image/png")
    num_images = stats.get("output", {}).get("num_images", len(rows))
    extra, keys = "", {"gallery": GALLERY_FILE, "contact_sheet": CONTACT_SHEET_FILE}
    scores = stats.get("clip_score")
    if scores and scores_summary is not None:
        extremes = [{**e, "status": STATUS_OK} for e in scores_summary["lowest"] + scores_summary["highest"]]
        threshold = scores["min_clip_score"]
        _write(
            storage, HISTOGRAM_FILE, histogram_png(scores_summary, min_clip_score=threshold), content_type="image/png"
        )
        extra = extremes_html(scores, read_thumbnails(storage, extremes))
        keys["score_histogram"] = HISTOGRAM_FILE
    page = gallery_html(rows, stats=stats, num_images=num_images, thumbnails=thumbnails, inputs=inputs, extra=extra)
    _write(storage, GALLERY_FILE, page.encode("utf-8"), content_type="text/html; charset=utf-8")
    logger.info("gallery of %d image(s) at %s", len(rows), storage.uri(GALLERY_FILE))
    return keys


def _write(storage: Storage, key: str, data: bytes, *, content_type: str) -> None:
    protocols = (storage.fs.protocol,) if isinstance(storage.fs.protocol, str) else tuple(storage.fs.protocol)
    kwarg = next((_CONTENT_TYPE_KWARG[p] for p in protocols if p in _CONTENT_TYPE_KWARG), None)
    if kwarg is None or storage.is_local:
        storage.write_bytes(key, data)
    else:
        storage.write_bytes(key, data, **{kwarg: content_type})
