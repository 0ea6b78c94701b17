"""Checkpoints on object storage load at one version per run: the driver pins each (ETags, S3 VersionIds), every actor
loads that version, a cached copy is verified before use, odd keys are refused before Ray starts naming them, folder
markers are left out, and a sync that fails on an actor reaches the driver as one line naming the setting in use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.pins import Pin, pin_checkpoint
from actors.weights import CheckpointChangedError, sync_checkpoint
from jobs.execution.chain import build_chain
from jobs.job import run_job
from tests.helpers.cli import in_process
from tests.helpers.rows import config_for, raw_results, rows_of, write_manifest

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"


def upload(s3: dict, tiny_models: str, *names: str, versioned: bool = False) -> tuple[Any, str]:
    """The tiny checkpoints ``names`` under ``s3://<bucket>/models/``; (the s3fs filesystem, the models URI)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3["options"])
    if versioned:
        fs.make_bucket_versioned(s3["bucket"])
    for name in names:
        fs.put(str(Path(tiny_models) / name), f"{s3['bucket']}/models/{name}", recursive=True)
    return fs, f"s3://{s3['bucket']}/models"


def put_key(fs: Any, bucket: str, key: str, body: bytes) -> None:
    """An object under exactly ``key`` (s3fs would normalise a trailing '/', '//' or '..')."""
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body)


def storage_flags(options: dict) -> list[str]:
    """``--storage-option KEY=VALUE`` flags giving ``options`` (VALUE as JSON)."""
    return [part for name, value in options.items() for part in ("--storage-option", f"{name}={json.dumps(value)}")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_version_pinned_by_the_driver_is_what_an_actor_loads_after_the_store_changed(
    tiny_models: str, s3_options: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bucket that keeps versions: the decoder's scheduler config is replaced after the driver pinned the run's
    version and before any actor starts (as for an actor restarted or added late); every actor reads the pinned
    version by its VersionId, the run says the store changed, and the next run loads the new one."""
    fs, models = upload(s3_options, tiny_models, "prior", "decoder", versioned=True)
    key = f"{s3_options['bucket']}/models/decoder/{SCHEDULER}"
    original = fs.cat(key)
    changed = original.replace(b'"steps_offset": 1', b'"steps_offset": 0')
    assert changed != original
    cache = tmp_path / "cache"

    def build(config: Any, **chain: Any) -> Any:  # runs after the models were checked and pinned
        fs.pipe(key, changed)
        return build_chain(config, **chain)

    manifest = write_manifest(tmp_path / "m.parquet", rows_of(2))
    config = config_for(manifest, str(tmp_path / "out"), models, runner="local", storage_options=s3_options["options"])
    config = dataclasses.replace(config, models=dataclasses.replace(config.models, cache=str(cache)))
    caplog.set_level(logging.WARNING, logger="kandinsky_render.jobs.planning.availability")
    run_job(config, build=build)
    assert {row["status"] for row in raw_results(config.output)} == {"ok"}
    (copy,) = cache.glob("decoder@*/[0-9a-f]*")
    assert (copy / SCHEDULER).read_bytes() == original  # the version pinned before the change
    assert re.search(r"models/decoder changed on the store during this run \(1 file\(s\) differ, first scheduler/",
                     caplog.text)  # fmt: skip

    again = dataclasses.replace(config, output=str(tmp_path / "again"))
    run_job(again)  # pins the store's version now
    copies = {path.name: path for path in cache.glob("decoder@*/[0-9a-f]*")}
    assert len(copies) == 2 and (copies.keys() - {copy.name}).pop()
    (new,) = [path for name, path in copies.items() if name != copy.name]
    assert (new / SCHEDULER).read_bytes() == changed
    assert (new / WEIGHTS).stat().st_ino == (copy / WEIGHTS).stat().st_ino  # unchanged files linked, not fetched


def test_a_pinned_version_gone_from_a_store_without_versions_fails_the_sync_naming_the_file(
    tiny_models: str, s3_options: dict, tmp_path: Path
) -> None:
    """Without bucket versioning an overwritten object's old bytes are gone: a node holding the pinned copy still
    loads it; a node without one cannot load what its peers load, and says so instead of loading newer weights."""
    fs, models = upload(s3_options, tiny_models, "decoder")
    uri, options = f"{models}/decoder", s3_options["options"]
    pin = pin_checkpoint(uri, options)
    assert all(file.version_id is None and file.tag for file in pin.files)
    held = sync_checkpoint(uri, storage_options=options, cache=str(tmp_path / "held"), pin=pin)
    fs.pipe(f"{s3_options['bucket']}/models/decoder/{WEIGHTS}", b"newer weights")

    again = sync_checkpoint(uri, storage_options=options, cache=str(tmp_path / "held"), pin=pin)
    assert (again.path, again.downloaded) == (held.path, False)
    with pytest.raises(CheckpointChangedError) as raised:
        sync_checkpoint(uri, storage_options=options, cache=str(tmp_path / "fresh"), pin=pin)
    message = str(raised.value)
    assert f"{uri}/{WEIGHTS} changed on the store after this run pinned it" in message
    assert "keeps no older version of it (S3: versioning is off)" in message and "\n" not in message
    assert not [path for path in (tmp_path / "fresh").rglob("*") if path.is_file() and path.name != ".lock"]


def test_a_pinned_version_deleted_from_a_versioned_bucket_fails_the_sync_naming_the_file(
    tiny_models: str, s3_options: dict, tmp_path: Path
) -> None:
    fs, models = upload(s3_options, tiny_models, "decoder", versioned=True)
    uri, options, bucket = f"{models}/decoder", s3_options["options"], s3_options["bucket"]
    pin = pin_checkpoint(uri, options)
    (pinned,) = [file for file in pin.files if file.path == SCHEDULER]
    assert pinned.version_id
    fs.pipe(f"{bucket}/models/decoder/{SCHEDULER}", b"{}")
    fs.call_s3("delete_object", Bucket=bucket, Key=f"models/decoder/{SCHEDULER}", VersionId=pinned.version_id)
    with pytest.raises(CheckpointChangedError, match=f"{uri}/{SCHEDULER} changed on the store after this run pinned "
                       r"it \(its pinned version is gone\), so this node cannot load"):  # fmt: skip
        sync_checkpoint(uri, storage_options=options, cache=str(tmp_path / "cache"), pin=pin)


def test_a_cached_file_that_no_longer_matches_its_record_is_fetched_again(
    tiny_models: str, s3_options: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncated cached file was reused forever (only the remote listing was compared with the record): now each
    use checks sizes and modification times, and hashes the copy whole after `VERIFY_EVERY_S`."""
    from actors import weights

    _, models = upload(s3_options, tiny_models, "decoder")
    uri, options, cache = f"{models}/decoder", s3_options["options"], str(tmp_path / "cache")
    pin = pin_checkpoint(uri, options)
    copy = Path(sync_checkpoint(uri, storage_options=options, cache=cache, pin=pin).path)
    expected = sha256(Path(tiny_models) / "decoder" / WEIGHTS)

    with open(copy / WEIGHTS, "r+b") as handle:  # truncated
        handle.truncate(100)
    synced = sync_checkpoint(uri, storage_options=options, cache=cache, pin=pin)
    assert synced.downloaded and synced.path == str(copy) and sha256(copy / WEIGHTS) == expected

    stat = (copy / WEIGHTS).stat()
    with open(copy / WEIGHTS, "r+b") as handle:  # the same size and modification time, other bytes
        handle.seek(1000)
        handle.write(b"\xff" * 8)
    os.utime(copy / WEIGHTS, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not sync_checkpoint(uri, storage_options=options, cache=cache, pin=pin).downloaded  # checked in between
    monkeypatch.setattr(weights, "VERIFY_EVERY_S", 0.0)  # the whole check is due
    assert sync_checkpoint(uri, storage_options=options, cache=cache, pin=pin).downloaded
    assert sha256(copy / WEIGHTS) == expected


def test_folder_markers_are_left_out(tiny_models: str, s3_options: dict, tmp_path: Path) -> None:
    """Zero-byte ``prefix/`` keys (the S3 console's "Create folder") passed the model check and then failed the sync
    after Ray started ("would land outside the checkpoint's folder"); they are not files, nor Hadoop's markers."""
    fs, models = upload(s3_options, tiny_models, "prior", "decoder")
    bucket = s3_options["bucket"]
    for key in ("models/decoder/", "models/decoder/unet/", "models/decoder/old_$folder$", "models/prior/tokenizer/"):
        put_key(fs, bucket, key, b"")
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    config = config_for(manifest, str(tmp_path / "out"), models, runner="local", storage_options=s3_options["options"])
    run_job(dataclasses.replace(config, models=dataclasses.replace(config.models, cache=str(tmp_path / "cache"))))
    assert [row["status"] for row in raw_results(config.output)] == ["ok"]
    pin = pin_checkpoint(f"{models}/decoder", s3_options["options"])
    assert sorted(file.path for file in pin.files) == sorted(
        str(path.relative_to(Path(tiny_models) / "decoder")) for path in (Path(tiny_models) / "decoder").rglob("*")
        if path.is_file()
    )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("unet/../model_index.json", "has an empty, '.' or '..' path segment"),
        ("unet//config.json", "has an empty, '.' or '..' path segment"),
        ("./model_index.json", "has an empty, '.' or '..' path segment"),
        ("movq", "is also the folder of"),
        ("notes/", "ends with '/' but holds 4 bytes"),
    ],
)
def test_odd_keys_are_refused_before_ray_starts_naming_the_key(
    tiny_models: str, s3_options: dict, tmp_path: Path, capsys: pytest.CaptureFixture, key: str, named: str
) -> None:
    """Keys with ``a/../b``, ``//`` or ``./`` fetched another key and failed without naming it; a key beside a folder
    of the same name failed with FileExistsError on every actor. Now the model check refuses them, exit status 2."""
    fs, models = upload(s3_options, tiny_models, "prior", "decoder")
    put_key(fs, s3_options["bucket"], f"models/decoder/{key}", b"odd!")
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    options = storage_flags(s3_options["options"])
    result = in_process(capsys, "render", "--manifest", manifest, "--output", str(tmp_path / "out"), "--models",
                        models, "--runner", "local", *options)  # fmt: skip
    assert result.code == 2, result.err
    assert f"'{s3_options['bucket']}/models/decoder/{key}'" in result.err and named in result.err
    assert "--decoder PATH" in result.err and not (tmp_path / "out" / "results").exists()


@pytest.mark.usefixtures("ray_two_gpus")
def test_a_sync_failure_on_an_actor_reaches_the_driver_as_one_line_naming_the_flag_in_use(
    tiny_models: str, s3_options: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Any sync failure on an actor (a full cache, here a cache folder that cannot be made) ended in a 1.9 KB line of
    Ray traceback with terminal colours, naming $KANDINSKY_RENDER_CACHE although --model-cache was given."""
    _, models = upload(s3_options, tiny_models, "prior", "decoder")
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    manifest = write_manifest(tmp_path / "m.parquet", rows_of(1))
    options = storage_flags(s3_options["options"])
    result = in_process(capsys, "render", "--manifest", manifest, "--output", str(tmp_path / "out"), "--models",
                        models, "--model-cache", str(cache), "--progress", "off", *options)  # fmt: skip
    assert result.code == 1, result.err
    (line,) = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert re.fullmatch(
        rf"error: stage [\w ()]+: no actor could start: {models}/\w+: cannot sync it into the model cache {cache} "
        r"\(--model-cache\) on node \S+: NotADirectoryError: .*",
        line,
    ), line
    assert "\x1b[" not in result.err and "Traceback" not in result.err and "KANDINSKY_RENDER_CACHE" not in result.err
    assert len(line) < 600


def test_the_pins_reach_every_model_stage(tiny_models: str, tmp_path: Path) -> None:
    """Each stage gets the pins of the checkpoints it loads (only theirs: a kept actor serves a later run only with
    equal arguments), so an actor Ray restarts or adds late loads the same version."""
    config = config_for(
        str(tmp_path / "m.parquet"), str(tmp_path / "out"), "s3://b/models", score="clip", layout="one-process"
    )
    pins = {f"s3://b/models/{name}": Pin(uri=f"s3://b/models/{name}", revision=name) for name in ("prior", "decoder")}
    stages, _ = build_chain(config, modes=["text2img"], needs_depth=False, movq_scales={}, output_format="files",
                            run_id="r", cluster_gpus=0.0, pins=pins)  # fmt: skip
    given: dict[str, Callable] = {spec.name: spec.kwargs["pins"] for spec in stages}
    assert given == {
        "prior": {"s3://b/models/prior": pins["s3://b/models/prior"]},
        "decoder": {"s3://b/models/decoder": pins["s3://b/models/decoder"]},
        "score": {"s3://b/models/prior": pins["s3://b/models/prior"]},
    }


def test_a_hub_id_is_pinned_to_the_commit_its_revision_resolves_to(
    tiny_models: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, the hub cache's ``refs/main`` names the commit; every actor loads the pinned one (``revision=``)."""
    import shutil

    from huggingface_hub import constants

    from jobs.planning.availability import checkpoint_state

    repo = tmp_path / "hub" / "models--kandinsky-community--kandinsky-2-2-decoder"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (repo / "refs").mkdir(parents=True)
    for commit in ("1" * 40, "2" * 40):
        shutil.copytree(Path(tiny_models) / "decoder", repo / "snapshots" / commit)
        (repo / "refs" / "main").write_text(commit)
        state = checkpoint_state("kandinsky-community/kandinsky-2-2-decoder", index_file="model_index.json")
        assert state == (None, Pin(uri="kandinsky-community/kandinsky-2-2-decoder", revision=commit))


def test_a_failed_sync_names_the_setting_that_chose_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from schemas.models import CACHE_ENV, cache_setting

    monkeypatch.setenv(CACHE_ENV, "/mnt/cache")
    assert (cache_setting("/given"), cache_setting(None)) == ("--model-cache", f"${CACHE_ENV}")
    monkeypatch.delenv(CACHE_ENV)
    assert cache_setting(None) == f"the default; --model-cache DIR or ${CACHE_ENV} chooses another"
