"""Where models come from and which a run needs: a model no rendering row needs never loads; a needed one that
cannot be loaded is named (folder, flag, hub id) before Ray starts; checkpoints on S3 are synced once per node;
the Hugging Face cache serves a machine without hub access."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from actors.storage import Storage
from jobs.dev.example import EXAMPLE_DIR
from jobs.job import run_job
from jobs.planning.run_plan import plan_run
from schemas.config import JobConfig
from schemas.models import HUB_MODELS, ModelPaths
from tests.helpers.cli import clean_env, command
from tests.helpers.places import REPO, free_port
from tests.helpers.rows import write_manifest

STEPS = {"num_inference_steps": 2, "prior_num_inference_steps": 2, "height": 64, "width": 64}
HINT = str(Path(EXAMPLE_DIR) / "depth.png")
SOURCE = str(Path(EXAMPLE_DIR) / "source.png")


def text2img(n: int) -> list[dict]:
    return [{"id": f"t{i}", "mode": "text2img", "prompt": f"a fox {i}", "seed": i, **STEPS} for i in range(n)]


def controlnet(n: int, *, hint: str | None = HINT, **extra: object) -> list[dict]:
    return [
        {"id": f"c{i}", "mode": "controlnet", "prompt": "a robot", "image": SOURCE, "hint": hint, "seed": 10 + i}
        | STEPS
        | extra
        for i in range(n)
    ]


@pytest.fixture()
def models_without_depth(tiny_models: str, tmp_path: Path) -> str:
    """A models folder like the tiny models' but without depth/ (its other checkpoints linked, not copied)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in HUB_MODELS:
        if name != "depth":
            (folder / name).symlink_to(Path(tiny_models) / name)
    return str(folder)


@pytest.fixture()
def ray_tmpdir() -> Iterator[Path]:
    """A RAY_TMPDIR of the test's own: Ray, if a run started it, would leave its session folder under it."""
    folder = Path(tempfile.mkdtemp(prefix="krt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_cli(args: list[str], *, env: dict[str, str], drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = clean_env(drop=drop)
    full.update(env)
    return subprocess.run(
        [*command(module="jobs.render"), *args], cwd=REPO, capture_output=True, text=True, env=full, timeout=300
    )


def test_a_model_that_no_rendering_row_needs_never_loads(models_without_depth: str, tmp_path: Path) -> None:
    """``--models DIR`` without DIR/depth and ControlNet rows that all give their hint (issue 20.2): before, the
    depth stage started on a guess and its load error stopped the job; now it never starts and every row renders."""
    rows = text2img(2) + controlnet(2)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = JobConfig(
        manifest=manifest,
        output=str(tmp_path / "out"),
        models=ModelPaths.resolve(models_dir=models_without_depth),
        runner="local",
    )
    summary = run_job(config)
    assert summary.stats["output"]["by_status"] == {"ok": 4}
    assert "depth" not in summary.stats["stages"]["stages"]


# A nested column before ``hint``: Parquet row groups index leaf columns, not the schema's fields.
SCHEMA = pa.schema(
    [("id", pa.string()), ("image_embeds", pa.list_(pa.float32())), ("mode", pa.string()), ("prompt", pa.string())]
    + [("image", pa.string()), ("hint", pa.string()), ("seed", pa.int64())]
    + [(name, pa.int64()) for name in STEPS]
)


def scan_of(tmp_path: Path, rows: list[dict], models: str) -> bool:
    """Whether a run over ``rows`` starts the depth stage (planning and model checks only)."""
    from jobs.planning.availability import check_models

    rows = [{name: row.get(name) for name in SCHEMA.names} for row in rows]
    manifest = write_manifest(tmp_path / f"m{len(list(tmp_path.glob('m*.parquet')))}.parquet", rows, SCHEMA)
    config = JobConfig(manifest=manifest, output=str(tmp_path / "o"), models=ModelPaths.resolve(models_dir=models))
    plan = plan_run(config, Storage(config.output))
    return check_models(plan, plan.scan()).needs_depth


def test_the_depth_stage_starts_only_for_controlnet_rows_that_render_without_a_hint(
    tiny_models: str, tmp_path: Path
) -> None:
    assert not scan_of(tmp_path, text2img(2) + controlnet(2), tiny_models)
    assert not scan_of(tmp_path, text2img(1) + controlnet(2, hint=None, prompt=None), tiny_models)  # refused rows
    assert not scan_of(tmp_path, text2img(1) + controlnet(1, hint=None, height=66), tiny_models)  # unsupported size
    assert scan_of(tmp_path, text2img(1) + controlnet(1) + controlnet(1, hint=None, id="x"), tiny_models)


def test_a_needed_model_that_is_missing_is_named_before_ray_starts(
    models_without_depth: str, tmp_path: Path, ray_tmpdir: Path
) -> None:
    manifest = write_manifest(tmp_path / "m.parquet", text2img(1) + controlnet(1, hint=None))
    output = tmp_path / "out"
    args = ["--manifest", manifest, "--output", str(output), "--models", models_without_depth]
    proc = run_cli(args, env={"RAY_TMPDIR": str(ray_tmpdir), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    for named in (f"{models_without_depth}/depth does not exist", "--depth-model", "--models", HUB_MODELS["depth"]):
        assert named in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (ray_tmpdir / "ray").exists(), "Ray was started"
    assert not (output / "results").exists()


def closed_port() -> int:
    port = free_port()
    with socket.socket() as sock:  # nothing listens there: connections are refused at once
        sock.bind(("127.0.0.1", port))
    return port


@pytest.mark.parametrize(
    ("extra", "hub"),
    [([], "unreachable"), (["--dry-run"], "unreachable"), ([], "offline"), (["--dry-run"], "offline")],
    ids=["render-hub-unreachable", "dry-run-hub-unreachable", "render-offline", "dry-run-offline"],
)
def test_without_hub_access_or_models_a_run_fails_fast_naming_the_models(
    extra: list[str], hub: str, tmp_path: Path, ray_tmpdir: Path
) -> None:
    """No --models and no way to the hub (HF_HUB_OFFLINE, or a hub that does not answer): before, a render
    failed after minutes of retries with a raw traceback and a dry run printed a plan; now both exit 2 at once."""
    manifest = write_manifest(tmp_path / "m.parquet", text2img(1))
    env = {"RAY_TMPDIR": str(ray_tmpdir), "HF_HOME": str(tmp_path / "hf")}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # online mode, but the hub endpoint refuses connections (no download can happen in a test)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    args = ["--manifest", manifest, "--output", str(tmp_path / "out"), *extra]
    proc = run_cli(args, env=env, drop=("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    for name, flag in (("prior", "--prior"), ("decoder", "--decoder")):
        assert f"- {name}, needed by" in proc.stderr and f"{flag} PATH" in proc.stderr
        assert HUB_MODELS[name] in proc.stderr
    assert "--models DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert "Retrying" not in proc.stderr  # no hub retries anywhere (they took 24 s per config file read)
    assert ("dry run: no model loaded" in proc.stdout) == bool(extra)  # a dry run still shows its plan
    assert "HF_HUB_OFFLINE is set" in proc.stderr if hub == "offline" else "cannot be reached" in proc.stderr
    assert not (ray_tmpdir / "ray").exists(), "Ray was started"


def fake_hub_cache(hf_home: Path, tiny_models: str, names: list[str]) -> None:
    """The Hugging Face cache layout (``hub/models--org--name/snapshots/<commit>/``, ``refs/main``) holding the tiny
    checkpoints under the public hub ids, as a machine that downloaded them earlier (or a mounted cache volume) has."""
    commit = "0" * 40
    for name in names:
        repo = hf_home / "hub" / f"models--{HUB_MODELS[name].replace('/', '--')}"
        shutil.copytree(Path(tiny_models) / name, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)


def test_the_hub_cache_serves_a_machine_without_hub_access(tiny_models: str, tmp_path: Path) -> None:
    """No --models, HF_HUB_OFFLINE, the checkpoints in $HF_HOME's hub cache: the run checks them there and renders."""
    hf_home = tmp_path / "hf"
    fake_hub_cache(hf_home, tiny_models, ["prior", "decoder"])
    manifest = write_manifest(tmp_path / "m.parquet", text2img(2))
    output = tmp_path / "out"
    args = ["--manifest", manifest, "--output", str(output), "--runner", "local", "--progress", "off"]
    proc = run_cli(args, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "output now holds 2 ok and 0 error image(s)" in proc.stdout

    shutil.rmtree(
        hf_home / "hub" / f"models--{HUB_MODELS['decoder'].replace('/', '--')}" / "snapshots" / ("0" * 40) / "unet"
    )
    proc = run_cli([*args[:3], str(tmp_path / "out2"), *args[4:]], env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "lacks the component folder(s) unet" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture()
def counted_s3(s3_options: dict) -> Iterator[tuple[dict, list[tuple[str, str]]]]:
    """Storage options reaching moto through a proxy that records every request (method, path)."""
    from tests.helpers.faulty_proxy import Faults, FaultyProxy

    requests: list[tuple[str, str]] = []
    upstream = s3_options["options"]["client_kwargs"]["endpoint_url"]
    proxy = FaultyProxy(upstream, Faults(applies=lambda method, path: requests.append((method, path)) or False)).start()
    options = {**s3_options["options"], "client_kwargs": {"endpoint_url": proxy.url}}
    try:
        yield {"bucket": s3_options["bucket"], "options": options}, requests
    finally:
        proxy.stop()


def weight_gets(requests: list[tuple[str, str]], name: str) -> int:
    """GET requests of the checkpoint ``name``'s weight files (its downloads)."""
    return sum(
        1 for method, path in requests if method == "GET" and f"/models/{name}/" in path and ".safetensors" in path
    )


@pytest.mark.slow
@pytest.mark.usefixtures("ray_two_gpus")
def test_checkpoints_on_s3_are_synced_once_per_node(
    tiny_models: str, counted_s3: tuple[dict, list], tmp_path: Path
) -> None:
    """--models s3://...: the prior and two decoder actors on one node start together; each checkpoint's weights
    are downloaded once into the node's cache, later syncs download only what changed on storage."""
    import s3fs

    from actors.weights import sync_checkpoint
    from schemas.resources import StageResources

    s3, requests = counted_s3
    fs = s3fs.S3FileSystem(**s3["options"])
    for name in ("prior", "decoder"):
        fs.put(str(Path(tiny_models) / name), f"{s3['bucket']}/models/{name}", recursive=True)
    models = f"s3://{s3['bucket']}/models"
    cache = str(tmp_path / "cache")
    requests.clear()
    config = JobConfig(
        manifest=write_manifest(tmp_path / "m.parquet", text2img(4)),
        output=str(tmp_path / "out"),
        models=ModelPaths.resolve(models_dir=models, cache=cache),
        storage_options=s3["options"],
        prior=StageResources(num_actors=1, num_gpus=1),
        decoder=StageResources(num_actors=2, num_gpus=0.5),
        batch_size=2,
    )
    summary = run_job(config)
    assert summary.stats["output"]["by_status"] == {"ok": 4}
    assert summary.stats["stages"]["stages"]["decoder"]["num_actors"] == 2
    for name in ("prior", "decoder"):  # each weight file fetched once, whatever the number of actors
        files = [path for path in fs.find(f"{s3['bucket']}/models/{name}") if path.endswith(".safetensors")]
        assert weight_gets(requests, name) == len(files) > 0, name
    (copy,) = Path(cache).glob("decoder@*/[0-9a-f]*")  # <name>@<hash of the URI>/<version>
    assert (copy / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(Path(cache).glob("*/.tmp-*"))

    requests.clear()
    again = sync_checkpoint(f"{models}/decoder", storage_options=s3["options"], cache=cache)
    assert (again.path, again.downloaded) == (str(copy), False) and weight_gets(requests, "decoder") == 0
    fs.pipe(f"{s3['bucket']}/models/decoder/scheduler/scheduler_config.json", b'{"_class_name": "DDPMScheduler"}')
    changed = sync_checkpoint(f"{models}/decoder", storage_options=s3["options"], cache=cache)
    assert changed.downloaded and weight_gets(requests, "decoder") == 0  # only the changed file is fetched
    new = Path(changed.path)
    assert new.parent == copy.parent and new != copy  # a new version beside the one a loading process may read
    assert (new / "scheduler" / "scheduler_config.json").read_bytes() == b'{"_class_name": "DDPMScheduler"}'
    assert (new / "unet" / "diffusion_pytorch_model.safetensors").stat().st_ino == (
        copy / "unet" / "diffusion_pytorch_model.safetensors"
    ).stat().st_ino  # linked, not copied


def test_a_sync_that_cannot_fit_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache disk too small for the checkpoint: a clear ENOSPC naming the cache folder, no partial copy."""
    import errno

    import fsspec

    from actors import weights

    memory = fsspec.filesystem("memory")
    memory.pipe({"/ckpt/model_index.json": b"{}", "/ckpt/unet/weights.safetensors": b"\0" * 1000})
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6, 500))
    with pytest.raises(OSError, match="needs 1.0 kB but .* has 500 B free") as raised:
        weights.sync_checkpoint("memory://ckpt", cache=str(tmp_path))
    assert raised.value.errno == errno.ENOSPC
    key = weights.cache_key("memory://ckpt")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [key, f"{key}/{weights.LOCK}"]
