"""The HTTP authorization listener on a real loopback socket: dialects, framing, limits, peers that
send in small pieces, slowly, pipelined or malformed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ext_authz.keys.static import StaticKeys
from ext_authz.transport import http as listener_module
from tests.support.httplistener import running_listener
from tests.support.tokens import Mint


@pytest.fixture
async def listener(resolver: StaticKeys) -> AsyncIterator[str]:
    async with running_listener(resolver) as running:
        assert running.bound is not None
        yield running.bound


async def exchange(address: str, *chunks: bytes, pause: float = 0.0, read_until_close: bool = True) -> bytes:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse one or more HTTP responses (content-length framed)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(": ")
            headers[name.lower()] = value
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


def get(path: str, *headers: str, version: str = "1.1", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: authz", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_envoy_dialect_allows_with_identity_and_removals(listener: str, mint: Mint) -> None:
    raw = await exchange(
        listener,
        get("/envoy/orders?x=1", f"Authorization: Bearer {mint()}", "X-User-Id: forged", "Connection: close"),
    )
    ((status, headers, body),) = responses(raw)
    assert status == 200 and body == b""
    assert headers["x-user-id"] == "alice"
    assert "x-user-id" not in headers["x-envoy-auth-headers-to-remove"].split(",")  # set, not removed
    anonymous = responses(
        await exchange(listener, get("/envoy/public/a", "X-User-Id: forged", "Connection: close"))
    )
    ((status, headers, _),) = anonymous
    assert status == 200 and "x-user-id" not in headers
    assert "x-user-id" in headers["x-envoy-auth-headers-to-remove"].split(",")


async def test_denials_carry_status_headers_and_body(listener: str, mint: Mint) -> None:
    ((status, headers, body),) = responses(
        await exchange(listener, get("/envoy/orders", "Connection: close"))
    )
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer ")
    assert b"missing_token" in body
    expired = mint(exp=1)
    ((status, headers, _),) = responses(
        await exchange(
            listener,
            get(
                "/nginx",
                "X-Original-URI: /orders",
                "X-Original-Method: GET",
                f"Authorization: Bearer {expired}",
                "Connection: close",
            ),
        )
    )
    assert status == 401 and "invalid_token" in headers["www-authenticate"]


async def test_nginx_reads_the_original_request(listener: str, mint: Mint) -> None:
    # HTTP/1.0, as nginx sends its subrequest by default
    raw = await exchange(
        listener, get("/nginx", "X-Original-URI: /public/x?y=1", "X-Original-Method: get", version="1.0")
    )
    ((status, headers, _),) = responses(raw)
    assert status == 200 and headers.get("connection") == "close"
    ((status, _, body),) = responses(
        await exchange(listener, get("/nginx", "X-Original-Method: GET", version="1.0"))
    )
    assert status == 400 and b"x-original-uri" in body  # a misconfigured proxy, said plainly


async def test_forward_auth_reads_the_forwarded_request(listener: str, mint: Mint) -> None:
    headers = [
        "X-Forwarded-Method: GET",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: app.example",
        "Connection: close",
    ]
    ((status, answer, _),) = responses(
        await exchange(
            listener,
            get("/forward-auth", "X-Forwarded-Uri: /orders", f"Authorization: Bearer {mint()}", *headers),
        )
    )
    assert status == 200 and answer["x-user-id"] == "alice"
    ((status, _, _),) = responses(
        await exchange(listener, get("/forward-auth", "X-Forwarded-Uri: /orders", *headers))
    )
    assert status == 401


async def test_a_traversal_through_a_gateway_is_judged_like_a_check(listener: str) -> None:
    raw = await exchange(
        listener, get("/nginx", "X-Original-URI: /public/../orders", "X-Original-Method: GET", version="1.0")
    )
    ((status, _, _),) = responses(raw)
    assert status == 401  # /orders needs a token, whatever the spelling


async def test_pipelined_requests_are_answered_in_order(listener: str, mint: Mint) -> None:
    token = mint()
    raw = await exchange(
        listener,
        get("/envoy/orders", f"Authorization: Bearer {token}")
        + get("/envoy/orders")
        + get("/envoy/public/x", "Connection: close"),
    )
    assert [status for status, _, _ in responses(raw)] == [200, 401, 200]


async def test_a_request_sent_byte_by_byte(listener: str, mint: Mint) -> None:
    request = get("/envoy/orders", f"Authorization: Bearer {mint()}", "Connection: close")
    raw = await exchange(listener, *(request[i : i + 7] for i in range(0, len(request), 7)), pause=0.001)
    assert [status for status, _, _ in responses(raw)] == [200]


async def test_head_answers_carry_no_body(listener: str) -> None:
    raw = await exchange(
        listener, get("/envoy/orders", method="HEAD") + get("/envoy/public/x", "Connection: close")
    )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b" 401 " in head and b"content-length: 7" in head
    assert rest.startswith(b"HTTP/1.1 200")  # the next answer follows at once: no body in between


async def test_bodies_chunked_and_bounded(listener: str) -> None:
    chunked = (
        b"POST /envoy/public/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert [s for s, _, _ in responses(await exchange(listener, chunked))] == [200]
    big = b"POST /envoy/public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n" + b"x" * 20000
    assert [s for s, _, _ in responses(await exchange(listener, big))] == [413]


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET /envoy/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /envoy/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        b"GET /envoy/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_a_close(listener: str, raw: bytes) -> None:
    answers = responses(await exchange(listener, raw))
    assert [status for status, _, _ in answers] == [400]


async def test_oversized_heads_get_431(listener: str) -> None:
    huge = get("/envoy/x", "X-Big: " + "a" * 70_000)
    assert [s for s, _, _ in responses(await exchange(listener, huge))] == [431]
    many = get("/envoy/x", *(f"X-H{i}: v" for i in range(200)))
    assert [s for s, _, _ in responses(await exchange(listener, many))] == [431]


async def test_unknown_paths_are_404(listener: str) -> None:
    assert [s for s, _, _ in responses(await exchange(listener, get("/elsewhere", "Connection: close")))] == [
        404
    ]


async def test_a_head_that_never_ends_is_closed(listener: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(listener_module, "HEADER_TIMEOUT_SECONDS", 0.2)
    host, _, port = listener.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /envoy/x HTTP/1.1\r\nHost: a\r\n")  # never finished
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, not held
    writer.close()


async def test_identity_beyond_latin_1_is_answered_as_utf_8(listener: str, mint: Mint) -> None:
    raw = await exchange(
        listener, get("/envoy/orders", f"Authorization: Bearer {mint(sub='张三')}", "Connection: close")
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert "x-user-id: 张三".encode() in raw
