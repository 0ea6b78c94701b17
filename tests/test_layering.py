"""Imports flow one way: schemas (no torch/ray/diffusers) <- actors (no ray) <- jobs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        (
            "schemas.manifest, schemas.results, schemas.work, schemas.config, schemas.keys, schemas.versions",
            {"torch", "ray", "diffusers"},
        ),
        ("actors.prior, actors.decoder, actors.storage, actors.images", {"ray"}),
        ("cluster.resources", {"torch", "ray", "diffusers"}),
    ],
)
def test_import_rules(module: str, forbidden: set[str]) -> None:
    assert not loaded_after_import(module) & forbidden
