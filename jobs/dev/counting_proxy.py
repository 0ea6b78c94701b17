"""A request-counting HTTP proxy on loopback, in front of an S3 endpoint (moto): what a command costs in requests.

Object stores bill and throttle per request, and a request is a round trip of tens of milliseconds on a
real store: the number of requests a start-up makes is the figure that decides how it scales, and unlike
seconds it is deterministic. `CountingProxy` forwards every request unchanged and counts it by kind
(``LIST`` for a bucket listing, else the HTTP method); ``benchmark log`` and the tests use it.
"""

from __future__ import annotations

import collections
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from jobs.dev.relay import RelayHandler

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def fresh_filesystems() -> None:
    """Forget cached fsspec filesystems and their listings: a command measured next starts as a new process would."""
    import fsspec

    for cls in {type(fs) for fs in list(fsspec.AbstractFileSystem._cache.values())}:  # noqa: SLF001
        cls.clear_instance_cache()


def request_kind(method: str, path: str) -> str:
    """``LIST`` for a bucket listing (a GET with ``list-type`` or on the bucket itself), else the method."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET" and ("list-type" in query or parts.path.strip("/").count("/") == 0):
        return "LIST"
    return method


class CountingProxy:
    """Forwards HTTP/1.1 requests to ``upstream`` (``http://host:port``) and counts them (`request_kind`).

    ``counts`` is a Counter by kind and ``requests`` the (kind, path) of each, in order; `reset` starts a new
    count, `total` sums it. Start with `start`, stop with `stop` (or use it as a context manager).
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.replace("http://", "").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, method: str, path: str) -> None:
        """Count one request."""
        kind = request_kind(method, path)
        with self._lock:
            self.counts[kind] += 1
            self.requests.append((kind, urlsplit(path).path))

    def reset(self) -> None:
        """Forget the requests counted so far."""
        with self._lock:
            self.counts.clear()
            self.requests.clear()

    def total(self) -> int:
        """Requests counted since the last `reset`."""
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        """The counts by kind, and ``total``."""
        with self._lock:
            return {**dict(sorted(self.counts.items())), "total": sum(self.counts.values())}

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(proxy: CountingProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(RelayHandler):
        def _serve(self) -> None:
            body = self._body()
            proxy.count(self.command, self.path)
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            upstream.close()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

    return Handler
