"""What is kept of user text and error messages: bounded lengths, one line, nothing that changes between runs.

A row's fields can be of any size (a refused row may hold a 50 MB prompt) and error texts quote
values and exceptions. What the job stores beyond the results rows themselves (markers, the
gallery, stats.json) and every error message is bounded here, so a marker stays a few KB whatever
the rows hold and start-up, which reads every marker, stays fast.
"""

from __future__ import annotations

import re
import stat
import unicodedata
import urllib.parse

from schemas.keys import id_digest

# Longest error message kept (results rows' ``error``, the gallery, log lines).
MAX_ERROR_CHARS = 1000
# Longest prompt (and id) kept in a gallery candidate (markers, the gallery, stats.json's score extremes).
MAX_SAMPLE_TEXT_CHARS = 300
# Longest value quoted inside an error message (a URI, an id).
MAX_QUOTED_CHARS = 200

# CPython's default repr of objects: "<_io.BytesIO object at 0x7f...>", "<function f at 0x...>".
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")
# What `stored_id` makes of a long id (recognised, so that storing a stored id changes nothing).
_STORED_ID = re.compile(rf"(?s).{{{MAX_SAMPLE_TEXT_CHARS}}}… \(\d+ characters, sha256 [0-9a-f]{{16}}\)")


def clip(text: str, limit: int) -> str:
    """``text`` when it has at most ``limit`` characters, else its start and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def clip_optional(text: str | None, limit: int) -> str | None:
    """`clip` that passes None through."""
    return None if text is None else clip(text, limit)


def quoted(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters."""
    return clip(repr(value), limit)


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` on one line, without memory addresses (they differ between runs), at most ``limit`` characters."""
    return clip(_ADDRESS.sub("", " ".join(text.split())), limit)


def exception_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """``Type: message`` of an exception, as `one_line` keeps it (results rows, error messages)."""
    return one_line(f"{type(exc).__name__}: {exc}", limit)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without memory addresses, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    return one_line(lines[0], limit) if lines else ""


def stored_id(row_id: str) -> str:
    """The id as a gallery candidate keeps it: itself, or (when longer than `MAX_SAMPLE_TEXT_CHARS`) its
    start and 16 hex digits of its sha256, so two long ids never share a stored form. A stored id stays as it is."""
    if len(row_id) <= MAX_SAMPLE_TEXT_CHARS or _STORED_ID.fullmatch(row_id):
        return row_id
    return f"{row_id[:MAX_SAMPLE_TEXT_CHARS]}… ({len(row_id)} characters, sha256 {id_digest(row_id)[:16]})"


def stored_entry(entry: dict) -> dict:
    """A gallery candidate (a marker's sample entry, a score extreme) with its row text bounded: ``id``
    (`stored_id`), ``prompt``, ``negative_prompt`` and ``caption`` (`MAX_SAMPLE_TEXT_CHARS`), ``error``
    (`MAX_ERROR_CHARS`)."""
    bounded = dict(entry)
    if isinstance(bounded.get("id"), str):
        bounded["id"] = stored_id(bounded["id"])
    for name in ("prompt", "negative_prompt", "caption"):
        if isinstance(bounded.get(name), str):
            bounded[name] = clip(bounded[name], MAX_SAMPLE_TEXT_CHARS)
    if isinstance(bounded.get("error"), str):
        bounded["error"] = one_line(bounded["error"])
    return bounded


def public_uri(uri: str) -> str:
    """``uri`` as it may be recorded or shown: without user, password, query or fragment.

    What is written into an output (results rows, markers, ``_dataset.json``, the card, stats.json) and
    what is printed never carries a credential: a presigned URL's signature, ``user:token@``. Plain paths
    (no ``://``) are kept as they are.
    """
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def uri_secrets(uri: str | None) -> list[str]:
    """The parts of ``uri`` that `public_uri` drops and that may be credentials (user info, query, fragment), to
    be redacted wherever the whole URI might still be printed (error messages of the libraries that read it)."""
    if not uri or "://" not in uri:
        return []
    parts = urllib.parse.urlsplit(uri)
    found = [parts.netloc.rpartition("@")[0], parts.query, parts.fragment, parts.password or ""]
    found += [value for _, value in urllib.parse.parse_qsl(parts.query)]
    return sorted({text for text in found if len(text) >= 4}, key=len, reverse=True)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: control and format characters (escape sequences, carriage returns,
    bidirectional overrides) shown as ``\\x1b``-style escapes; newlines and tabs kept when ``keep_newlines``."""
    text = str(text)
    keep = "\n\t" if keep_newlines else ""
    return "".join(
        _escaped(char) if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char not in keep else char
        for char in text
    )


def markdown_code(text: str) -> str:
    """``text`` as an inline Markdown code span on one line: `printable`, fenced by more backticks than it holds."""
    text = printable(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_cell(text: str) -> str:
    """``text`` as a `markdown_code` span that stays in its Markdown table cell: GitHub and the Hub split table
    rows on every ``|`` not escaped as ``\\|``, even inside a code span (a ``|`` in a path would start a new cell
    and what follows it would be read as Markdown, HTML included)."""
    return markdown_code(text).replace("|", "\\|")


# What each kind of file other than a regular one is called in a message, by the ``stat`` test that finds it.
_FILE_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file of ``mode`` (an ``os.stat`` result's ``st_mode``) is, for a message: ``a regular file``,
    ``a FIFO``, ``a character device``..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _FILE_KINDS if test(mode)), "an unknown kind of file")
