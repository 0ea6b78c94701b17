"""``--config job.yaml``: any render flag in a YAML (or JSON) file; flags on the command line override it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CONFIG_FLAG = "--config"
_NOT_IN_FILE = frozenset({"help", "config"})
# `--storage-option KEY=VALUE` (repeatable) reads better in a file as a mapping named like JobConfig's field.
_ALIASES = {"storage_options": "storage_option"}


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping held by a YAML/JSON file (local path or fsspec URI); ValueError when it is not one."""
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FLAG} {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return dict(data)


def flag_defaults(parser: argparse.ArgumentParser, values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Turn a config mapping into argparse defaults for ``parser``'s options.

    Keys are flag names without the leading dashes, with ``-`` or ``_`` (``num-decoder-actors``,
    ``num_decoder_actors``). Values are checked like the command line would check them. Raises
    ValueError naming ``source`` and the key for an unknown key or a bad value.
    """
    actions = {
        action.dest: action
        for action in parser._actions  # argparse keeps no public list of its options
        if action.dest not in _NOT_IN_FILE and action.option_strings
    }
    defaults: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        key = _ALIASES.get(key, key)
        action = actions.get(key)
        if action is None:
            known = ", ".join(sorted(name.replace("_", "-") for name in actions))
            raise ValueError(f"{source}: unknown option {raw_key!r}; known options: {known}")
        defaults[key] = _convert(action, value, where=f"{source}: {raw_key}")
    return defaults


def _convert(action: argparse.Action, value: Any, *, where: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, Mapping):  # storage_option: {key: value} -> ["key=<json>"]
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"{where}: expected a list or a mapping")
        return [str(item) for item in value]
    if value is None:
        return None
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            converted = action.type(value)
        except ValueError:
            raise ValueError(
                f"{where}: expected {'an integer' if action.type is int else 'a number'}, got {value!r}"
            ) from None
        if action.type is int and isinstance(value, float) and value != converted:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(value, (dict, list)):
        raise ValueError(f"{where}: expected a single value, got a {type(value).__name__}")
    else:
        converted = value if isinstance(value, str) else str(value)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``--config FILE`` (if given) as defaults: flags override the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = read_config_file(known.config)
        parser.set_defaults(**flag_defaults(parser, values, source=known.config))
    return parser.parse_args(argv)
