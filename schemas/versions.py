"""The tested versions of the packages that decide pixels, and a check of the installed ones against them."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping

# The versions the test suite passes with, as pinned in constraints.txt (tests/test_versions.py checks
# that the two agree). Only packages whose version can change an output image are listed:
TESTED_VERSIONS: dict[str, str] = {
    "torch": "2.13.0",  # every kernel of the prior, UNet and MoVQ
    "diffusers": "0.42.1",  # the pipelines and schedulers; actors/accel.py patches their private methods
    "transformers": "5.24.0",  # CLIP text/image encoders, the CLIP image processor, the depth estimator
    "tokenizers": "0.23.3",  # the CLIP token ids of each prompt
    "numpy": "2.4.6",  # the float -> uint8 rounding of every image (actors/images.py)
    "pillow": "13.0.0",  # input decoding and the bicubic resizes of source images and depth hints
}


_reported: set[str] = set()  # mismatch lines this process has warned about already


def unreported(lines: list[str]) -> list[str]:
    """The lines of ``lines`` this process has not warned about yet, now counted as warned about.

    The driver and every model stage warn about untested versions at start-up; where they share a process
    (``--runner local``, or several stages in one actor) each line is printed once per process, not once per caller.
    """
    fresh = [line for line in dict.fromkeys(lines) if line not in _reported]
    _reported.update(fresh)
    return fresh


def installed_versions(packages: list[str] | None = None) -> dict[str, str | None]:
    """Installed version of each package (default: those of `TESTED_VERSIONS`); None when it is missing."""
    found: dict[str, str | None] = {}
    for package in packages or list(TESTED_VERSIONS):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def version_mismatches(installed: Mapping[str, str | None] | None = None) -> list[str]:
    """One readable line per package of `TESTED_VERSIONS` whose installed version differs; empty when all match.

    Local version labels are ignored (torch ``2.13.0+cpu`` and ``2.13.0+cu128`` are release 2.13.0).
    ``installed`` maps package -> version (None: missing); default: what this process would import.
    """
    installed = installed_versions() if installed is None else installed
    lines = []
    for package, tested in TESTED_VERSIONS.items():
        version = installed.get(package)
        if version is None:
            lines.append(f"{package} is not installed (kandinsky-render is tested with {package}=={tested})")
        elif version.split("+")[0] != tested:
            lines.append(
                f"{package} {version} is installed but kandinsky-render is tested with {package}=={tested}: "
                "images may differ from tested renders (install with -c constraints.txt)"
            )
    return lines
