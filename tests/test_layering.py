"""Imports flow one way: schemas <- actors <- jobs; cluster/ is used by jobs/ only; actors never use Ray.

Inside jobs/ they follow one shard's trip: options -> planning -> execution -> publishing -> reporting,
each sub-package importing only the ones before it; the entry points (cli, render) and the job on
top import any; dev/ (helpers) imports none. No import circle exists anywhere, function-level
imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.places import REPO

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


# jobs/'s sub-packages in the order of a shard's trip: each may import only those before it.
JOBS_LAYERS = ("options", "planning", "execution", "publishing", "reporting")
JOBS_TOP = ("cli", "render", "job")  # entry points and the orchestrator: any layer, dev/
JOBS_APART = {"dev": set(), "benchmarks": {*JOBS_LAYERS, *JOBS_TOP, "dev", "benchmarks"}}


def module_imports(path: Path) -> set[str]:
    """Full names of the modules ``path`` imports anywhere (``from a.b import c`` counts as ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def jobs_part(module: str) -> str | None:
    """The jobs/ sub-package or top module ``module`` belongs to (``jobs.planning.work`` -> ``planning``)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "jobs" and len(parts) > 1 else None


def test_jobs_sub_packages_follow_a_shards_trip() -> None:
    wrong = []
    for path in sorted((REPO / "jobs").rglob("*.py")):
        own = path.relative_to(REPO / "jobs").parts[0].removesuffix(".py")
        if own in JOBS_TOP or own == "__init__":
            continue
        if own in JOBS_APART:
            allowed = JOBS_APART[own] | {own}
        else:
            allowed = set(JOBS_LAYERS[: JOBS_LAYERS.index(own) + 1])
        for module in sorted(module_imports(path)):
            part = jobs_part(module)
            if part is not None and part not in allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {module} ({own} may import {sorted(allowed)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_anywhere() -> None:
    """Between any modules of the project (tests aside), counting imports inside functions and TYPE_CHECKING."""
    files = [p for package in PROJECT if package != "tests" for p in (REPO / package).rglob("*.py")]
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module in module_imports(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != name and not modules[module].name == "__init__.py":
                targets.add(module)
        graph[name] = targets
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "\n".join(circles)


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
        (
            "jobs.planning.work, jobs.planning.run_plan, jobs.planning.dry_run",
            {"torch", "diffusers", "transformers"},
        ),  # --dry-run stays light
    ],
)
def test_import_rules_in_a_fresh_process(module: str, forbidden: set[str]) -> None:
    assert not loaded_after_import(module) & forbidden


def test_tests_run_benchmarks_only_through_their_command() -> None:
    """Benchmarks run in tests as ``kandinsky-render benchmark`` runs them: through `jobs.benchmarks.cli.main` (in this
    process, or as a process of its own), never by reaching into a mode's module; shared helpers live in jobs.dev."""
    import ast

    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            benchmark = [name for name in names if name == "jobs.benchmarks" or name.startswith("jobs.benchmarks.")]
            if any(name != "jobs.benchmarks.cli.main" for name in benchmark):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders
