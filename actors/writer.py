"""The writer: the render job's sink, off the denoising path. Decoded pixels -> PNG -> the shard's output.

The decoder hands over raw pixels and goes back to denoising; writer actors (CPU) encode each image,
add it to its shard part's output in the chosen format (`actors.formats`) and build its results
rows. ``finalize`` publishes the part: the data file whole (webdataset / parquet), then the results
Parquet; it returns a summary (counts, busy seconds, gallery candidates) from which the driver
writes the shard's marker, last. Nothing of a part is visible before its data is durable.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from actors.formats import FORMATS
from actors.images import encode_png
from actors.inputs import ImageLoader
from actors.retry import StorageUnavailableError
from actors.scores import ScoreStats
from actors.stage import describe_exception, worker_name
from actors.storage import Storage
from schemas.keys import sample_key, sample_rank
from schemas.loggers import logger_for
from schemas.manifest import DEFAULT_ALLOWED_PROTOCOLS, DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_INPUT_PIXELS
from schemas.results import (
    ERROR_WRITE,
    RECORDED_IMAGES,
    STATUS_OK,
    THUMBNAIL_SIDE,
    ResultRow,
    describe_input,
    result_from_work,
    results_table,
)
from schemas.shards import data_key, part_attempt, part_shard, results_key
from schemas.stages import TIMED_STAGES
from schemas.summary import Counts, FailedImages, PartSummary, Sample, zero_seconds
from schemas.text import stored_entry
from schemas.work import binary_views, embeds_array, embeds_numpy, from_ipc

logger = logger_for(__name__)

_CANDIDATE_FIELDS = ("id", "image_index", "status", "error", "error_kind", "seed", "width", "height", "mode")
_CANDIDATE_FIELDS += ("prompt", "caption")


def thumbnail(pixels: np.ndarray) -> bytes:
    """A PNG preview at most `THUMBNAIL_SIDE` pixels on its longer side (smaller images as they are)."""
    return preview(Image.fromarray(pixels, mode="RGB"))


def preview(image: Image.Image) -> bytes:
    """``image`` as a PNG at most `THUMBNAIL_SIDE` pixels on its longer side (RGB, or L for masks)."""
    image = image.convert("L" if image.mode in ("L", "1", "I", "I;16", "F") else "RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def input_previews(row: dict[str, Any], loader: ImageLoader) -> list[dict[str, Any]]:
    """Previews of a work row's inputs for the gallery: ``name`` (manifest column), ``label``, ``png``.

    An input that cannot be loaded keeps its label, with the reason, and no picture; interpolation
    items are labelled with their weight (text items have no picture).
    """
    found = []

    def add(name: str, ref: dict[str, Any] | None, label: str) -> None:
        png = None
        if ref is not None:
            try:
                png = preview(loader.load(ref, column=name))
            except Exception as exc:  # noqa: BLE001 - a preview is optional; the card says why it is missing
                label = f"{label} (no preview: {describe_exception(exc)})"
        found.append({"name": name, "label": label, "png": png})

    for name in RECORDED_IMAGES:
        ref = row.get(name)
        if ref is not None:
            add(name, ref, describe_input(ref, estimated=name == "hint" and bool(row.get("hint_estimated"))) or "")
    for item in row.get("interpolate") or ():
        text = item.get("prompt")
        label = f"{item.get('weight', 0.0):g} x " + (repr(text) if text is not None else describe_input(item["image"]))
        add("interpolate", None if text is not None else item.get("image"), label)
    return found


@dataclass(eq=False, kw_only=True)
class _Part:
    name: str
    shard: str
    output: Any  # an `actors.formats` writer
    results: list[ResultRow] = field(default_factory=list)
    sample: Sample = field(default_factory=Sample)  # gallery candidates: results rows, ok ones with a preview
    scores: ScoreStats = field(default_factory=lambda: ScoreStats())
    embeddings: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # --save-embeddings: (2, D)


class ShardWriter:
    """Sink of the render job (see the module docstring): ``add(part, table)``, ``finalize(part, args)``.

    ``table`` rows are the decoder's output (`schemas.work.DECODED_FIELDS` on work rows); a row with
    an ``error`` becomes an error result. A PNG that cannot be written (files format) is a
    ``write_failed`` row; the other images of the part are unaffected.
    """

    def __init__(
        self,
        *,
        output: str,
        output_format: str,
        run_id: str,
        storage_options: dict[str, Any] | None = None,
        spool_dir: str | None = None,
        save_embeddings: str | None = None,
        min_clip_score: float | None = None,
        allowed_protocols: tuple[str, ...] = DEFAULT_ALLOWED_PROTOCOLS,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES,
        model_ids: dict[str, str] | None = None,
        dtype: str | None = None,
        worker: str = "",
    ) -> None:
        if output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {sorted(FORMATS)}, got {output_format!r}")
        self.storage = Storage(output, storage_options=storage_options)
        # The gallery's candidates show previews of their inputs, read again here (a few per part).
        self.loader = ImageLoader(
            storage_options=storage_options,
            allowed_protocols=allowed_protocols,
            max_pixels=max_input_pixels,
            max_bytes=max_input_bytes,
        )
        self.output_format = output_format
        self.run_id = run_id
        self.spool_dir = spool_dir
        self.embeddings_dtype = None if save_embeddings is None else np.dtype(save_embeddings)
        self.min_clip_score = min_clip_score
        self.model_ids = dict(model_ids or {})  # checkpoint name -> "name@content id": each result row names them
        self.dtype = dtype
        self.worker = worker_name(worker)
        self.parts: dict[str, _Part] = {}

    def _part(self, name: str) -> _Part:
        part = self.parts.get(name)
        if part is None:
            output = FORMATS[self.output_format](self.storage, part=name, spool_dir=self.spool_dir)
            part = self.parts[name] = _Part(name=name, shard=part_shard(name), output=output)
        return part

    def add(self, name: str, table: pa.Table) -> dict[str, int]:
        """Encode and add the decoded images of one batch to part ``name``; counts of rows and errors."""
        part = self._part(name)
        pixels = binary_views(table.column("pixels"))  # views of the table's memory, not copies
        keep = [c for c in table.column_names if c not in ("pixels", "image_embeds", "negative_image_embeds")]
        embeds = None
        if self.embeddings_dtype is not None:
            embeds = np.stack([embeds_numpy(table.column(c)) for c in ("image_embeds", "negative_image_embeds")], 1)
            embeds = embeds.astype(self.embeddings_dtype)  # (rows, 2, D)
        errors = 0
        for i, row in enumerate(table.select(keep).to_pylist()):
            result = self._result(part, row, pixels[i], None if embeds is None else embeds[i])
            errors += result.status != STATUS_OK
        return {"rows": table.num_rows, "errors": errors}

    def _result(
        self, part: _Part, row: dict[str, Any], buffer: np.ndarray | None, embeddings: np.ndarray | None = None
    ) -> ResultRow:
        common = {"run_id": self.run_id, "shard": part.shard, "attempt": part_attempt(part.name)}
        common |= {"model_ids": self.model_ids, "dtype": self.dtype}
        if row["error"] is not None or buffer is None:
            result = result_from_work(row, error=row["error"], error_kind=row["error_kind"], **common)
            self._consider(part, result, row, None)
            part.results.append(result)
            return result
        height, width = row["pixel_height"], row["pixel_width"]
        pixels = buffer.reshape(height, width, 3)
        key = sample_key(row["id"], row["image_index"])
        score = row.get("clip_score")
        filtered = None if score is None or self.min_clip_score is None else score < self.min_clip_score
        result = result_from_work(row, width=width, height=height, filtered=filtered, **common)
        try:
            uri, member = part.output.add(key, encode_png(pixels), result.sample_meta(key), embeddings)
        except StorageUnavailableError:
            raise  # the store is down, not this image: the shard fails whole and a rerun renders it
        except Exception as exc:
            message = f"writing the image failed: {describe_exception(exc)}"
            result = result_from_work(row, error=message, error_kind=ERROR_WRITE, **common)
        else:
            result = dataclasses.replace(result, uri=uri, member=member)
            if embeddings is not None:
                part.embeddings[(result.id, result.image_index)] = embeddings
            if score is not None:
                part.scores.add(result, lambda: thumbnail(pixels))
        self._consider(part, result, row, pixels)
        part.results.append(result)
        return result

    def _consider(self, part: _Part, result: ResultRow, row: dict[str, Any], pixels: np.ndarray | None) -> None:
        """Keep ``result`` if it ranks among the part's gallery candidates, with previews of the image (ok
        images) and of its inputs."""
        ok, rank = result.status == STATUS_OK, sample_rank(result.id, result.image_index)
        if not part.sample.wants(ok=ok, rank=rank):
            return
        result = dataclasses.replace(
            result,
            thumbnail=thumbnail(pixels) if ok and pixels is not None else None,
            input_thumbnails=input_previews(row, self.loader),
        )
        part.sample.add(key=(result.id, result.image_index), ok=ok, rank=rank, entry=result)

    def finalize(self, name: str, args: dict[str, Any] | None = None) -> PartSummary:
        """Publish part ``name`` (data file, then results) and summarise it for the shard's marker.

        ``args``: ``refused`` (Arrow IPC of the part's rows refused at planning: error results).
        """
        part = self._part(name)
        refused = (args or {}).get("refused")
        if refused:
            for row in from_ipc(refused).to_pylist():
                self._result(part, row | {"pixel_height": None, "pixel_width": None}, None)
        try:
            data = data_key(name, self.output_format)
            local = part.output.close()
            sizes = {"data_size": os.path.getsize(local)}
            self.storage.put_file(data, local)
            kept = {(r.id, r.image_index): r for r in part.sample.entries()}
            thumbnails = {key: r.thumbnail for key, r in kept.items()} | part.scores.thumbnails()
            rows = sorted(part.results, key=lambda r: (r.id, r.image_index))
            rows = [
                dataclasses.replace(
                    r,
                    thumbnail=thumbnails.get((r.id, r.image_index)),
                    input_thumbnails=getattr(kept.get((r.id, r.image_index)), "input_thumbnails", None),
                )
                for r in rows
            ]
            buffer = io.BytesIO()
            pq.write_table(self._table(rows, part), buffer, compression="zstd")
            self.storage.write_bytes(results_key(name), buffer.getvalue())
            sizes["results_size"] = buffer.getbuffer().nbytes
        finally:
            part.output.abandon()
            del self.parts[name]
        return self._summary(part, data, rows, sizes=sizes)

    def _table(self, rows: list[ResultRow], part: _Part) -> pa.Table:
        """The part's results table, with the embedding columns (fixed-size lists) under ``--save-embeddings``."""
        table = results_table(rows)
        if self.embeddings_dtype is None:
            return table
        found = [part.embeddings.get((r.id, r.image_index)) for r in rows]
        dim = next((e.shape[1] for e in found if e is not None), 0)
        present = np.array([e is not None for e in found], dtype=bool)
        values = np.zeros((len(rows), 2, dim), self.embeddings_dtype)
        for i in np.flatnonzero(present):
            values[i] = found[i]
        for k, name in enumerate(("image_embeds", "negative_image_embeds")):
            column = embeds_array(values[:, k], num_rows=len(rows), dim=dim, valid=present, dtype=self.embeddings_dtype)
            table = table.append_column(pa.field(name, column.type), column)
        return table

    def _summary(self, part: _Part, data: str | None, rows: list[ResultRow], *, sizes: dict[str, int]) -> PartSummary:
        counts, failed = Counts(), FailedImages()
        busy, ok_busy = zero_seconds(), zero_seconds(with_images=True)
        for r in rows:
            counts.count(status=r.status, mode=r.mode, error_kind=r.error_kind)
            if r.status != STATUS_OK:
                failed.add(r.error_kind, (r.id, r.image_index))
            timed = r.status == STATUS_OK and r.prior_seconds is not None and r.decoder_seconds is not None
            for stage in TIMED_STAGES:
                seconds = getattr(r, f"{stage}_seconds") or 0.0
                busy[stage] += seconds
                ok_busy[stage] += seconds if timed else 0.0
            ok_busy["images"] += timed
        results = results_key(part.name)
        sample = [
            stored_entry(
                {name: getattr(r, name) for name in _CANDIDATE_FIELDS}
                | {"rank": sample_rank(r.id, r.image_index), "uri": r.uri, "member": r.member, "results": results}
            )
            for r in part.sample.entries()
        ]
        return PartSummary(
            part=part.name,
            shard=part.shard,
            run_id=self.run_id,
            results=results,
            data=data,
            counts=counts,
            busy_seconds=busy,
            ok_busy_seconds=ok_busy,
            scores=part.scores.summary(results),
            sample=tuple(sample),
            failed=failed.as_dict(),
            **sizes,
        )

    def abandon(self, name: str) -> None:
        """Drop part ``name`` (its task runs again elsewhere): nothing of it was published."""
        part = self.parts.pop(name, None)
        if part is not None:
            part.output.abandon()
