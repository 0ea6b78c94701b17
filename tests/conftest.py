"""Shared fixtures: tiny offline models, a local Ray with 2 logical GPUs, a real S3 endpoint on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# One torch (OpenMP) thread per process: the suite runs two workers on two cores beside Ray's actors (one thread
# each: Ray sets it from their one-CPU reservation), and threads that outnumber the cores spin-wait for each other
# (8% of the CPU time of a two-module run here). The equality tests pass with it: renders made in this process
# and in Ray's actors now both run one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from jobs.dev.tiny_models import build_tiny_models
from tests.helpers.places import free_port


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory holding prior/, decoder/, decoder-inpaint/, controlnet-depth/, depth/ (seed 0, MoVQ scale 2)."""
    root = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_models(str(root))
    return str(root)


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


# Modules whose tests carry these marks run first (in this order), the rest after, each module kept whole: with
# `-n 2 --dist loadfile` the longest modules (own clusters, kills and waits) start at once instead of last,
# so the workers finish together instead of one waiting on the other's tail.
FIRST_MARKS = ("cluster", "fault", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run heavy modules first (`FIRST_MARKS`), keeping the collection order within each module and each rank."""
    rank: dict[str, int] = {}
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        found = min((i for i, name in enumerate(FIRST_MARKS) if name in marks), default=len(FIRST_MARKS))
        rank[item.module.__name__] = min(rank.get(item.module.__name__, found), found)
    order = {item.nodeid: index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank[item.module.__name__], order[item.nodeid]))
