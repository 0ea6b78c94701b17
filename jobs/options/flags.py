"""The render option table, walked from the config dataclasses: it builds the argparse parser and reads file values."""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shutil
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.options.run_options import RunOptions
from schemas.config import JobConfig

PROG = "kandinsky-render render"
DESCRIPTION = "Render every row of Parquet manifests with Kandinsky 2.2 on Ray."
# Help sections in --help order; a group key not listed here is its own title, after these.
GROUPS = {
    "io": "input and output",
    "models": "models (hub ids or save_pretrained directories)",
    "speed": "speed (see docs/performance.md)",
    "execution": "execution",
    "defaults": "defaults for null manifest values (diffusers' defaults)",
    "limits": "limits (rows outside them become error rows)",
    "watching": "watching",
}
# Every leaf field of JobConfig (and the dataclasses nested in it) and of RunOptions is one option:
# a flag, a config-file key and a --help line. What a field needs beyond its type and default sits
# in its metadata, under these keys (any other key is refused, so a typo fails at import):
LEAF_METADATA = {
    "help": "required: what the option does; --help adds '(default: ...)' itself",
    "flag": "when not '--' + the field name with dashes; flag and help are templates: {stage} is the "
    "enclosing field's name (or its 'stage'), {what} its 'what' (default: the stage), {name} the field's",
    "default_help": "what leaving the option out means when that is decided later (from the cluster, "
    "--models...): the option is then unset (None) and --help shows this text ({default}: the field's default)",
    "choices": "the values allowed",
    "parse": "text -> value (default: the field's type; comma-separated for tuple[str, ...])",
    "metavar": "the value's name in --help",
    "group": "a key of GROUPS (default: the enclosing field's group)",
    "repeatable": "a tuple[str, ...] field whose flag may be given again",
    "pairs": "'json' or 'text': a repeatable KEY=VALUE option that a file may give as a mapping",
    "aliases": "more config-file keys",
    "in_file": "False: command line only",
    "derived": "not an option: the field is built from the options this text names",
}
NESTED_METADATA = {
    "stage": "{stage} in the nested fields' templates (default: this field's name)",
    "what": "{what} in the nested fields' templates (default: the stage)",
    "group": "the nested fields' group",
    "per_field": "nested field name -> metadata overriding its own (e.g. a per-stage default_help)",
    "derived": LEAF_METADATA["derived"],
}
_HELP_COLUMN = 24  # where argparse's default HelpFormatter starts help text when flags are long


@dataclass(frozen=True, kw_only=True)
class Option:
    """One flag and config-file key, declared by one leaf field of `JobConfig` or `RunOptions`."""

    flag: str
    root: type
    path: tuple[str, ...]  # field names from ``root`` down to the leaf
    kind: type  # bool, int, float, str or tuple (of str)
    optional: bool  # None is a valid value: the option may be unset
    default: Any  # the value when neither the command line nor a config file sets it
    default_text: str | None  # how --help shows the default; None: nothing to show
    help: str
    parse: Callable[[str], Any]
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    group: str | None = None
    repeatable: bool = False
    pairs: str | None = None
    aliases: tuple[str, ...] = ()
    in_file: bool = True

    @property
    def negatable(self) -> bool:
        """Whether the flag has a ``--no-`` twin: a switch that is on by default, or unset (decided later)."""
        return self.kind is bool and bool(self.default or self.optional)

    @property
    def dest(self) -> str:
        """The attribute of the parsed namespace (and config-file key with underscores)."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def key(self) -> str:
        """The config-file key as written in docs: the flag without its dashes."""
        return self.flag.lstrip("-")

    @property
    def field(self) -> str:
        """``Class.field.path`` of the declaring field, for messages."""
        return ".".join((self.root.__name__, *self.path))

    def help_text(self) -> str:
        """The --help text: what it does, then its default."""
        return self.help if self.default_text is None else f"{self.help} (default: {self.default_text})"


def finite_float(text: str) -> float:
    """A float option from the command line: finite (``nan`` and ``inf`` are refused, as in config files)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: how a ``tuple[str, ...]`` option is given on the command line."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def shown(value: Any) -> str:
    """A default as --help and the README write it."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def options_of(root: type) -> list[Option]:
    """The options declared by dataclass ``root`` and the dataclasses nested in it, in field order."""
    return list(_walk(root, root=root, path=(), defaults=None, context={}, per_field={}, group=None))


def _walk(
    cls: type,
    *,
    root: type,
    path: tuple[str, ...],
    defaults: object | None,
    context: dict[str, str],
    per_field: Mapping[str, Mapping[str, Any]],
    group: str | None,
) -> Iterator[Option]:
    hints = typing.get_type_hints(cls)
    unknown = set(per_field) - {item.name for item in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{'.'.join((root.__name__, *path))}: per_field names no field of {cls.__name__}: {unknown}")
    for item in dataclasses.fields(cls):
        where = ".".join((root.__name__, *path, item.name))
        meta = {**item.metadata, **per_field.get(item.name, {})}
        if "derived" in meta:
            continue
        default = _field_default(item) if defaults is None else getattr(defaults, item.name)
        kind, optional = _unwrap(hints[item.name], where=where)
        if dataclasses.is_dataclass(kind):
            _check_keys(meta, NESTED_METADATA, where=where)
            stage = meta.get("stage", item.name)
            yield from _walk(
                kind,
                root=root,
                path=(*path, item.name),
                defaults=default,
                context={**context, "stage": stage, "what": meta.get("what", stage)},
                per_field=meta.get("per_field", {}),
                group=meta.get("group", group),
            )
            continue
        _check_keys(meta, LEAF_METADATA, where=where)
        if "help" not in meta:
            raise TypeError(f"{where}: give the field metadata 'help' (an option) or 'derived' (built from options)")
        yield _leaf(
            meta,
            root=root,
            path=(*path, item.name),
            kind=kind,
            optional=optional,
            default=default,
            context={**context, "name": item.name},
            group=meta.get("group", group),
        )


def _leaf(
    meta: Mapping[str, Any],
    *,
    root: type,
    path: tuple[str, ...],
    kind: type,
    optional: bool,
    default: Any,
    context: dict[str, str],
    group: str | None,
) -> Option:
    where = ".".join((root.__name__, *path))
    flag = _format(meta.get("flag", "--" + path[-1].replace("_", "-")), context, where=where)
    repeatable = bool(meta.get("repeatable", False))
    if repeatable and kind is not tuple:
        raise TypeError(f"{where}: a repeatable option must be a tuple[str, ...] field")
    if "default_help" in meta:
        default_text: str | None = _format(meta["default_help"], {**context, "default": shown(default)}, where=where)
        default, optional = None, True
    else:
        default_text = None if default is None or default is False or default == () else shown(default)
    optional = optional or default is None  # e.g. a required JobConfig field: unset until given
    choices = tuple(meta["choices"]) if "choices" in meta else None
    if choices is not None and default is not None and default not in choices:
        raise TypeError(f"{where}: default {default!r} is not one of its choices {choices}")
    return Option(
        flag=flag,
        root=root,
        path=path,
        kind=kind,
        optional=optional,
        default=default,
        default_text=default_text,
        help=_format(meta["help"], context, where=where),
        parse=meta.get("parse") or {tuple: comma_list, float: finite_float}.get(kind, kind),
        choices=choices,
        metavar=meta.get("metavar"),
        group=group,
        repeatable=repeatable,
        pairs=meta.get("pairs"),
        aliases=tuple(meta.get("aliases", ())),
        in_file=bool(meta.get("in_file", True)),
    )


def _format(template: str, context: Mapping[str, str], *, where: str) -> str:
    try:
        return template.format_map(context)
    except (KeyError, IndexError) as exc:
        raise TypeError(f"{where}: {template!r} uses {exc}, which is not one of {sorted(context)}") from None


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None  # a required field: the option is unset until given


def _unwrap(hint: Any, *, where: str) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``tuple[str, ...]`` -> ``(tuple, False)``."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: an option holds one type (or None), not {hint}")
        hint, optional = rest[0], len(rest) < len(args)
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        return tuple, optional
    if hint in (bool, int, float, str) or dataclasses.is_dataclass(hint):
        return hint, optional
    raise TypeError(f"{where}: {hint} cannot be an option (bool, int, float, str, tuple[str, ...]); mark it derived")


def _check_keys(meta: Mapping[str, Any], allowed: Mapping[str, str], *, where: str) -> None:
    unknown = set(meta) - set(allowed)
    if unknown:
        raise TypeError(f"{where}: unknown option metadata {sorted(unknown)} (known: {', '.join(sorted(allowed))})")


def option_table(*roots: type) -> tuple[Option, ...]:
    """The options of ``roots``; TypeError when two fields declare the same flag or config-file key."""
    options = tuple(option for root in roots for option in options_of(root))
    seen: dict[str, Option] = {}
    for option in options:
        for name in (option.dest, *option.aliases):
            if name in seen:
                raise TypeError(f"{option.field} and {seen[name].field} both declare {name!r}")
            seen[name] = option
    return options


OPTIONS = option_table(JobConfig, RunOptions)


def option_at(root: type, *path: str, options: Sequence[Option] = OPTIONS) -> Option:
    """The option declared by field ``path`` of ``root`` (e.g. ``option_at(JobConfig, "prior", "num_gpus")``)."""
    for option in options:
        if option.root is root and option.path == path:
            return option
    raise KeyError(".".join((root.__name__, *path)))


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` showing an option's default only when there is one to show (not for required options, None,
    empty strings or switches): the formatter of the sub-commands other than ``render``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, "", False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def plain(text: str) -> str:
    """A docstring line as --help shows it: without reStructuredText quotes."""
    return text.replace("``", "").replace("`", "")


def version_text() -> str:
    """``kandinsky-render 0.1.0 (python 3.11.7, ray 2.60.0, ...)``, from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("ray", "torch", "diffusers", "transformers"))
    return f"kandinsky-render {installed('kandinsky-render')} (python {platform.python_version()}, {libraries})"


def build_parser(prog: str = PROG, options: Sequence[Option] = OPTIONS) -> argparse.ArgumentParser:
    """The ``render`` command line: one flag per option, grouped, each with its default in its help."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=version_text())
    used = list(dict.fromkeys(option.group for option in options if option.group))
    order = [*[key for key in GROUPS if key in used], *[key for key in used if key not in GROUPS]]
    groups = {key: parser.add_argument_group(GROUPS.get(key, key)) for key in order}
    # RawTextHelpFormatter keeps these lines: wrapped here, where hub ids are not split at their hyphens.
    width = max(shutil.get_terminal_size().columns - 2 - _HELP_COLUMN, 20)
    for option in sorted(options, key=lambda option: order.index(option.group) if option.group else -1):
        target = groups[option.group] if option.group else parser
        text = "\n".join(textwrap.wrap(option.help_text(), width, break_on_hyphens=False)).replace("%", "%%")
        if option.negatable:
            target.add_argument(option.flag, dest=option.dest, action="store_true", default=option.default, help=text)
            target.add_argument(f"--no-{option.key}", dest=option.dest, action="store_false", help=f"not {option.flag}")
        elif option.kind is bool:
            target.add_argument(option.flag, dest=option.dest, action="store_true", help=text)
        elif option.repeatable:
            default = list(option.default or ())  # argparse appends to a copy of it
            target.add_argument(
                option.flag, dest=option.dest, action="append", default=default, metavar=option.metavar, help=text
            )
        else:
            target.add_argument(
                option.flag,
                dest=option.dest,
                type=option.parse,
                default=option.default,
                choices=option.choices,
                metavar=option.metavar,
                help=text,
            )
    return parser
