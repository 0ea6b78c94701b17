"""A static file server on loopback that answers ranged GETs (what fsspec's http filesystem reads Parquet with)."""

from __future__ import annotations

import http.server
import os
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of ``directory`` (query strings and user info ignored), honouring ``Range: bytes=a-b``."""

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _file(self) -> str | None:
        path = urllib.parse.urlsplit(self.path).path
        full = os.path.join(self.directory, path.lstrip("/"))
        return full if os.path.isfile(full) else None

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._send(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._send(body=True)

    def _send(self, *, body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start, end, status = 0, len(data) - 1, 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            if first:
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            else:
                start = max(len(data) - int(last), 0)
            status = 206
        chunk = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(chunk)


@contextmanager
def serving(directory: str) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1; yields ``host:port``."""

    def handler(*args: object, **kwargs: object) -> _RangeHandler:
        return _RangeHandler(*args, directory=directory, **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
