"""The output's dataset card (``README.md``): what Hugging Face `datasets` (and the Hub) read the output with.

Its YAML ``configs`` point the ``default`` config at the images (the format's data files) and keep the
results apart; ``dataset_info`` declares every column's type, so ``load_dataset(OUTPUT)`` reads typed
features from the first sample on whatever the nulls (inferring them from the first samples fails on a
null ``negative_prompt``). What `datasets` 5.x does with each format (checked by tests/test_datasets.py):

- webdataset: the card's features are used; ``json`` is a struct, ``png`` an Image, ``txt`` the caption.
- parquet: the card's features are used (``png`` bytes cast to an Image); ``results`` is a config too.
- files: imagefolder reads each part's ``metadata.parquet`` beside its PNGs (``png_file_name`` -> ``png``)
  and takes the types from it (the card's features are informative).

One builder serves every config of a folder (the first config's format: huggingface/datasets#7101),
so the results are a config only for the parquet format; ``load_dataset(OUTPUT, data_dir="results")``
reads them for every format.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import yaml

from actors.storage import Storage
from schemas.keys import CARD_FILE, IMAGES_DIR, RESULTS_DIR
from schemas.pinned import PixelSettings
from schemas.results import RESULTS_SCHEMA, SAMPLE_SCHEMA, WEBDATASET_JSON_SCHEMA
from schemas.shards import DATA_DIR, FORMAT_FILES, FORMAT_PARQUET, FORMAT_WEBDATASET, IMAGES_METADATA, DatasetSettings
from schemas.text import markdown_cell, markdown_code, public_uri

IMAGE = "image"  # a `datasets.Image` feature
_DTYPES = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool"}


def dtype_name(kind: pa.DataType) -> str:
    """The `datasets` dtype name of a primitive Arrow type (``int32``, ``string``, ``timestamp[us, tz=UTC]``...)."""
    return _DTYPES.get(kind, str(kind))


def feature(name: str, kind: pa.DataType | str) -> dict[str, Any]:
    """One entry of a card's ``features`` list (the YAML form `datasets` writes): Arrow ``kind``, or `IMAGE`."""
    if kind == IMAGE:
        return {"name": name, "dtype": IMAGE}
    assert isinstance(kind, pa.DataType)
    if pa.types.is_struct(kind):
        return {"name": name, "struct": [feature(f.name, f.type) for f in kind]}
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        value = kind.value_type
        entry: dict[str, Any] = {"name": name}
        entry["list"] = [feature(f.name, f.type) for f in value] if pa.types.is_struct(value) else dtype_name(value)
        if pa.types.is_fixed_size_list(kind):
            entry["length"] = kind.list_size
        return entry
    return {"name": name, "dtype": dtype_name(kind)}


def embedding_fields(embeddings: tuple[str, int] | None) -> list[pa.Field]:
    """The fixed-size list columns ``--save-embeddings`` adds: ((dtype name, dim) or None)."""
    if embeddings is None:
        return []
    value = pa.from_numpy_dtype(embeddings[0])
    return [pa.field(name, pa.list_(value, embeddings[1])) for name in ("image_embeds", "negative_image_embeds")]


def image_features(output_format: str, embeddings: tuple[str, int] | None) -> list[dict[str, Any]]:
    """The ``default`` config's features: each image with its metadata, as `datasets` yields them for the format."""
    metadata = [feature(f.name, f.type) for f in SAMPLE_SCHEMA]
    extra = [feature(f.name, f.type) for f in embedding_fields(embeddings)]
    if output_format == FORMAT_WEBDATASET:
        features = [{"name": "json", "struct": [feature(f.name, f.type) for f in WEBDATASET_JSON_SCHEMA]}]
        if embeddings is not None:  # <key>.npy: image_embeds and negative_image_embeds, (2, dim)
            dtype, dim = embeddings
            features.append({"name": "npy", "dtype": {"array2_d": {"shape": [2, dim], "dtype": dtype}}})
        features += [feature("png", IMAGE), feature("txt", pa.string())]
        return features + [feature("__key__", pa.string()), feature("__url__", pa.string())]
    if output_format == FORMAT_FILES:  # imagefolder: the image first, then the metadata file's other columns
        return [feature("png", IMAGE), *metadata, *extra]
    return [*metadata, feature("png", IMAGE), *extra]


def results_features(embeddings: tuple[str, int] | None) -> list[dict[str, Any]]:
    """The ``results`` config's features (`RESULTS_SCHEMA`, and the embeddings with ``--save-embeddings``)."""
    return [feature(f.name, f.type) for f in (*RESULTS_SCHEMA, *embedding_fields(embeddings))]


def data_files(output_format: str) -> list[str]:
    """The ``default`` config's file patterns: the images and their metadata (never results, stats, reports)."""
    if output_format == FORMAT_FILES:
        return [f"{IMAGES_DIR}/*/*.png", f"{IMAGES_DIR}/*/{IMAGES_METADATA}"]
    return [f"{DATA_DIR}/*{'.tar' if output_format == FORMAT_WEBDATASET else '.parquet'}"]


def card_metadata(output_format: str, embeddings: tuple[str, int] | None) -> dict[str, Any]:
    """The card's YAML header: ``configs`` and ``dataset_info``."""
    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": data_files(output_format)}]}]
    infos = [{"config_name": "default", "features": image_features(output_format, embeddings)}]
    if output_format == FORMAT_PARQUET:  # one builder per folder (datasets#7101): only parquet results can be a config
        configs.append(
            {"config_name": "results", "data_files": [{"split": "train", "path": f"{RESULTS_DIR}/*.parquet"}]}
        )
        infos.append({"config_name": "results", "features": results_features(embeddings)})
    return {"configs": configs, "dataset_info": infos}


def models_section(pixels: PixelSettings | None) -> str:
    """The card's "Models" section: each checkpoint pinned (source, content id), the dtype, row defaults and seed,
    and the runs that changed them (``--mixed-output``). Each table cell is a `markdown_cell`: a source is any path
    a user gave, and a ``|`` in it must not open a cell of its own. The changes quote sources too: each is a code
    span, never read as Markdown or HTML."""
    if pixels is None:
        return ""
    rows = "\n".join(
        f"| {markdown_cell(name)} | {markdown_cell(c['source'])} | {markdown_cell(c['content'])} |"
        for name, c in sorted(pixels.checkpoints.items())
    )
    defaults = ", ".join(f"{name} {value}" for name, value in sorted(pixels.defaults.items()))
    mixed = "".join(
        f"\n\nRun {markdown_code(str(entry.get('run_id')))} changed them: "
        f"{'; '.join(markdown_code(str(change)) for change in entry.get('changes') or [])}."
        for entry in pixels.mixed
    )
    return f"""
## Models

| checkpoint | source | content id |
| --- | --- | --- |
{rows}

dtype {pixels.dtype}; rows without their own value took: {defaults}; job seed {pixels.seed}. Each results row and
sample names the checkpoints that made its image (`prior_model`, `decoder_model`, `depth_model`) and its dtype.{mixed}
"""


def card(
    output_format: str, embeddings: tuple[str, int] | None, *, manifest: str, pixels: PixelSettings | None = None
) -> str:
    """The whole ``README.md``: YAML header, then how to read the output, then the models that made it."""
    header = yaml.safe_dump(card_metadata(output_format, embeddings), sort_keys=False, width=1000)
    results_call = (
        'load_dataset(OUTPUT, "results", split="train")'
        if output_format == FORMAT_PARQUET
        else 'load_dataset(OUTPUT, data_dir="results", split="train")'
    )
    where = {
        FORMAT_FILES: f"one PNG per image in `{IMAGES_DIR}/<part>/`, with its metadata in `{IMAGES_METADATA}` beside",
        FORMAT_WEBDATASET: f"webdataset tars in `{DATA_DIR}/` (`<key>.json`, `<key>.png`, `<key>.txt` per sample)",
        FORMAT_PARQUET: f"Parquet files in `{DATA_DIR}/` (the PNG bytes in the column `png`)",
    }[output_format]
    return f"""---
{header}---

# Images rendered with Kandinsky 2.2 (kandinsky-render)

Rendered from the manifest {markdown_code(public_uri(manifest))} by kandinsky-render: {where}.
Every image carries what its manifest row asked for (prompt, caption, inputs, seed, sizes, steps,
guidance) and, with `--score clip`, its CLIP score. `results/` holds one row per image and rendering
attempt (status, error, where the image is); `stats.json` and `index.html` summarise the output.

```python
from datasets import load_dataset

images = load_dataset(OUTPUT, split="train")  # the images (column png) with their metadata
results = {results_call}  # every results row
```

The final status of each image (without the rows a `--retry-errors` run superseded):
`kandinsky-render status OUTPUT --all --json`, or in pandas:
`pandas.read_parquet(OUTPUT + "/results").sort_values("attempt").drop_duplicates(["id", "image_index"], keep="last")`.
{models_section(pixels)}"""


def write_card(storage: Storage, settings: DatasetSettings, *, embeddings: tuple[str, int] | None) -> str:
    """Write the output's ``README.md`` for its pinned ``settings``; its key. ``embeddings``: (dtype, dim) saved."""
    text = card(settings.output_format, embeddings, manifest=settings.manifest, pixels=settings.pixels)
    storage.write_bytes(CARD_FILE, text.encode("utf-8"))
    return CARD_FILE
