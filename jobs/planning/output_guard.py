"""What an output folder must be before a run writes into it: an output of ours or empty, whole, and apart.

Checked at planning, before any file is written or deleted, each refusal a ValueError (exit 2):
- a folder that holds files and is not an output of the job (no ``_dataset.json``) is refused, naming a
  few of them, unless ``--allow-other-files``: then they stay untouched (the job deletes and replaces
  only names it writes, `schemas.shards.is_own_key`), and only a file at one of the output's own
  top-level names (README.md, index.html, ...) is still refused;
- none of the output's own names may lead out of it through a symbolic link (locally);
- the output may not hold, or lie inside, a checkpoint folder or the model cache (input images inside
  it are refused per row, `schemas.validation`); a manifest inside it is refused when listing.
"""

from __future__ import annotations

import dataclasses

from actors.storage import Storage, UnsafeObjectError
from jobs.options.flags import option_at
from jobs.planning.manifests import overlap
from schemas.config import JobConfig
from schemas.keys import LEASE_FILE
from schemas.models import is_hub_id
from schemas.shards import OUTPUT_FILES, OUTPUT_FOLDERS, DatasetSettings
from schemas.text import printable

SHOWN = 5  # files named in a refusal


def check_output(storage: Storage, config: JobConfig, *, pinned: DatasetSettings | None) -> None:
    """Refuse ``config.output`` when a run must not write into it (see the module docstring); ``pinned``: its
    ``_dataset.json`` as read (None: it is not an output of the job)."""
    for name in (*OUTPUT_FILES, *OUTPUT_FOLDERS):
        try:
            storage.path(name)
        except UnsafeObjectError as exc:
            raise ValueError(f"{exc}. Remove the link, or choose another --output") from None
    check_overlaps(config)
    if pinned is None:
        check_foreign_files(storage, allow=config.allow_other_files)


def check_overlaps(config: JobConfig) -> None:
    """The output apart from the checkpoints and the model cache, in any spelling (ValueError naming both)."""
    models = {
        option_at(JobConfig, "models", item.name).flag: getattr(config.models, item.name)
        for item in dataclasses.fields(config.models)
        if isinstance(getattr(config.models, item.name), str) and item.name != "depth_revision"
    }
    for flag, path in models.items():
        if path and not is_hub_id(path) and overlap(config.output, path, storage_options=config.storage_options):
            raise ValueError(
                f"--output {printable(config.output)} and {flag} {printable(path)} overlap: the output would write "
                "into (or clean up) the models. Keep the output apart from every models folder"
            )


def check_foreign_files(storage: Storage, *, allow: bool) -> None:
    """Refuse a folder that is not an output of the job and holds anything but this run's lease (see above)."""
    found = [name for name in storage.list_top() if not _ours_unpublished(name)]
    if not found:
        return
    flag = option_at(JobConfig, "allow_other_files").flag
    shown = ", ".join(printable(name) for name in found[:SHOWN]) + (
        f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    )
    if not allow:
        raise ValueError(
            f"{printable(storage.url)} is not empty and is not a kandinsky-render output (it has no _dataset.json): "
            f"it holds {shown}. Choose a new or empty --output, or pass {flag} to render beside those files (the "
            "job never deletes or replaces a file it did not write)"
        )
    clashing = [name for name in found if name in OUTPUT_FILES]
    if clashing:
        raise ValueError(
            f"{printable(storage.url)} holds {', '.join(clashing)}, which a run writes (the output's own files): "
            f"{flag} keeps other files untouched but cannot keep these. Move them, or choose another --output"
        )


def _ours_unpublished(name: str) -> bool:
    """Whether a top-level name is what a first run leaves before it pins its settings: its lease, or the hidden
    temporary file of one of the output's own files."""
    if name == LEASE_FILE:
        return True
    return name.startswith(".") and any(name.startswith(f".{own}.tmp-") for own in OUTPUT_FILES)
