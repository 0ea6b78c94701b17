"""A fault-injecting HTTP proxy on loopback for tests: S3 503 SlowDown / 500 answers and dropped connections.

It can also serve ``Content-Encoding: gzip`` objects decompressed, as GCS's decompressive transcoding
does: a GET returns the decoded bytes while the object's metadata (HEAD, listings) keeps the
stored, compressed size.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import random
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jobs.dev.relay import RelayHandler

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTY</RequestId></Error>"
)
INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message><RequestId>FAULTY</RequestId></Error>"
)
# What a faulty answer is: a 503 SlowDown, a 500 InternalError, a connection reset before the request
# reaches the store, a reset after the store applied it (no answer), the answer cut off (``truncate``:
# halfway, its Content-Length says so; ``cut``: at a random point, sent without one, delimited by a clean close, so
# only a client that checks the object's size can tell).
KINDS = ("slow_down", "internal", "reset_before", "reset_after", "truncate", "cut")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(kw_only=True)
class Faults:
    """Which requests fail, and how: ``rate`` of the requests ``applies`` selects, kinds drawn by ``weights``."""

    rate: float = 0.0
    weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 1.0))
    applies: Callable[[str, str], bool] = lambda method, path: True  # (method, path) -> may this request fail
    seed: int = 0


class FaultyProxy:
    """Forwards HTTP/1.1 requests to ``upstream`` (host:port), failing some of them as `Faults` says.

    Started by `start` (a thread pool server on 127.0.0.1) and stopped by `stop`; ``counts`` holds the
    number of requests forwarded cleanly and of each fault kind injected.
    """

    def __init__(self, upstream: str, faults: Faults | None = None, *, transcode_gzip: bool = False) -> None:
        host, port = upstream.replace("http://", "").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.faults = faults or Faults()
        self.transcode_gzip = transcode_gzip
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._random = random.Random(self.faults.seed)
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def set(self, faults: Faults) -> None:
        """Change the faults from now on."""
        with self._lock:
            self.faults = faults
            self._random = random.Random(faults.seed)

    def cut_length(self, size: int) -> int:
        """Where a ``cut`` answer of ``size`` bytes stops: anywhere inside it (two cuts rarely agree)."""
        with self._lock:
            return self._random.randint(1, size - 1)

    def draw(self, method: str, path: str) -> str | None:
        """The fault for one request, or None to forward it cleanly."""
        with self._lock:
            faults = self.faults
            if not faults.applies(method, path) or self._random.random() >= faults.rate:
                self.counts["clean"] += 1
                return None
            kinds = [k for k, w in faults.weights.items() if w > 0]
            kind = self._random.choices(kinds, weights=[faults.weights[k] for k in kinds])[0]
            if kind == "slow_down" and method == "HEAD":
                kind = "internal"  # either way a 5xx; HEAD answers have no body to say SlowDown in
            self.counts[kind] += 1
            return kind


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (they gave up on a faulty answer) are part of the game, not errors."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(RelayHandler):
        def _reset(self) -> None:
            """Drop the connection with a TCP reset (SO_LINGER 0), answering nothing."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _error(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            upstream.close()
            return response, data

        def _serve(self) -> None:
            body = self._body()
            kind = proxy.draw(self.command, self.path)
            if kind == "slow_down":
                return self._error(503, SLOW_DOWN)
            if kind == "internal":
                return self._error(500, INTERNAL)
            if kind == "reset_before":
                return self._reset()
            response, data = self._forward(body)
            headers = response.getheaders()
            if proxy.transcode_gzip and self.command == "GET" and response.getheader("Content-Encoding") == "gzip":
                data = gzip.decompress(data)  # decompressive transcoding: the decoded bytes, a size that differs
                headers = [(name, value) for name, value in headers if name.lower() != "content-encoding"]
            if kind == "reset_after":  # the store applied the request; its answer never arrives
                return self._reset()
            if kind in ("truncate", "cut") and (len(data) < 2 or self.command == "HEAD"):
                return self._reset()  # nothing to cut: no answer at all
            self.send_response(response.status, response.reason)
            for name, value in headers:
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if kind == "cut":
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data[: proxy.cut_length(len(data))])
                self.close_connection = True
                return None
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                return None
            if kind == "truncate":  # half the body, then the connection drops
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                return self._reset()
            self.wfile.write(data)
            return None

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

    return Handler
