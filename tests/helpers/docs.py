"""The fenced blocks of README.md and docs/*.md, with the marker that says how each is tested.

An HTML comment on the last non-blank line before a fence marks the block (docs/contributing.md):
``<!-- run: repo -->``, ``<!-- run: scratch -->``, ``<!-- run-by: tests/FILE.py::TEST ... -->`` or
``<!-- not-run: REASON -->``.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.places import REPO

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(run|run-by|not-run):\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    line: int  # the opening fence's line, 1-based
    language: str
    code: str  # dedented, without the fences
    section: str  # the last heading before it
    marker: str | None  # run, run-by, not-run, or None
    value: str  # run: the context; run-by: the test and any note; not-run: the reason

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md and every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_blocks(page: Path | str) -> list[Block]:
    """Every fenced block of ``page`` (a path, or one relative to the repository), in order."""
    path = REPO / page if not Path(page).is_absolute() else Path(page)
    lines = path.read_text().splitlines()
    found, section, index = [], "", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        opening = FENCE.match(line)
        if not opening:
            index += 1
            continue
        indent, language = opening.groups()
        end = index + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(REPO)}:{index + 1}: a fence that never closes")
        before = next((lines[k] for k in range(index - 1, -1, -1) if lines[k].strip()), "")
        marked = MARKER.match(before)
        found.append(
            Block(
                page=str(path.relative_to(REPO)),
                line=index + 1,
                language=language,
                code=textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n",
                section=section,
                marker=marked.group(1) if marked else None,
                value=marked.group(2) if marked else "",
            )
        )
        index = end + 1
    return found


def blocks_in(page: str, section: str, language: str) -> list[str]:
    """The code of ``page``'s ``language`` blocks under the heading ``section``, in order."""
    return [b.code for b in page_blocks(page) if b.section == section and b.language == language]
