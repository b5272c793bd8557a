"""Review: attacks on the HTTP authorization listener (framing, limits, dialects)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ext_authz.keys.static import StaticKeys
from ext_authz.transport import http as listener_module
from ext_authz.transport.http import HttpListener
from tests.support.httplistener import running_listener
from tests.support.tokens import Mint


@pytest.fixture
async def server(resolver: StaticKeys) -> AsyncIterator[HttpListener]:
    async with running_listener(resolver) as running:
        yield running


async def exchange(address: str, raw: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def nginx(uri: str, *extra: str) -> bytes:
    lines = ["GET /nginx HTTP/1.0", "Host: app", f"X-Original-URI: {uri}", "X-Original-Method: GET", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---- dialects: the path judged must be the path served ----


async def test_a_fragment_in_x_original_uri_is_not_cut_off(server: HttpListener) -> None:
    # ATTACK (outside review; fixed). nginx passes `GET /public/x#/../../orders` to the backend as it is
    # ($request_uri keeps the "#..."), but the nginx dialect judges only "/public/x" (anonymous).
    # A backend that resolves dot segments without splitting off "#" (Go's http.FileServer,
    # path.Clean) serves /orders. Secure: refuse (400), or judge the whole target (-> /orders, 401).
    assert server.bound is not None
    raw = await exchange(server.bound, nginx("/public/x#/../../orders"))
    assert status_of(raw) in (400, 401)


async def test_a_fragment_in_x_forwarded_uri_is_not_cut_off(server: HttpListener) -> None:
    # ATTACK (outside review; fixed) (the forward_auth dialect shares _split_target).
    assert server.bound is not None
    lines = [
        "GET /forward-auth HTTP/1.0",
        "Host: authz",
        "X-Forwarded-Method: GET",
        "X-Forwarded-Host: app",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Uri: /public/x#/../../orders",
    ]
    raw = await exchange(server.bound, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert status_of(raw) in (400, 401)


@pytest.mark.parametrize(
    ("uri", "refused"),
    [
        ("/public/../orders", 401),
        ("/public/%2e%2e/orders", 401),
        ("/public/x%23/../../orders", 401),
        ("http://app/orders", 403),
        ("orders", 403),
        ("*", 403),
    ],
)
async def test_other_original_uri_tricks_are_refused(server: HttpListener, uri: str, refused: int) -> None:
    assert server.bound is not None
    assert status_of(await exchange(server.bound, nginx(uri))) == refused


@pytest.mark.parametrize(
    "target", ["//envoy/public/x", "/ENVOY/public/x", "/envoy%2Fpublic/x", "/envoyx/public"]
)
async def test_dialect_prefix_tricks_are_404(server: HttpListener, target: str) -> None:
    assert server.bound is not None
    raw = await exchange(server.bound, f"GET {target} HTTP/1.0\r\nHost: a\r\n\r\n".encode())
    assert status_of(raw) == 404


async def test_envoy_dialect_traversal_out_of_the_prefix_is_judged_normalised(server: HttpListener) -> None:
    assert server.bound is not None
    raw = await exchange(server.bound, b"GET /envoy/public/../orders HTTP/1.0\r\nHost: a\r\n\r\n")
    assert status_of(raw) == 401


async def test_a_forged_identity_header_with_crlf_cannot_split_the_answer(
    server: HttpListener, mint: Mint
) -> None:
    assert server.bound is not None
    token = mint(sub="alice\r\nx-user-id: admin")
    raw = await exchange(
        server.bound,
        f"GET /envoy/orders HTTP/1.0\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n".encode(),
    )
    assert b"x-user-id: admin" not in raw


# ---- limits: a peer that pipelines and never reads ----


async def _flood(server: HttpListener, requests: int) -> tuple[asyncio.StreamWriter, Any]:
    assert server.bound is not None
    host, _, port = server.bound.rpartition(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    _, writer = await asyncio.open_connection(sock=sock)
    one = b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"  # 36 bytes in, ~110 bytes of 404 out
    for _ in range(requests // 2000):
        writer.write(one * 2000)
        try:
            await asyncio.wait_for(writer.drain(), 2)
        except TimeoutError:  # the listener stopped reading us: what the flow control is for
            break
    await asyncio.sleep(0.5)
    # (Gone already when the test's timeouts are short: that is what they are for.)
    connection = next(iter(server._connections), None)
    return writer, connection


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


async def test_a_pipeline_that_is_never_read_is_bounded(server: HttpListener) -> None:
    # ATTACK (outside review; fixed). HttpProtocol has no pause_writing/resume_writing and never
    # pauses reading: every pipelined request is parsed and its answer appended to the transport's
    # write buffer, without limit (~3x amplification). 80k requests (2.9 MB sent) leave ~3 MB
    # buffered in the listener; a few clients reach gigabytes.
    writer, connection = await _flood(server, 80_000)
    try:
        assert connection is not None
        transport = connection._transport
        assert transport.get_write_buffer_size() < 1024 * 1024 or not transport.is_reading()
        assert transport.get_write_buffer_size() < 4 * 1024 * 1024
    finally:
        await _close(writer)


async def test_an_unread_connection_is_dropped_after_the_idle_timeout(
    server: HttpListener, monkeypatch: Any
) -> None:
    # ATTACK (outside review; fixed). On idle, _expire calls transport.close(), which waits for the write
    # buffer to drain: a peer that never reads holds the connection (and its buffer) forever.
    monkeypatch.setattr(listener_module, "IDLE_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(listener_module, "HEADER_TIMEOUT_SECONDS", 0.3)  # a request cut off mid-head
    writer, _ = await _flood(server, 80_000)
    try:
        # Whether the answers sit in our write buffer or the kernel's, the peer reads nothing:
        # the connection goes at the timeout all the same.
        await asyncio.sleep(1.5)
        assert not server._connections
    finally:
        await _close(writer)
