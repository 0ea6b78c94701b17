"""Connecting the driver to Ray: join the cluster the user named, or start a private local Ray."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

from schemas.config import JobConfig
from schemas.loggers import logger_for

logger = logger_for(__name__)

CONNECT_WAIT_S = JobConfig.__dataclass_fields__["connect_wait_s"].default  # --connect-wait's default
DEFAULT_GCS_PORT = 6379
PRIVATE_RAY_OPTIONS: dict = {"_system_config": {"enable_worker_prestart": False}}


class RayUnreachableError(ConnectionError):
    """The Ray address the user gave does not answer; the message names it and what to check."""


def connect_ray(address: str | None, *, wait_s: float = CONNECT_WAIT_S) -> bool:
    """Connect to Ray unless already connected; returns True when this call started Ray.

    ``address`` (else ``RAY_ADDRESS``) joins a running cluster: ``auto`` the local head that
    ``ray start`` recorded, anything else that address, which must accept a TCP connection within
    ``wait_s`` seconds (`RayUnreachableError` otherwise: Ray itself would wait for many minutes).
    Without either a private local Ray starts, whatever earlier heads left on this machine.
    """
    import ray

    if ray.is_initialized():
        return False
    target = resolve_address(address, wait_s=wait_s)
    main = threading.current_thread() is threading.main_thread()
    # ray.init replaces the SIGTERM handler with one that exits with status 15 (sys.exit(15)): the
    # driver's own handler (jobs.render: exit 143 after releasing the lease) is put back.
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if target is None:
            # Only the processes a job needs: no dashboard (nobody can reach a private Ray's), no prestarted
            # idle workers (each actor gets its own process anyway; idle ones only take CPU from the first actors).
            ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False, **PRIVATE_RAY_OPTIONS)
        else:
            ray.init(address=target, logging_level=logging.WARNING)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return True


def check_address(address: str | None, *, wait_s: float = CONNECT_WAIT_S) -> None:
    """Fail fast, before any planning: `RayUnreachableError` unless Ray is connected or ``address`` answers."""
    import ray

    if not ray.is_initialized():
        resolve_address(address, wait_s=wait_s)


def resolve_address(address: str | None, *, wait_s: float = CONNECT_WAIT_S) -> str | None:
    """The address to join (checked to answer), or None for a private local Ray; see `connect_ray`.

    Raises `RayUnreachableError` (a ConnectionError) naming the address and what to check.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        return None
    if address != "auto":
        check_reachable(address, wait_s=wait_s)
        return address
    recorded = _local_head()
    if recorded is None:
        raise RayUnreachableError(
            "--address auto: no local Ray head is recorded (`ray start --head` writes its address to "
            "ray_current_cluster in Ray's temp folder, $RAY_TMPDIR/ray or /tmp/ray). Start one with "
            "`ray start --head`, give its address, or leave out --address and RAY_ADDRESS to start a private "
            "local Ray."
        )
    if not recorded:
        return "auto"
    check_reachable(recorded, wait_s=wait_s, given=f"--address auto (the local head recorded at {recorded})")
    return recorded


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) a Ray address points at (``host:port``, ``ray://host:port``, ``http://host:port``), or None."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    if port is None:
        port = {"ray": 10001, "http": 80, "https": 443}.get(parts.scheme, DEFAULT_GCS_PORT)
    return parts.hostname, port


def check_reachable(address: str, *, wait_s: float = CONNECT_WAIT_S, given: str | None = None) -> None:
    """Raise `RayUnreachableError` unless ``address`` accepts a TCP connection within ``wait_s`` seconds."""
    target = host_port(address)
    if target is None:
        return  # not a form we can check: let Ray say what it makes of it
    host, port = target
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.5, wait_s))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RayUnreachableError(
                    f"cannot reach the Ray cluster at {given or address}: nothing accepted a connection on "
                    f"{host}:{port} for {wait_s:.0f} s ({type(exc).__name__}: {exc}). Check that the cluster is "
                    f"up (`ray status --address {host}:{port}` on a machine of the cluster), that {port} is its "
                    "GCS port (`ray start --head --port`, default 6379; `ray://` addresses use the client "
                    "server's port, default 10001), that RAY_ADDRESS holds what you meant (unset it and leave "
                    "out --address to start a private local Ray), and that no firewall blocks the port."
                ) from exc
            time.sleep(1.0)


def _local_head() -> str | None:
    """The address of the local head ``ray start`` recorded in Ray's temp folder (``$RAY_TMPDIR/ray``, default
    ``/tmp/ray``), None when there is none, ``""`` when it cannot be told (then ``ray.init("auto")`` decides).

    Only the recorded head counts: not Ray's legacy fallback of any GCS process that ``ps`` shows,
    which on a shared machine may be someone else's.
    """
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # a private Ray helper: when it moves, let ray.init decide
        return ""
    return read_ray_address() or None
