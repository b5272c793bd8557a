"""The HTTP authorization listener (``listen_http``): HTTP/1.1 and 1.0 on asyncio with httptools
(the parser uvicorn uses), no framework. Each request is adapted by its dialect
(``transport.dialects``), decided by the same pipeline as a Check, and answered.

Bounded everywhere a peer could hold on: the request head within HEADER_TIMEOUT_SECONDS of its first
byte, at most MAX_HEAD_BYTES of it and MAX_HEADERS lines, a body of at most MAX_BODY_BYTES (a
back-channel logout's form; nothing else reads one), an idle keep-alive connection closed after
IDLE_TIMEOUT_SECONDS. Requests on one connection are answered in order (pipelining); a malformed
one is answered 400 and the connection closed. Every answer is a clean status: a bug is a 500
denial (``AuthorizationServicer.decide``), never a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import httptools

from ext_authz import deadlines
from ext_authz.config.model import HttpSettings
from ext_authz.transport.dialects import Answer, BadAuthorizationRequest, Dialects
from ext_authz.transport.servicer import AuthorizationServicer, Runtime

log = logging.getLogger(__name__)

HEADER_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 60.0
MAX_HEAD_BYTES = 64 * 1024  # a session's cookies may be ~30 KB; tokens up to max_token_bytes
MAX_HEADERS = 128
MAX_BODY_BYTES = 16 * 1024
# A client that pipelines and never reads: at most this many requests wait per connection (then
# the connection stops being read), and answers stop being made while its write buffer is full.
MAX_PIPELINED = 32
MAX_CONNECTIONS = 4096  # beyond it a new connection is closed at once (descriptors are finite)
DEADLINE_SECONDS = 10.0  # a proxy's own auth timeout is shorter; this bounds our waits

_REASONS = {
    200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 413: "Content Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}  # fmt: skip


def _plain(status: int, message: str) -> Answer:
    return Answer(status, (("content-type", "text/plain; charset=utf-8"),), message.encode() + b"\n")


class _Refused(Exception):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class _Parsed:
    """One request as the parser saw it."""

    __slots__ = ("body", "head_bytes", "headers", "keep_alive", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.method = ""
        self.keep_alive = True
        self.head_bytes = 0


class HttpAuthorizer:
    """Decides HTTP authorization requests with the servicer's runtime (the config in force)."""

    def __init__(self, servicer: AuthorizationServicer) -> None:
        self.servicer = servicer
        self._dialects: tuple[HttpSettings, Dialects] | None = None

    def dialects(self, runtime: Runtime) -> Dialects:
        settings = runtime.pipeline.settings.http
        known = self._dialects
        if known is None or known[0] is not settings:
            known = self._dialects = (settings, Dialects(settings))
        return known[1]

    async def answer(self, parsed: _Parsed) -> Answer:
        started = time.perf_counter()
        runtime = self.servicer.current()
        dialects = self.dialects(runtime)
        target = parsed.url.decode("latin-1")
        path, _, query = target.partition("?")
        found = dialects.dialect_of(path)
        if found is None:
            return _plain(404, "not an authorization path of this listener")
        dialect, rest = found
        deadlines.start(DEADLINE_SECONDS)
        try:
            request = dialects.to_request(dialect, rest, parsed.method, query, parsed.headers)
        except BadAuthorizationRequest as exc:
            return _plain(400, str(exc))
        if parsed.body:
            request = replace(request, body=bytes(parsed.body).decode("utf-8", "replace"))
        decision = await self.servicer.decide(runtime, request)
        self.servicer.recorded(runtime, request, request.headers.get("x-request-id", ""), decision, started)
        return dialects.answer(dialect, decision, request)


def encode(answer: Answer, *, keep_alive: bool, version: str, head: bool = False) -> bytes:
    """The answer on the wire; to a HEAD, without the body (its length still said: RFC 9110 §9.3.2)."""
    reason = _REASONS.get(answer.status, "Status")
    lines = [f"HTTP/{version} {answer.status} {reason}"]
    for name, value in answer.headers:
        lines.append(f"{name}: {value}")
    lines.append(f"content-length: {len(answer.body)}")
    if not keep_alive:
        lines.append("connection: close")
    elif version == "1.0":
        lines.append("connection: keep-alive")
    # Header values as UTF-8 (a claim may hold any text; HTTP carries it as opaque octets, as
    # Envoy's gRPC answer does); names and the status line are ASCII.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + (b"" if head else answer.body)


class HttpProtocol(asyncio.Protocol):
    """One connection: parse, queue, answer in order."""

    def __init__(self, authorizer: HttpAuthorizer, connections: set[HttpProtocol]) -> None:
        self._authorizer = authorizer
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._current: _Parsed | None = None
        self._header_name = ""
        # What to answer, in order: a parsed request, or a refusal answered as it is.
        self._queue: deque[tuple[_Parsed | Answer, str]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._reading_paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    # ---- the connection ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)
        if len(self._connections) >= MAX_CONNECTIONS:
            transport.abort()  # type: ignore[attr-defined]
            return
        self._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # answers are small: never wait to fill a segment
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(IDLE_TIMEOUT_SECONDS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._worker is not None:
            self._worker.cancel()

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size() > 0:
            transport.abort()  # answers nobody reads: close() would wait for them for ever
        elif not self._queue and self._worker is None:
            transport.close()  # idle, or a head that never finished
        else:
            self._arm(IDLE_TIMEOUT_SECONDS)

    # ---- flow control: a peer that sends faster than it reads is not read on ----

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _pause_reading_if_full(self) -> None:
        if len(self._queue) >= MAX_PIPELINED and not self._reading_paused and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None and len(self._queue) < MAX_PIPELINED // 2:
            self._reading_paused = False
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Stop: close when idle, after the answers under way otherwise."""
        self._closing = True
        if self._transport is not None and not self._queue and self._worker is None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except _Refused as refused:
            self._refuse(refused.answer)
        except httptools.HttpParserUpgrade:
            self._refuse(_plain(400, "no protocol upgrades here"))
        except httptools.HttpParserError as exc:
            # A refusal raised in a callback reaches here wrapped by the parser.
            cause = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            self._refuse(cause.answer if cause is not None else _plain(400, "malformed HTTP request"))

    def _refuse(self, answer: Answer) -> None:
        """Answer and close (after the answers already queued)."""
        self._closing = True
        self._queue.append((answer, "1.1"))
        self._start()

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        self._current = _Parsed()
        self._arm(HEADER_TIMEOUT_SECONDS)

    def on_url(self, url: bytes) -> None:
        current = self._current
        assert current is not None
        current.url += url
        current.head_bytes += len(url)
        if current.head_bytes > MAX_HEAD_BYTES:
            raise _Refused(_plain(431, "request head too large"))

    def on_header(self, name: bytes, value: bytes) -> None:
        current = self._current
        assert current is not None
        current.head_bytes += len(name) + len(value) + 4
        if current.head_bytes > MAX_HEAD_BYTES or len(current.headers) >= MAX_HEADERS:
            raise _Refused(_plain(431, "request head too large"))
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        existing = current.headers.get(key)
        if existing is None:
            current.headers[key] = text
        else:  # repeated lines joined as Envoy does (cookies with "; ")
            current.headers[key] = existing + ("; " if key == "cookie" else ",") + text

    def on_headers_complete(self) -> None:
        current = self._current
        assert current is not None
        current.method = self._parser.get_method().decode("latin-1")
        current.keep_alive = self._parser.should_keep_alive()
        expects = current.headers.get("expect", "").lower() == "100-continue"
        idle = not self._queue and self._worker is None  # a 100 ahead of a queued answer would misorder
        if expects and idle and self._transport is not None and self._parser.get_http_version() == "1.1":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the body may come now
        if self._parser.should_upgrade():
            raise _Refused(_plain(400, "no protocol upgrades here"))

    def on_body(self, body: bytes) -> None:
        current = self._current
        assert current is not None
        current.body += body
        if len(current.body) > MAX_BODY_BYTES:
            raise _Refused(_plain(413, "request body too large"))

    def on_message_complete(self) -> None:
        current, self._current = self._current, None
        assert current is not None
        self._queue.append((current, self._parser.get_http_version()))
        self._arm(IDLE_TIMEOUT_SECONDS)
        self._pause_reading_if_full()
        self._start()

    # ---- answering, in order ----

    def _start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._answer_all())

    async def _answer_all(self) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            while self._queue:
                item, version = self._queue[0]
                head = False
                if isinstance(item, Answer):
                    answer, keep_alive = item, False
                else:
                    try:
                        answer = await self._authorizer.answer(item)
                    except Exception:
                        log.exception("HTTP authorization request failed")
                        answer = _plain(500, "the authorization service failed")
                    head = item.method == "HEAD"
                    keep_alive = item.keep_alive
                self._queue.popleft()
                self._resume_reading()
                keep_alive = keep_alive and not (self._closing and not self._queue)
                version = version if version in ("1.0", "1.1") else "1.1"
                try:
                    wire = encode(answer, keep_alive=keep_alive, version=version, head=head)
                except Exception:  # never an unanswered request
                    log.exception("HTTP authorization answer failed")
                    wire = encode(
                        _plain(500, "the authorization service failed"), keep_alive=False, version=version
                    )
                    keep_alive = False
                await self._can_write.wait()  # the peer reads its answers before it gets more
                transport.write(wire)
                if not keep_alive:
                    transport.close()
                    return
        finally:
            self._worker = None
        if self._closing:
            transport.close()


class HttpListener:
    """``listen_http``: binds, serves until stopped; SO_REUSEPORT when it is one of a supervisor's
    workers (they share the port, as they share the gRPC one)."""

    def __init__(
        self,
        address: str,
        authorizer: HttpAuthorizer,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._address = address
        self._authorizer = authorizer
        self._ssl = ssl_context
        self._reuse_port = reuse_port
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[HttpProtocol] = set()
        self.bound: str | None = None

    async def start(self) -> str:
        host, _, port = self._address.rpartition(":")
        bare = host.strip("[]")
        factory: Callable[[], HttpProtocol] = lambda: HttpProtocol(self._authorizer, self._connections)  # noqa: E731
        self._server = await asyncio.get_running_loop().create_server(
            factory, bare, int(port), ssl=self._ssl, reuse_port=self._reuse_port or None, backlog=1024
        )
        bound_port = self._server.sockets[0].getsockname()[1]
        self.bound = f"{host}:{bound_port}"
        log.info("http listening", extra={"fields": {"address": self.bound, "tls": self._ssl is not None}})
        return self.bound

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let the answers under way finish (within ``grace_seconds``), close."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        deadline = time.monotonic() + grace_seconds
        while self._connections and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.02)
        for connection in list(self._connections):
            connection.abort()
        await self._server.wait_closed()
