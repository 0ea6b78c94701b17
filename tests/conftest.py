"""Shared fixtures: tiny offline models, a local Ray with 2 logical GPUs, a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.dev.tiny_models import build_tiny_models
from schemas.resources import StageResources

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory holding prior/, decoder/, decoder-inpaint/, controlnet-depth/, depth/ (seed 0, MoVQ scale 2)."""
    root = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_models(str(root))
    return str(root)


# One CLIP and one decoder actor unless a test asks for more: each model actor imports torch and diffusers
# (~7 CPU-seconds here), and 2 cores start 4 of them in ~15 s. Tests of the defaults and of actor counts
# build their configs themselves.
FEW_ACTORS = {"prior": StageResources(num_actors=1), "decoder": StageResources(num_actors=1)}


@pytest.fixture(scope="session")
def ray_two_gpus() -> Iterator[None]:
    """A local Ray owned by this test process, declaring 2 logical GPUs; shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": a new Ray of its own, whatever /tmp/ray/ray_current_cluster says about earlier heads
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a real HTTP endpoint, as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3_options(s3_endpoint: str) -> dict:
    """fsspec storage options reaching the loopback endpoint, plus a fresh bucket name in ``bucket``."""
    import uuid

    import s3fs

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    return {"bucket": bucket, "options": options}


def write_manifest(path: Path | str, rows: list[dict], schema: pa.Schema | None = None) -> str:
    """Write ``rows`` as a Parquet manifest; returns the path as a string."""
    if schema is None:  # from_pylist would take the columns of the first row only
        names = list(dict.fromkeys(name for row in rows for name in row))
        rows = [{name: row.get(name) for name in names} for row in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return str(path)
