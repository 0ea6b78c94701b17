"""Which checkpoints a run needs, and whether each can be loaded: checked before Ray starts or any row renders.

A checkpoint is a folder on this machine, an fsspec URI (``s3://``, ``gs://``, ...: each node syncs it
into its cache, `actors.weights`) or a Hugging Face hub id (loaded through the hub's cache,
``$HF_HOME``). Each check reads a few small files or answers one HEAD request, with no retries, so
a machine without hub access learns at once what it lacks instead of after minutes of retries in
every actor. A needed checkpoint that cannot be loaded stops the job with `ModelUnavailableError`
naming it, where it was looked for, the flags that choose it and its public hub id; one that only
rows refused at planning would use is not needed, and its stage never starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actors.pins import CheckpointKeyError, Pin, changed_on_store, pin_checkpoint
from jobs.options.flags import option_at
from jobs.options.run_options import RunOptions
from jobs.planning.checkpoints import PUBLIC_MOVQ_SCALE
from jobs.planning.identity import checkpoint_id
from jobs.planning.pinning import model_from_pin
from jobs.planning.run_plan import RunPlan
from jobs.planning.scan import DEPTH_MODEL, PRIOR_MODEL, PendingScan
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.models import HUB_MODELS, INDEX_FILES, is_hub_id, is_remote, local_path
from schemas.modes import MODES
from schemas.text import public_uri

logger = logger_for(__name__)

HUB_TIMEOUT_S = 10.0  # one HEAD request to the hub; no retries (the libraries' own retries take minutes)


class ModelUnavailableError(ValueError):
    """A checkpoint the run needs cannot be loaded; the message names each one and how to provide it.

    ``report``: what a dry run planned before it found that (printed before the error).
    """

    def __init__(self, message: str, *, report: str = "") -> None:
        super().__init__(message)
        self.report = report


def check_models(plan: RunPlan, scan: PendingScan) -> PendingScan:
    """``scan`` with the models the pending work needs, each checked to be loadable (`needed_models`).

    Raises `ModelUnavailableError` naming every needed checkpoint that cannot be loaded.
    """
    scan, missing = needed_models(plan, scan)
    if missing:
        raise ModelUnavailableError(missing)
    return scan


def needed_models(plan: RunPlan, scan: PendingScan) -> tuple[PendingScan, str | None]:
    """``scan`` with the models the pending work needs, and what is wrong (None: each can be loaded).

    A checkpoint that cannot be loaded but that no row which will render uses is left out (its
    rows are refused for other reasons), as is the depth stage when every ControlNet row that
    renders has a hint. Rows of a mode whose checkpoint cannot be loaded get no size check.
    """
    if not plan.pending:
        return scan, None
    config = plan.config
    candidates = [PRIOR_MODEL, *sorted({MODES[mode].checkpoint for mode in scan.modes})]
    candidates += [DEPTH_MODEL] if scan.needs_depth else []
    states = checkpoint_states(config, candidates)
    problems = {name: problem for name, (problem, _) in states.items() if problem is not None}
    plan.scales.exclude(set(problems))  # no size checks against a checkpoint nobody can load
    unsure = set(problems) | ({DEPTH_MODEL} if scan.needs_depth else set())
    confirmed = plan.confirm(scan, unsure) if unsure else set()
    missing = {name: problem for name, problem in problems.items() if name in confirmed}
    for name in sorted(set(problems) - confirmed):
        logger.info("model %s cannot be loaded (%s) but no row that renders needs it", name, problems[name])
    modes = [mode for mode in scan.modes if MODES[mode].checkpoint not in set(problems) - confirmed]
    needed = {PRIOR_MODEL, *(MODES[mode].checkpoint for mode in modes)} | ({DEPTH_MODEL} & confirmed)
    pins = {pin.uri: pin for name, (_, pin) in states.items() if name in needed and pin is not None}
    ids = {
        name: checkpoint_id(name, config.models.for_checkpoint(name), pin)
        for name, (problem, pin) in states.items()
        if name in needed and problem is None
    }
    scan = dataclasses.replace(scan, modes=modes, needs_depth=DEPTH_MODEL in confirmed, pins=pins, model_ids=ids)
    warn_public_sizes(plan, scan)
    return scan, describe_missing(config, scan, missing, pinned=plan.pinned_pixels is not None) if missing else None


def warn_public_sizes(plan: RunPlan, scan: PendingScan) -> None:
    """One warning when the models in use render sizes the public checkpoints refuse (the tiny models' MoVQ scales
    by 2, the public ones' by 8): a manifest tried with them would be refused with the real ones."""
    accepted = {}
    for (mode, height, width), images in scan.public_refusals.items():
        checkpoint = MODES[mode].checkpoint
        if checkpoint in plan.scales:  # a loadable checkpoint: its own scale decides what this run renders
            if MODES[mode].size_problem(height=height, width=width, scale=plan.scales[checkpoint]) is None:
                accepted[(mode, height, width)] = images
    if not accepted:
        return
    shown = sorted(accepted.items(), key=lambda item: -item[1])
    sizes = ", ".join(f"{mode} {height}x{width} ({images} image(s))" for (mode, height, width), images in shown[:5])
    checkpoints = sorted({MODES[mode].checkpoint for mode, _, _ in accepted})
    scales = ", ".join(f"{name} {plan.scales[name]}" for name in checkpoints)
    logger.warning(
        "%d image(s) ask for sizes that these models render (MoVQ scale: %s) but the public Kandinsky 2.2 "
        "checkpoints (MoVQ scale %d) refuse as unsupported_size: %s%s. Rows that pass with these models fail with the "
        "real ones; tiny models built with --movq-scale-factor %d check sizes as the real ones do",
        sum(accepted.values()),
        scales,
        PUBLIC_MOVQ_SCALE,
        sizes,
        f" and {len(shown) - 5} more size(s)" if len(shown) > 5 else "",
        PUBLIC_MOVQ_SCALE,
    )


def note_changed_checkpoints(pins: dict[str, Pin], *, storage_options: dict[str, Any] | None = None) -> None:
    """A warning per checkpoint on object storage that changed during the run (one LIST each): the run loaded the
    version it pinned when it started; the next run loads the new one."""
    for uri, pin in sorted(pins.items()):
        if pin.files and (change := changed_on_store(pin, storage_options)):
            logger.warning(
                "%s changed on the store during this run (%s): every actor of this run loaded the version pinned "
                "at its start (%s); the next run loads the new one",
                uri,
                change,
                pin.version,
            )


def checkpoint_states(config: JobConfig, names: list[str]) -> dict[str, tuple[str | None, Pin | None]]:
    """Name -> (why it cannot be loaded or None, the version the run loads or None for a folder), for each of
    ``names`` (keys of `HUB_MODELS`); in parallel."""
    revisions = {DEPTH_MODEL: config.models.depth_hub_revision()}
    with ThreadPoolExecutor(max_workers=max(1, len(names)), thread_name_prefix="model-check") as pool:
        found = {
            name: pool.submit(
                checkpoint_state,
                config.models.for_checkpoint(name),
                index_file=INDEX_FILES[name],
                revision=revisions.get(name),
                storage_options=config.storage_options,
            )
            for name in names
        }
        return {name: future.result() for name, future in found.items()}


def checkpoint_state(
    path: str, *, index_file: str, revision: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[str | None, Pin | None]:
    """Why the checkpoint at ``path`` cannot be loaded (None when it can), and the version every actor of the run
    loads (`actors.pins`): a URI's files, a hub id's commit; None for a folder, read as it is.

    ``index_file`` is the file every such checkpoint holds (``model_index.json`` for a diffusers
    pipeline, whose components must then all be there; ``config.json`` for a transformers model).
    """
    if is_hub_id(path):
        return _hub_state(path, index_file=index_file, revision=revision)
    if is_remote(path):
        return _remote_state(path, index_file=index_file, storage_options=storage_options or {})
    return _folder_problem(local_path(path), index_file=index_file), None


def _folder_problem(folder: str, *, index_file: str) -> str | None:
    where = os.path.abspath(folder)
    if not os.path.isdir(folder):
        return f"{where} does not exist" if not os.path.exists(folder) else f"{where} is not a folder"
    try:
        with open(os.path.join(folder, index_file), "rb") as handle:
            index = handle.read()
    except OSError as exc:
        return f"{where} holds no readable {index_file} ({type(exc).__name__}); not a save_pretrained folder"
    return _components_problem(index, set(os.listdir(folder)), where=where, index_file=index_file)


def _remote_state(uri: str, *, index_file: str, storage_options: dict[str, Any]) -> tuple[str | None, Pin | None]:
    from actors.retry import retry
    from actors.storage import open_fs

    try:
        pin = pin_checkpoint(uri, storage_options)
        fs, root = open_fs(uri, storage_options)
        index = retry(lambda: fs.cat_file(posixpath.join(root, index_file)), what=f"read {uri}/{index_file}")
    except CheckpointKeyError as exc:
        return str(exc), None
    except FileNotFoundError:
        return f"{uri} holds no {index_file}: no checkpoint there", None
    except Exception as exc:  # noqa: BLE001 - any failure to read it means it cannot be loaded; say why
        return f"{uri} cannot be read ({type(exc).__name__}: {_first_line(exc)})", None
    listed = {file.path.split("/", 1)[0] for file in pin.files}
    return _components_problem(index, listed, where=uri, index_file=index_file), pin


def _components_problem(index: bytes, names: set[str], *, where: str, index_file: str) -> str | None:
    """For a diffusers pipeline folder: which components its ``model_index.json`` lists but ``names`` lacks."""
    if index_file != "model_index.json":
        return None
    try:
        listed = json.loads(index)
    except ValueError:
        return f"{where}/{index_file} is not valid JSON"
    wanted = [key for key, value in listed.items() if isinstance(value, list) and value and value[0] is not None]
    lacking = sorted(set(wanted) - names)
    if lacking:
        return f"{where} lacks the component folder(s) {', '.join(lacking)} that its {index_file} lists"
    return None


def _hub_state(repo_id: str, *, index_file: str, revision: str | None) -> tuple[str | None, Pin | None]:
    """Whether the hub id can be loaded, and the commit its revision resolves to now (one HEAD when online; the
    hub cache's commit offline or when the hub does not answer but the cache holds it whole)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, index_file, revision=revision)
    cache = f"hub cache {constants.HF_HUB_CACHE}"
    partial = None
    if isinstance(cached, str):
        snapshot = os.path.dirname(cached)
        with open(cached, "rb") as handle:
            partial = _components_problem(
                handle.read(), set(os.listdir(snapshot)), where=snapshot, index_file=index_file
            )
        if constants.is_offline_mode():
            if partial is None:
                return None, Pin(uri=repo_id, revision=os.path.basename(snapshot))
            return f"{repo_id} is a hub id, HF_HUB_OFFLINE is set and the hub cache holds it in part: {partial}", None
    elif constants.is_offline_mode():
        return f"{repo_id} is a hub id, HF_HUB_OFFLINE is set and the {cache} does not hold it (whole)", None
    try:
        metadata = get_hf_file_metadata(hf_hub_url(repo_id, index_file, revision=revision), timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - not found, gated, unreachable: each means it cannot be loaded
        if isinstance(cached, str):  # in the hub cache (what is missing there downloads when the hub answers)
            return None, Pin(uri=repo_id, revision=os.path.basename(os.path.dirname(cached)))
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            reason = f"the hub refused access ({status}): a gated or private repository needs HF_TOKEN"
        elif status == 404:
            reason = f"the hub has no such repository or revision ({revision or 'main'})"
        else:
            reason = f"the hub cannot be reached ({type(exc).__name__}: {_first_line(exc)})"
        # A path that is no folder here looks like a hub id too (e.g. --models models, run from the wrong folder).
        where = "" if repo_id in HUB_MODELS.values() else f"; there is no folder {os.path.abspath(repo_id)} either"
        return f"{repo_id} is a hub id and {reason}, and the {cache} does not hold it{where}", None
    return None, Pin(uri=repo_id, revision=metadata.commit_hash or revision)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


# Why a run needs each model, for messages.
WHY = {
    PRIOR_MODEL: "every row that renders (prompts and images -> embeddings; --score clip too)",
    DEPTH_MODEL: "ControlNet rows without a hint",
}


def describe_missing(config: JobConfig, scan: PendingScan, missing: dict[str, str], *, pinned: bool = False) -> str:
    """The message of `ModelUnavailableError`: per missing model, why it is needed, the problem and how to fix it
    (``pinned``: the output pinned model paths, which a run leaving the model flags out loads)."""
    models_flag = option_at(RunOptions, "models").flag
    lines = [f"{len(missing)} model(s) this run needs cannot be loaded (checked before starting any model):"]
    for name, problem in sorted(missing.items()):
        field = name.replace("-", "_")
        flag = option_at(JobConfig, "models", field).flag
        modes = [mode for mode in scan.modes if MODES[mode].checkpoint == name]
        why = WHY.get(name) or f"{', '.join(modes)} rows"
        if pinned and model_from_pin(config, field):
            # the output's pinned path (a resume): the flags point elsewhere, the hub would be another model
            lines.append(
                f"- {name}, needed by {why}: {problem}. That path is the one {public_uri(config.output)} pinned "
                f"(its first run's). Give {flag} PATH or {models_flag} DIR where the same checkpoint is now (its "
                "content is checked against the pinned one)."
            )
            continue
        lines.append(
            f"- {name}, needed by {why}: {problem}. Give {flag} PATH (a folder, an fsspec URI such as "
            f"s3://bucket/models/{name}, or a hub id), or {models_flag} DIR holding {name}/, or leave both out "
            f"to load {HUB_MODELS[name]} from the Hugging Face hub (cached in $HF_HOME)."
        )
    return "\n".join(lines)
