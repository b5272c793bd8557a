"""An echo backend: answers every request with 200 and what it received, as JSON.

Body: {"method": ..., "path": ..., "headers": {lower-cased name: [value, ...]}}. Each header
line is kept as its own list entry, so a test can tell "one x-user-id" from "a forged one plus
ours". Requests are also recorded so a test can assert the backend was never reached.
"""

from __future__ import annotations

import http.server
import json
import threading
from types import TracebackType
from typing import Any, Self


class EchoRequest(dict[str, Any]):
    """One request as the backend saw it (the same shape as the JSON body it answers with)."""

    @property
    def headers(self) -> dict[str, list[str]]:
        value: dict[str, list[str]] = self["headers"]
        return value

    def header_values(self, name: str) -> list[str]:
        return self.headers.get(name.lower(), [])


class EchoBackend:
    """A threaded HTTP/1.1 echo server on 127.0.0.1 with an ephemeral port."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[EchoRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="echo-backend", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("EchoBackend is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
