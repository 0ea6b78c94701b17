"""stats.json: what the output holds and what this run did."""

from __future__ import annotations

import collections
import json
import platform
from typing import Any

import pyarrow as pa

from actors.storage import Storage
from schemas.keys import STATS_FILE
from schemas.versions import installed_versions, version_mismatches


def versions() -> dict[str, Any]:
    """Versions of the libraries that decide the pixels (and Ray's, pyarrow's); ``mismatches``: those not tested."""
    import diffusers
    import ray
    import torch
    import transformers

    return {
        **installed_versions(),  # the packages of schemas.versions.TESTED_VERSIONS
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pa.__version__,
        "mismatches": version_mismatches(),
    }


def summarize(final: pa.Table) -> dict[str, Any]:
    """Counts over final results (one row per image): by status, by mode, errors by kind."""
    status = final.column("status").to_pylist()
    modes = final.column("mode").to_pylist()
    kinds = [kind for kind, s in zip(final.column("error_kind").to_pylist(), status) if s == "error"]
    by_mode: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    for mode, s in zip(modes, status):
        by_mode[str(mode)][s] += 1
    return {
        "num_images": final.num_rows,
        "by_status": dict(collections.Counter(status)),
        "by_mode": {mode: dict(counts) for mode, counts in sorted(by_mode.items())},
        "errors_by_kind": dict(collections.Counter(kinds)),
    }


def write_stats(storage: Storage, stats: dict[str, Any]) -> None:
    """Write ``stats.json`` under the output."""
    storage.write_bytes(STATS_FILE, json.dumps(stats, indent=2, sort_keys=True, default=str).encode())
