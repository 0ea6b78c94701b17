"""Typed records read back from JSON files the job wrote (markers, pinned settings): checked, never trusted.

An output's own files may be damaged, edited or planted. `from_json` turns their bytes into a frozen
dataclass only when every field has the type its annotation declares (nested dataclasses, dicts,
tuples, lists and unions included), so code that reads a record can rely on it; anything else is a
ValueError that says which field is wrong, never a TypeError or a RecursionError later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_json(cls: type[T], data: bytes | str, *, what: str) -> T:
    """``cls`` built from the JSON object ``data``; ValueError starting with ``what`` when it is not one."""
    try:
        raw = json.loads(data)
    except RecursionError:
        raise ValueError(f"{what}: nested too deeply to be one") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    return from_mapping(cls, raw, what=what)


def from_mapping(cls: type[T], raw: Any, *, what: str, path: str = "") -> T:
    """``cls(**raw)`` with every value checked against its field's annotation (see the module docstring)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what}: {path or 'the file'} is a {type(raw).__name__}, expected an object")
    hints = typing.get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls) if item.init}
    unknown = sorted(str(key) for key in raw if key not in fields)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {', '.join(unknown[:5])}{' at ' + path if path else ''}")
    values = {}
    for name, item in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in raw:
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                raise ValueError(f"{what}: {where} is missing")
            continue
        values[name] = _value(raw[name], hints[name], what=what, path=where)
    return cls(**values)


def _value(value: Any, hint: Any, *, what: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        problems = []
        for arg in args:
            try:
                return _value(value, arg, what=what, path=path)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError(problems[0] if len(problems) == 1 else f"{what}: {path} has the wrong type ({_name(value)})")
    if hint is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, what=what, path=path)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (dict, Mapping) or hint is dict:
        if isinstance(value, Mapping):
            key_hint, value_hint = args or (str, Any)
            return {
                _value(k, key_hint, what=what, path=f"{path} key"): _value(v, value_hint, what=what, path=f"{path}.{k}")
                for k, v in value.items()
            }
    elif origin in (tuple, list) or hint in (tuple, list):
        if isinstance(value, list):
            item_hint = args[0] if args else Any
            items = [_value(item, item_hint, what=what, path=f"{path}[{i}]") for i, item in enumerate(value)]
            return tuple(items) if origin is tuple or hint is tuple else items
    elif isinstance(hint, type) and hint.__module__ == "collections":  # Counter, defaultdict: not in records
        raise TypeError(f"{hint} cannot be read back from JSON")
    else:
        raise TypeError(f"{path}: {hint} cannot be checked")
    raise ValueError(f"{what}: {path} is {_name(value)}, expected {_hint_name(hint)}")


def _name(value: Any) -> str:
    text = json.dumps(value)[:40] if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
