"""Config-file values read as the command line reads them: the keys a file may use, each value checked and
converted to its option's type (`jobs.options.config_file` reads the file)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from jobs.options.flags import OPTIONS, Option


def file_keys(options: Sequence[Option] = OPTIONS) -> dict[str, Option]:
    """Config-file key (underscores) -> option, aliases included; command-line-only options left out."""
    keys: dict[str, Option] = {}
    for option in options:
        if option.in_file:
            keys.update(dict.fromkeys((option.dest, *option.aliases), option))
    return keys


def file_value(option: Option, value: Any, *, where: str) -> Any:
    """A config-file value checked and converted as the command line would; ValueError starting with ``where``."""
    if option.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if option.repeatable:
        if isinstance(value, Mapping) and option.pairs:  # {key: value} -> ["key=value"]
            encode = json.dumps if option.pairs == "json" else str
            return [f"{key}={encode(item)}" for key, item in value.items()]
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"{where}: expected a list{' or a mapping' if option.pairs else ''}")
        return [str(item) for item in value]
    if value is None:
        if option.optional:
            return None
        raise ValueError(f"{where}: expected a value, got null")
    if option.kind in (int, float):
        converted = _number(option.kind, value, where=where)
    elif option.kind is tuple and isinstance(value, list):
        converted = _parsed(option, ",".join(map(str, value)), where=where)
    elif isinstance(value, (dict, list)):
        raise ValueError(f"{where}: expected a single value, got a {type(value).__name__}")
    else:
        converted = _parsed(option, value if isinstance(value, str) else str(value), where=where)
    if option.choices is not None and converted not in option.choices:
        raise ValueError(f"{where}: {converted!r} is not one of {', '.join(map(str, option.choices))}")
    return converted


def _number(kind: type, value: Any, *, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    word = "an integer" if kind is int else "a number"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    try:
        converted = kind(value)
    except ValueError:
        raise ValueError(f"{where}: expected {word}, got {value!r}") from None
    if kind is float and not math.isfinite(converted):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if kind is int and isinstance(value, float) and value != converted:
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return converted


def _parsed(option: Option, text: str, *, where: str) -> Any:
    try:
        return option.parse(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
