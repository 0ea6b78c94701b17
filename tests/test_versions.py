"""Pinned installs: constraints.txt, the tested versions, the patched diffusers methods, the pinned depth model."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from schemas.versions import TESTED_VERSIONS
from tests.conftest import REPO


def constraints() -> dict[str, str]:
    """constraints.txt as canonical package name -> pinned version."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;+]+)", line)
            assert match, f"constraints.txt: {line!r} is not an exact name==version pin"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_constraints_pin_exact_public_versions_without_the_project() -> None:
    pins = constraints()
    assert "kandinsky-render" not in pins
    assert pins["torch"] == "2.13.0"  # no +cpu: the same line takes the CUDA build
    assert len(pins) > 50  # the whole tested environment, not only the direct dependencies


def test_tested_versions_agree_with_constraints() -> None:
    pins = constraints()
    differ = {
        package: (tested, pins.get(canonicalize_name(package)))
        for package, tested in TESTED_VERSIONS.items()
        if pins.get(canonicalize_name(package)) != tested
    }
    assert not differ, f"package: (schemas/versions.py TESTED_VERSIONS, constraints.txt) differ: {differ}"


def test_pinned_versions_satisfy_the_declared_ranges() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraints()
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in declared:
        requirement = Requirement(text)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is not None:  # gcsfs (the gcs extra) is not part of the tested environment
            assert requirement.specifier.contains(pinned), f"pyproject.toml {text!r} excludes the tested {pinned}"


def test_install_commands_use_the_constraints() -> None:
    readme = (REPO / "README.md").read_text()
    command = "pip install torch==2.13.0 && pip install -c constraints.txt -e '.[test]' && kandinsky-render render"
    assert command in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0\n" in ci and "pip install -c constraints.txt -e '.[test]'\n" in ci
    assert "constraints.txt" in (REPO / "cluster" / "Dockerfile").read_text()
