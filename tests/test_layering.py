"""Imports flow one way: schemas <- actors <- jobs; cluster/ is used by jobs/ only; actors never use Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT = ("schemas", "actors", "cluster", "jobs", "tests")
# Which project packages each package may import (every import statement, top level or inside a function).
ALLOWED = {
    "schemas": {"schemas"},
    "actors": {"schemas", "actors"},
    "cluster": {"schemas", "cluster"},
    "jobs": {"schemas", "actors", "cluster", "jobs"},
}
# Third-party packages each package must never import, even lazily.
FORBIDDEN = {
    "schemas": {"torch", "ray", "diffusers", "transformers", "PIL", "fsspec"},
    "actors": {"ray"},
    "cluster": {"torch", "ray", "diffusers", "transformers"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names that ``path`` imports anywhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_every_import_follows_the_flow(package: str) -> None:
    wrong = []
    for path in sorted((REPO / package).rglob("*.py")):
        names = imported_packages(path)
        for name in sorted((names & set(PROJECT)) - ALLOWED[package]):
            wrong.append(f"{path.relative_to(REPO)} imports {name}")
        for name in sorted(names & FORBIDDEN.get(package, set())):
            wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        (
            "schemas.manifest, schemas.results, schemas.work, schemas.config, schemas.keys, schemas.modes, "
            "schemas.versions",
            {"torch", "ray", "diffusers"},
        ),
        (
            "actors.prior, actors.decoder, actors.depth, actors.scorer, actors.storage, actors.images, actors.stage",
            {"ray"},
        ),
        ("actors.stage", {"torch"}),  # the stage contract itself needs no model library
        ("cluster.resources", {"torch", "ray", "diffusers"}),
        ("jobs.planning.plan, jobs.planning.dry_run", {"torch", "diffusers", "transformers"}),  # --dry-run stays light
    ],
)
def test_import_rules_in_a_fresh_process(module: str, forbidden: set[str]) -> None:
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
