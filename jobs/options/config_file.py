"""``--config job.yaml``: any render flag in a YAML (or JSON) file; flags on the command line override it."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jobs.options.flags import OPTIONS, Option, file_keys, file_value, option_at
from jobs.options.run_options import RunOptions
from jobs.options.storage import redact, secret_values
from schemas.text import first_line

CONFIG_FLAG = option_at(RunOptions, "config").flag


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping held by a YAML/JSON file (local path or fsspec URI); ValueError when it is not one.

    Errors never quote the file's lines: a line may hold a credential (a storage option, a SAS token)
    that nothing could redact yet, since the file did not parse.
    """
    from fsspec.core import url_to_fs

    from actors.retry import retry

    try:
        fs, local = url_to_fs(path)
        data = yaml.safe_load(retry(lambda: fs.cat_file(local), what=f"read {path}").decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FLAG} {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not valid YAML{_where(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: cannot read it: {type(exc).__name__}: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return dict(data)


def _where(exc: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is, without the text around it (PyYAML quotes the line)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = "; ".join(str(part) for part in (getattr(exc, "context", None), getattr(exc, "problem", None)) if part)
    return f"{place}: {what} (the line is not shown: it may hold a credential)"


def flag_defaults(values: Mapping[str, Any], *, source: str, options: Sequence[Option] = OPTIONS) -> dict[str, Any]:
    """Turn a config mapping into argparse defaults (namespace attribute -> value) for ``options``.

    Keys are flag names without the leading dashes, with ``-`` or ``_`` (``num-decoder-actors``,
    ``num_decoder_actors``). Values are checked like the command line would check them. Raises
    ValueError naming ``source`` and the key for an unknown key or a bad value.
    """
    keys = file_keys(options)
    defaults: dict[str, Any] = {}
    for raw_key, value in values.items():
        option = keys.get(str(raw_key).lstrip("-").replace("-", "_"))
        if option is None:
            raise ValueError(f"{source}: unknown option {raw_key!r}; {_suggest(str(raw_key), options)}")
        defaults[option.dest] = file_value(option, value, where=f"{source}: {raw_key}")
    return defaults


def _suggest(key: str, options: Sequence[Option]) -> str:
    """``did you mean 'x'?`` for the closest config-file key, and where every key is listed."""
    known = sorted({option.key for option in options if option.in_file} | {a for o in options for a in o.aliases})
    close = difflib.get_close_matches(key.lstrip("-").replace("_", "-"), known, n=1, cutoff=0.6)
    listed = "kandinsky-render render --help lists every option (a key is its flag without the dashes)"
    return f"did you mean {close[0]!r}? {listed}" if close else listed


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``--config FILE`` (if given) as defaults: flags override the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = read_config_file(known.config)
        try:
            parser.set_defaults(**flag_defaults(values, source=known.config))
        except ValueError as exc:  # it may quote a value: never one stored under a credential-like name
            raise ValueError(redact(str(exc), secret_values(values))) from None
    return parser.parse_args(argv)
