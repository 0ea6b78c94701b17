"""What a run reads and where it writes, settled before planning: the manifest files' footers (unknown columns
warned about once) and the output's settings (the flags, else what the output pinned, else the defaults)."""

from __future__ import annotations

import dataclasses

from jobs.options.flags import option_at
from jobs.planning.manifests import ManifestFile, list_manifest_paths, manifest_location, read_footer
from schemas.columns import describe_unknown, unknown_columns
from schemas.config import JobConfig
from schemas.loggers import logger_for
from schemas.manifest import COLUMNS_BY_NAME
from schemas.shards import DEFAULT_SHARD_ROWS, FORMAT_FILES, DatasetSettings
from schemas.text import public_uri

logger = logger_for(__name__)


def read_manifest_files(config: JobConfig) -> list[ManifestFile]:
    """The footers of every manifest file ``config.manifest`` names, sorted, leaving out anything under the job's
    output (`ManifestError` when there are none, or when the manifest lies inside the output)."""
    if config.manifest is None:
        raise ValueError(f"{option_at(JobConfig, 'manifest').flag} is required")
    options = config.storage_options
    paths = list_manifest_paths(config.manifest, storage_options=options, exclude=config.output)
    files = [read_footer(uri, relpath, storage_options=options) for uri, relpath in paths]
    warn_unknown_columns(files)
    return files


def warn_unknown_columns(files: list[ManifestFile]) -> None:
    """One warning naming the columns of ``files`` that the contract does not know (ignored: a misspelled
    ``steps`` would render at the default), each with the column it most likely means."""
    unknown = unknown_columns([name for file in files for name in file.schema.names], list(COLUMNS_BY_NAME))
    if unknown:
        holding = [public_uri(file.uri) for file in files if set(file.schema.names) & set(unknown)]
        logger.warning(
            "ignoring manifest column(s) that are not in the contract: %s (in %d file(s), first %s); README.md, "
            "Manifest columns, lists the known ones",
            describe_unknown(unknown),
            len(holding),
            holding[0],
        )


def run_settings(config: JobConfig, pinned: DatasetSettings | None) -> tuple[DatasetSettings, str]:
    """This run's output settings (the flags, else what the output pinned, else the defaults) and the URI of the
    manifest it reads.

    The manifest is pinned as `manifest_location` gives it, so the same files named from another working
    directory, or by an absolute path, are the same manifest, and without user, password, query or fragment
    (`schemas.text.public_uri`): what an output records never holds a credential. The URI read is the one
    given, credentials included, else the pinned one. Raises ValueError when a flag contradicts what the
    output pinned (naming both), or when a new output is given no manifest.
    """
    options = config.storage_options
    if pinned is not None:
        pinned = dataclasses.replace(pinned, manifest=manifest_location(pinned.manifest, storage_options=options))
    if config.manifest is None and pinned is None:
        raise ValueError(
            f"{option_at(JobConfig, 'manifest').flag} is required: {config.output} has no manifest pinned yet "
            "(a later run on an output may leave it out)"
        )
    given = None if config.manifest is None else manifest_location(config.manifest, storage_options=options)
    wanted = DatasetSettings(
        manifest=public_uri(given) if given is not None else pinned.manifest,
        output_format=config.output_format or (pinned.output_format if pinned else FORMAT_FILES),
        shard_rows=config.shard_rows or (pinned.shard_rows if pinned else DEFAULT_SHARD_ROWS),
        ids_checked=pinned.ids_checked if pinned else "",
        corrections_applied=pinned.corrections_applied if pinned else "",
    )
    if pinned is not None and not config.overwrite:
        conflicts = pinned.conflicts(wanted)
        if conflicts:
            raise ValueError(
                f"{config.output} was rendered with other settings ({'; '.join(conflicts)}): its shards would be cut "
                "or written differently. Use the output's settings, another --output, or --overwrite to start over."
            )
    return wanted, given or wanted.manifest
