"""Retries of transient storage errors: exponential backoff with full jitter, bounded in attempts and time.

Object stores answer ``503 SlowDown``, 500s and throttling under load and drop connections; s3fs and
botocore already retry some of these a few times inside one call (s3fs: 5 attempts of a request on
``SlowDown``, connection and payload errors; botocore: up to 5 attempts on 5xx, throttling and
connection errors). What still escapes them (a HEAD's bare 503, a body cut short, a longer storm)
is retried here, around whole operations, which every caller makes idempotent. Only transient
errors are retried (`is_transient`); a missing object, a refused permission or a bad request
raises at once. When the attempts or the time run out, `StorageUnavailableError` names the object.

Bounds, per operation: ``KANDINSKY_RENDER_STORAGE_ATTEMPTS`` (default 6) attempts and
``KANDINSKY_RENDER_STORAGE_RETRY_SECONDS`` (default 120) seconds from the first attempt to the
start of the last one (so an operation gives up at most one attempt's duration after that).
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from schemas.loggers import logger_for
from schemas.text import first_line

logger = logger_for(__name__)

T = TypeVar("T")

ATTEMPTS_ENV = "KANDINSKY_RENDER_STORAGE_ATTEMPTS"
SECONDS_ENV = "KANDINSKY_RENDER_STORAGE_RETRY_SECONDS"

# Error codes of S3 (and S3-compatible stores) that mean "try again later".
TRANSIENT_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
        "ServiceUnavailable", "ServiceUnavailableException", "XAmzContentSHA256Mismatch", "BadDigest",
        "500", "502", "503", "504",
    }
)  # fmt: skip
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Exception classes (by name, anywhere in the class hierarchy) of the HTTP stacks fsspec filesystems
# use (botocore, aiohttp, urllib3/requests, fsspec) that mean the connection or the transfer failed.
TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
        "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError", "ResponseParserError",
        "FlexibleChecksumError", "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
        "ClientOSError", "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError",
        "ChunkedEncodingError", "RemoteDisconnected", "ContentLengthError", "TruncatedReadError",
    }
)  # fmt: skip
# errno values s3fs gives translated 5xx answers (EBUSY: 503, EREMOTEIO: 500) and the network's own.
TRANSIENT_ERRNO = frozenset(
    {errno.EBUSY, errno.EREMOTEIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}
)
PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


class StorageUnavailableError(OSError):
    """A storage operation kept failing with transient errors until its retries ran out; the message names it."""


class StorageFullError(StorageUnavailableError):
    """A write found no space left (ENOSPC, EDQUOT): the job stops naming the file; never retried."""


# A full disk or an exhausted quota: writing again will not help, and no row is to blame.
NO_SPACE_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota."""
    return any(isinstance(link, OSError) and link.errno in NO_SPACE_ERRNO for link in _chain(exc))


class TruncatedReadError(OSError):
    """An object arrived with fewer (or more) bytes than its size: a dropped connection, retried."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long one operation is retried: attempts, total seconds and the backoff's base and cap."""

    attempts: int = 6
    total_s: float = 120.0
    base_s: float = 0.5
    max_delay_s: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.total_s < 0 or self.base_s < 0 or self.max_delay_s < 0:
            raise ValueError(f"storage retries: attempts must be >= 1 and seconds >= 0, got {self}")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy `ATTEMPTS_ENV` and `SECONDS_ENV` set (defaults where unset)."""
        attempts, seconds = os.environ.get(ATTEMPTS_ENV), os.environ.get(SECONDS_ENV)
        try:
            return cls(
                attempts=int(attempts) if attempts else cls.attempts,
                total_s=float(seconds) if seconds else cls.total_s,
            )
        except ValueError as exc:
            raise ValueError(f"{ATTEMPTS_ENV} / {SECONDS_ENV}: {exc}") from exc

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds before the next attempt after ``failures`` failed ones: full jitter over base x 2**(n-1)."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_s * 2 ** (failures - 1)))


def _chain(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and len(found) < 8 and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, StorageUnavailableError):
        return False  # an inner operation already gave up: do not multiply the wait
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & TRANSIENT_CLASSES or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS
    for attribute in ("status", "code"):  # aiohttp ClientResponseError, gcsfs HttpError
        value = getattr(exc, attribute, None)
        if isinstance(value, int) and value in TRANSIENT_STATUS:
            return True
    return isinstance(exc, OSError) and type(exc) is OSError and exc.errno in TRANSIENT_ERRNO


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: throttling, 5xx, dropped or timed-out connections, short reads.

    Never a missing object (404), a refused permission (403), an existing object of a conditional
    write, or a `StorageUnavailableError` (retries already spent).
    """
    if isinstance(exc, PERMANENT) or not isinstance(exc, Exception):
        return False
    return any(_transient_one(link) for link in _chain(exc))


class Retrier:
    """The retry budget of one operation: call `failed` with each error; it sleeps, or raises when done."""

    def __init__(
        self, what: str, *, policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.what = what
        self.policy = policy or RetryPolicy.from_env()
        self.sleep = sleep
        self.failures = 0
        self.started = time.monotonic()
        self._rng = random.Random()

    def failed(self, exc: BaseException) -> None:
        """Sleep before the next attempt if ``exc`` is transient and the budget allows; else raise."""
        if not is_transient(exc):
            raise exc
        self.failures += 1
        elapsed = time.monotonic() - self.started
        delay = self.policy.delay(self.failures, self._rng)
        if self.failures >= self.policy.attempts or elapsed + delay > self.policy.total_s:
            raise StorageUnavailableError(
                f"{self.what}: the storage kept failing ({self.failures} attempt(s) over {elapsed:.0f} s, "
                f"last: {type(exc).__name__}: {first_line(exc)}). Check that the store is reachable and not "
                f"throttling (or raise {ATTEMPTS_ENV} / {SECONDS_ENV}); a rerun finishes the work"
            ) from exc
        logger.info("%s: %s: %s; retrying in %.1f s", self.what, type(exc).__name__, first_line(exc), delay)
        self.sleep(delay)


def retry(operation: Callable[[], T], *, what: str, policy: RetryPolicy | None = None) -> T:
    """``operation()``, retried on transient errors (see the module docstring); ``what`` names it in errors."""
    retrier = Retrier(what, policy=policy)
    while True:
        try:
            return operation()
        except Exception as exc:  # noqa: BLE001 - `failed` re-raises what is not transient
            retrier.failed(exc)
