"""The output lease: at most one run renders into an output prefix at a time.

``OUTPUT/_LEASE.json`` names the holder (run id, host, pid) and when the lease expires. It is
created with an exclusive write (O_EXCL locally, a conditional put on object stores), renewed by a
heartbeat thread, and deleted when the run ends. A lease left by a crashed run is taken over once
it expires, or at once when its holder was a process on this host that no longer exists. After
every acquisition and renewal the holder reads the lease back, so a lost race is noticed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from actors.retry import StorageUnavailableError
from actors.storage import Storage
from schemas.keys import LEASE_FILE
from schemas.loggers import logger_for

logger = logger_for(__name__)


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease; the message names it and when it expires."""


class Lease:
    """Context manager holding ``OUTPUT/_LEASE.json`` for one run (see module docstring)."""

    def __init__(self, storage: Storage, *, run_id: str, ttl_s: float = 120.0, wait_s: float = 0.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl_s}")
        self.storage = storage
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def _record(self) -> bytes:
        now = time.time()
        record = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": now,
            "expires_at": now + self.ttl_s,
        }
        return json.dumps(record).encode()

    def read(self) -> dict[str, Any] | None:
        """The current lease record, or None when there is none (or it is unreadable).

        Raises `StorageUnavailableError` when the store does not answer: that says nothing about the lease.
        """
        try:
            return json.loads(self.storage.read_bytes(LEASE_FILE))
        except FileNotFoundError:
            return None
        except StorageUnavailableError:
            raise
        except (ValueError, OSError):
            return {"run_id": "<unreadable lease>", "expires_at": 0}

    def _stale(self, record: dict[str, Any]) -> bool:
        if record.get("expires_at", 0) < time.time():
            return True
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
            try:
                os.kill(record["pid"], 0)
            except ProcessLookupError:
                return True  # its process is gone: a crashed run on this machine
            except PermissionError:
                return False
        return False

    def acquire(self) -> None:
        """Take the lease, waiting up to ``wait_s`` seconds; raises `LeaseHeldError` if it stays held."""
        deadline = time.monotonic() + self.wait_s
        while True:
            # A conditional put retried after its answer was lost finds its own lease: reading it back tells.
            self.storage.create_exclusive(LEASE_FILE, self._record())
            if self._owned():
                break
            record = self.read()
            if record is not None and self._stale(record):
                logger.warning("taking over the stale lease of run %s", record.get("run_id"))
                self.storage.delete(LEASE_FILE)
                continue
            if record is None:
                continue
            if time.monotonic() >= deadline:
                expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("expires_at", 0)))
                raise LeaseHeldError(
                    f"another run is rendering into {self.storage.url}: run {record.get('run_id')} on host "
                    f"{record.get('host')} (pid {record.get('pid')}); its lease expires at {expires} unless renewed. "
                    "Rerun later, or pass --lease-wait SECONDS to wait for it."
                )
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _owned(self) -> bool:
        record = self.read()
        return record is not None and record.get("run_id") == self.run_id

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self._owned():
                    logger.error("run %s lost its lease on %s", self.run_id, self.storage.url)
                    self.lost.set()
                    return
                self.storage.write_bytes(LEASE_FILE, self._record())
            except Exception as exc:  # a transient storage error: retry at the next beat
                logger.warning("lease renewal failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owned():
            self.storage.delete(LEASE_FILE)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.release()
            return
        try:  # the run failed already: its error is the one to report, not a second one from the store
            self.release()
        except Exception as error:  # noqa: BLE001
            logger.warning("could not release the lease on %s: %s", self.storage.url, error)
