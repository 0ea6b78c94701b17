"""``--config job.yaml``: any render flag in a YAML (or JSON) file; flags on the command line override it."""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from fsspec.implementations.local import LocalFileSystem

from jobs.options.file_values import file_keys, file_value
from jobs.options.flags import OPTIONS, Option, option_at
from jobs.options.run_options import RunOptions
from jobs.options.storage import redact, secret_values
from schemas.text import first_line

CONFIG_FLAG = option_at(RunOptions, "config").flag


# What a config file may be: a small mapping of options. These bounds make a hostile file (an alias bomb, 20,000
# nested brackets, a huge file) a clear error instead of a hang or a crash.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIASES = 16
MAX_DEPTH = 32


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a budget of aliases and nesting, duplicate keys refused, and only ``true`` and
    ``false`` read as booleans (YAML 1.2: ``off``, ``on``, ``yes`` and ``no`` are the words they are)."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases", self.peek_event().start_mark
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: construct_mapping refuses it itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:80]!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping held by a YAML/JSON file (local path or fsspec URI); ValueError when it is not one.

    Loaded with `ConfigLoader` from at most `MAX_CONFIG_BYTES`. Errors never quote the file's lines: a
    line may hold a credential (a storage option, a SAS token) that nothing could redact yet, since the
    file did not parse.
    """
    from actors.retry import retry
    from actors.storage import open_fs

    try:
        fs, local = open_fs(path)
        if isinstance(fs, LocalFileSystem):
            raw = _read_local(path, local)
        else:
            raw = retry(lambda: fs.cat_file(local, start=0, end=MAX_CONFIG_BYTES + 1), what=f"read {path}")
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"{CONFIG_FLAG} {path}: larger than {MAX_CONFIG_BYTES} bytes; a config file is small")
        data = yaml.load(raw.decode("utf-8"), Loader=ConfigLoader)  # noqa: S506 - a safe loader, bounded
    except FileNotFoundError:
        raise ValueError(f"{CONFIG_FLAG} {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not valid YAML{_where(exc)}") from None
    except RecursionError:
        raise ValueError(f"{CONFIG_FLAG} {path}: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"{CONFIG_FLAG} {path}: cannot read it: {type(exc).__name__}: {first_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return dict(data)


def _read_local(path: str, local: str) -> bytes:
    """The bytes of a local config file, refused (ValueError naming it and what it is) unless it is a regular file:
    a FIFO would block the read forever, a device stream forever. A symlink to a regular file is read."""
    from actors.storage_io import UnsafeObjectError, read_local

    if os.path.getsize(local) > MAX_CONFIG_BYTES:  # FileNotFoundError: "no such file"
        raise ValueError(f"{CONFIG_FLAG} {path}: larger than {MAX_CONFIG_BYTES} bytes; a config file is small")
    try:  # opened without blocking: a FIFO or a device is refused, not waited on
        data = read_local(local, MAX_CONFIG_BYTES)
    except UnsafeObjectError as exc:
        raise ValueError(f"{CONFIG_FLAG} {exc}") from None
    if data is None:
        raise FileNotFoundError(local)
    return data


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


GIVEN = "given_dests"  # the parsed namespace's attribute naming the options the command line or the file set


class _Unset(list):
    """What an option holds until the command line sets it (a list, so that append actions can copy it)."""


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``--config FILE`` (if given) as defaults: flags override the file. The
    namespace's `GIVEN` holds the destinations the command line or the file set (the others hold defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(CONFIG_FLAG)
    known, _ = pre.parse_known_args(argv)
    from_file: set[str] = set()
    if known.config:
        values = read_config_file(known.config)
        try:
            defaults = flag_defaults(values, source=known.config)
        except ValueError as exc:  # it may quote a value: never one stored under a credential-like name
            raise ValueError(redact(str(exc), secret_values(values))) from None
        parser.set_defaults(**defaults)
        from_file = set(defaults)
    args = parser.parse_args(argv)
    # Again, each option holding a marker first: argparse sets only what the command line gives.
    unset = _Unset()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    setattr(args, GIVEN, frozenset({dest for dest, value in vars(probe).items() if value is not unset} | from_file))
    return args
