"""An echo backend: answers every request with 200 and what it received, as JSON.

Body: {"method": ..., "path": ..., "headers": {lower-cased name: [value, ...]}}. Each header
line is kept as its own list entry, so a test can tell "one x-user-id" from "a forged one plus
ours". Requests are also recorded so a test can assert the backend was never reached.
"""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any

from tests.support.httpserver import LoopbackHTTPServer


class EchoRequest(dict[str, Any]):
    """One request as the backend saw it (the same shape as the JSON body it answers with)."""

    @property
    def headers(self) -> dict[str, list[str]]:
        value: dict[str, list[str]] = self["headers"]
        return value

    def header_values(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


class EchoBackend(LoopbackHTTPServer):
    """A threaded HTTP/1.1 echo server on 127.0.0.1 with an ephemeral port."""

    name = "echo-backend"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._requests: list[EchoRequest] = []

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _make_handler(self)

    @property
    def requests(self) -> list[EchoRequest]:
        with self._lock:
            return list(self._requests)

    def _record(self, request: EchoRequest) -> None:
        with self._lock:
            self._requests.append(request)


def _make_handler(backend: EchoBackend) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _echo(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            headers: dict[str, list[str]] = {}
            for name, value in self.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            seen = EchoRequest(method=self.command, path=self.path, headers=headers)
            backend._record(seen)
            body = json.dumps(seen).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
