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
            "schemas.manifest, schemas.results, schemas.work, schemas.config, schemas.keys",
            {"torch", "ray", "diffusers"},
        ),
        ("actors.prior, actors.decoder, actors.storage, actors.images", {"ray"}),
        ("cluster.resources", {"torch", "ray", "diffusers"}),
    ],
)
def test_import_rules(module: str, forbidden: set[str]) -> None:
    assert not loaded_after_import(module) & forbidden


def test_tests_import_no_benchmark_code() -> None:
    """Benchmarks run in tests only as ``kandinsky-render benchmark`` processes; shared helpers live in jobs.dev."""
    import ast

    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            if any(name == "jobs.benchmarks" or name.startswith("jobs.benchmarks.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
