"""``--config job.yaml``: any render flag in a YAML (or JSON) file; flags on the command line override it."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jobs.options.flags import OPTIONS, Option, file_keys, file_value, option_at
from jobs.options.run_options import RunOptions

CONFIG_FLAG = option_at(RunOptions, "config").flag


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping held by a YAML/JSON file (local path or fsspec URI); ValueError when it is not one."""
    from fsspec.core import url_to_fs

    from actors.retry import retry

    try:
        fs, local = url_to_fs(path)
        data = yaml.safe_load(retry(lambda: fs.cat_file(local), what=f"read {path}").decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FLAG} {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return dict(data)


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
        parser.set_defaults(**flag_defaults(values, source=known.config))
    return parser.parse_args(argv)
