"""Parsed ``render`` flags -> `RunOptions` and the `JobConfig` they describe (example, models, storage, placement)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cluster.resources import parse_labels
from jobs.options import storage as storage_options
from jobs.options.config_file import GIVEN
from jobs.options.flags import OPTIONS, Option, option_at
from jobs.options.run_options import RunOptions, StagePlacementOptions
from schemas.config import JobConfig
from schemas.models import ModelPaths
from schemas.pinned import PINNED_FIELDS

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ExampleInputs:
    """What ``--example`` fills in when the flags leave it unset (the entry point makes the models)."""

    manifest: str
    output: str
    models: str


def run_options(args: argparse.Namespace) -> RunOptions:
    """The `RunOptions` part of parsed flags."""
    return instantiate(RunOptions, values_of(RunOptions, args))


def config_from_args(
    args: argparse.Namespace, *, environ: Mapping[str, str] | None = None, example: ExampleInputs | None = None
) -> JobConfig:
    """Build a `JobConfig` from parsed flags.

    ``environ`` (default ``os.environ``) supplies ``$KANDINSKY_RENDER_STORAGE_OPTIONS``. ``example``
    (``--example``) fills the manifest, the output and the models the flags leave unset. ValueError
    for missing or bad options.
    """
    run = run_options(args)
    values = values_of(JobConfig, args)
    overrides = values.pop("models")  # per-checkpoint flags; unset ones come from --models or the hub
    manifest, output, models_dir = values["manifest"], values["output"], run.models
    if run.example and example is not None:
        manifest = manifest or example.manifest
        output = output or example.output
        if not (models_dir or overrides["prior"] or overrides["decoder"]):
            models_dir = example.models
    if not output:  # the manifest may be left out: the output's pinned one (jobs.planning.run_settings.run_settings)
        flag, example = option_at(JobConfig, "output").flag, option_at(RunOptions, "example").flag
        raise ValueError(f"{flag} is required (or use {example})")
    models = ModelPaths.resolve(models_dir=models_dir, **overrides)
    checkpoints = [getattr(models, f.name) for f in dataclasses.fields(ModelPaths) if f.name != "cache"]
    values.update(
        given=given_fields(args, example=bool(run.example and example is not None)),
        manifest=manifest or None,
        output=output,
        models=models,
        storage_options=storage_options.resolve(
            environ=os.environ if environ is None else environ,
            pairs=run.storage_option,
            uris=[uri for uri in (manifest, output, *checkpoints) if uri],
            endpoint_url=run.storage_endpoint_url,
            region=run.storage_region,
            anon=run.storage_anon,
            profile=run.storage_profile,
        ),
        stage_placement=stage_placement(run),
    )
    return instantiate(JobConfig, values)


def stage_placement(run: RunOptions) -> dict[str, dict[str, Any]]:
    """``JobConfig.stage_placement`` from each stage's ``--{stage}-accelerator-type`` and ``--{stage}-node-label``."""
    placement = {}
    for item in dataclasses.fields(run):
        stage = getattr(run, item.name)
        if not isinstance(stage, StagePlacementOptions):
            continue
        flag = option_at(RunOptions, item.name, "node_label").flag
        labels = parse_labels(list(stage.node_label), flag=flag)
        if stage.accelerator_type or labels:
            placement[item.name] = {"accelerator_type": stage.accelerator_type, "label_selector": labels}
    return placement


def given_fields(args: argparse.Namespace, *, example: bool = False) -> tuple[str, ...] | None:
    """The pinned fields (`schemas.pinned.PINNED_FIELDS`; ``defaults.<name>`` for one default, ``models.<name>`` for
    one checkpoint's flag, ``models`` for ``--models``) the command line or its config file set; None when the
    namespace does not say (not parsed by `config_file.parse_args`)."""
    dests = getattr(args, GIVEN, None)
    if dests is None:
        return None
    given = {"models"} if example else set()
    for option in OPTIONS:
        if option.dest not in dests:
            continue
        if option.root is RunOptions and option.path == ("models",):  # --models DIR
            given.add("models")
        elif option.root is JobConfig and option.path[0] in PINNED_FIELDS:  # defaults.<name>, models.<name>, seed
            given.add(".".join(option.path[:2]))
    return tuple(sorted(given))


def values_of(root: type, args: argparse.Namespace, options: Sequence[Option] = OPTIONS) -> dict[str, Any]:
    """The parsed values of ``root``'s options, nested like its fields (a nested dataclass as a dict)."""
    values: dict[str, Any] = {}
    for option in options:
        if option.root is root:
            node = values
            for name in option.path[:-1]:
                node = node.setdefault(name, {})
            value = getattr(args, option.dest)
            node[option.path[-1]] = tuple(value) if option.repeatable else value
    return values


def instantiate(
    cls: type[T],
    values: Mapping[str, Any],
    *,
    options: Sequence[Option] = OPTIONS,
    root: type | None = None,
    path: tuple[str, ...] = (),
) -> T:
    """``cls(**values)``, with each dict under a dataclass-typed field made into that dataclass first.

    A ValueError of a dataclass check that starts with a field's name is raised again led by that
    field's flag (``--num-prior-actors: num_actors must be >= 1, got 0``).
    """
    root = root or cls
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = hints.get(name)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next((arg for arg in typing.get_args(kind) if dataclasses.is_dataclass(arg)), None)
        is_nested = isinstance(value, Mapping) and isinstance(kind, type) and dataclasses.is_dataclass(kind)
        kwargs[name] = instantiate(kind, value, options=options, root=root, path=(*path, name)) if is_nested else value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        field_path = tuple(str(exc).split(" ", 1)[0].split("."))
        for option in options:
            if option.root is root and option.path == (*path, *field_path):
                raise ValueError(f"{option.flag}: {exc}") from None
        raise
