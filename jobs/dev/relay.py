"""The request handler both local HTTP proxies build on (`jobs.dev.counting_proxy`, the tests' faulty proxy): HTTP/1.1,
silent, and a body read whole whether sent with Content-Length or chunked (s3fs streams uploads chunked)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))
