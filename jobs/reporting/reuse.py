"""``kandinsky-render reuse-embeddings OUTPUT MANIFEST``: a run's saved embeddings as a manifest to render again.

Each ok image saved with ``--save-embeddings`` becomes one row: ``id`` ``<id>/<image_index>``,
its ``prompt``, ``image_embeds``, ``negative_image_embeds`` and ``seed`` (so a new run can render the
same embeddings at another size, step count or guidance, set by flags; such rows skip the prior).
One manifest file is written per results part, streaming, so any output size converts in bounded
memory; the files form a manifest prefix.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.storage import Storage
from jobs.options.flags import plain
from schemas.keys import RESULTS_DIR
from schemas.results import STATUS_OK

COLUMNS = ["id", "image_index", "status", "prompt", "seed", "filtered", "image_embeds", "negative_image_embeds"]


def reuse_embeddings(
    output: str, manifest: str, *, skip_filtered: bool = False, storage_options: dict | None = None
) -> int:
    """Write the manifest prefix ``manifest`` from ``output``'s results; the number of rows written."""
    source = Storage(output, storage_options=storage_options)
    target = Storage(manifest, storage_options=storage_options)
    written = 0
    for key in source.list_files(RESULTS_DIR, suffix=".parquet"):
        table = pq.read_table(io.BytesIO(source.read_bytes(key)))
        if "image_embeds" not in table.column_names:
            continue
        table = table.select(COLUMNS)
        keep = pc.and_(pc.equal(table.column("status"), STATUS_OK), table.column("image_embeds").is_valid())
        if skip_filtered:
            keep = pc.and_(keep, pc.invert(pc.fill_null(table.column("filtered"), False)))
        table = table.filter(keep)
        if not table.num_rows:
            continue
        ids = pc.binary_join_element_wise(table.column("id"), table.column("image_index").cast(pa.string()), "/")
        rows = pa.table(
            {
                "id": ids,
                "prompt": table.column("prompt"),
                "seed": table.column("seed"),
                "image_embeds": table.column("image_embeds").cast(pa.list_(pa.float32())),
                "negative_image_embeds": table.column("negative_image_embeds").cast(pa.list_(pa.float32())),
            }
        )
        buffer = io.BytesIO()
        pq.write_table(rows, buffer)
        target.write_bytes(key.rsplit("/", 1)[-1], buffer.getvalue())
        written += rows.num_rows
    if not written:
        raise ValueError(f"{output}: no saved embeddings (render with --save-embeddings float32 or float16)")
    return written


def main(argv: list[str] | None = None) -> int:
    """The command line; exit 2 when the output holds no saved embeddings."""
    parser = argparse.ArgumentParser(
        prog="kandinsky-render reuse-embeddings", description=plain(__doc__.split("\n")[0])
    )
    parser.add_argument("output", help="output prefix of a run with --save-embeddings (fsspec URI)")
    parser.add_argument("manifest", help="manifest prefix to write (one Parquet file per results part)")
    parser.add_argument("--skip-filtered", action="store_true", help="leave out images below --min-clip-score")
    args = parser.parse_args(argv)
    from jobs.options.storage import resolve

    try:
        count = reuse_embeddings(
            args.output, args.manifest, skip_filtered=args.skip_filtered, storage_options=resolve(environ=os.environ)
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} row(s) of saved embeddings -> {args.manifest}")
    return 0
