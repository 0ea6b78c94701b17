"""The CLIP score report: the clip_score section of stats.json, a histogram PNG, the extreme-scoring images."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from schemas.keys import HISTOGRAM_FILE
from schemas.results import SCORE_BIN_WIDTH, SCORE_BINS
from schemas.text import stored_entry


def score_stats(scores: dict[str, Any], *, min_clip_score: float | None) -> dict[str, Any] | None:
    """stats.json's view of the output's merged score summary (None when nothing was scored)."""
    if not scores.get("count"):
        return None
    return {
        "count": scores["count"],
        "mean": round(scores["sum"] / scores["count"], 4),
        "min": round(scores["min"], 4),
        "max": round(scores["max"], 4),
        "histogram": {
            f"{k * SCORE_BIN_WIDTH}-{(k + 1) * SCORE_BIN_WIDTH}": n for k, n in enumerate(scores["histogram"])
        },
        "min_clip_score": min_clip_score,
        "num_filtered": scores["num_filtered"],
        "lowest": [_brief(e) for e in scores["lowest"]],
        "highest": [_brief(e) for e in scores["highest"]],
    }


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("id", "image_index", "clip_score", "prompt", "uri", "member")}


def histogram_png(scores: dict[str, Any], *, min_clip_score: float | None = None) -> bytes:
    """A bar chart of the score histogram (bins of 5 points over 0..100), the filter threshold in red."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 260, 30
    counts = scores["histogram"]
    top = max(counts) or 1
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    bar = (width - 2 * margin) / SCORE_BINS
    for k, count in enumerate(counts):
        x0 = margin + k * bar
        y0 = height - margin - (height - 2 * margin) * count / top
        draw.rectangle((x0 + 1, y0, x0 + bar - 1, height - margin), fill=(70, 110, 180))
        if count:
            draw.text((x0 + 2, y0 - 12), str(count), fill=(0, 0, 0))
    for k in range(0, SCORE_BINS + 1, 4):
        draw.text((margin + k * bar - 6, height - margin + 4), str(k * SCORE_BIN_WIDTH), fill=(0, 0, 0))
    if min_clip_score is not None:
        x = margin + min_clip_score / SCORE_BIN_WIDTH * bar
        draw.line((x, margin, x, height - margin), fill=(200, 30, 30), width=2)
    draw.text(
        (margin, 8),
        f"CLIP score of {scores['count']} image(s), mean {scores['sum'] / scores['count']:.2f}",
        fill=(0, 0, 0),
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def extremes_html(stats: dict[str, Any], thumbnails: dict[tuple[str, int], bytes | None]) -> str:
    """The gallery's score section: the histogram and the lowest- and highest-scoring images, with previews."""
    parts = [
        f'<h2>CLIP scores</h2><p><img src="{HISTOGRAM_FILE}" alt="score histogram"></p>',
        f"<p>{stats['count']} scored, mean {stats['mean']}, min {stats['min']}, max {stats['max']}"
        + (
            f"; {stats['num_filtered']} below {stats['min_clip_score']} (filtered)"
            if stats["min_clip_score"] is not None
            else ""
        )
        + "</p>",
    ]
    for title, entries in (("lowest scores", stats["lowest"]), ("highest scores", stats["highest"])):
        cards = []
        for entry in map(stored_entry, entries):  # stats of older runs may hold whole row texts
            data = thumbnails.get((entry["id"], entry["image_index"])) or b""
            source = "data:image/png;base64," + base64.b64encode(data).decode()
            cards.append(
                f'<figure class="card"><img src="{source}" alt="{html.escape(entry["id"])}"><figcaption>'
                f"<b>{html.escape(entry['id'])}</b> #{entry['image_index']} · score {entry['clip_score']:.2f}<br>"
                f'<span class="prompt">{html.escape(entry["prompt"] or "")}</span></figcaption></figure>'
            )
        parts.append(f"<h3>{title}</h3><main>{''.join(cards)}</main>")
    return "\n".join(parts)
