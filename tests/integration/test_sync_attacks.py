"""Attacks on the sync server and its request threads, found by the adversarial review of the
sync-server change: each must fail to stall or mislead it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import h2.config
import h2.connection
import h2.settings
import pytest
from grpc_health.v1 import health_pb2

from ext_authz.serveoptions import DEFAULT_THREADS
from ext_authz.server import Server
from tests.support.idp import JWKS_PATH, TestIssuer
from tests.support.inprocess import Running, check_request, config

CHECK = "/envoy.service.auth.v3.Authorization/Check"
WATCH = "/grpc.health.v1.Health/Watch"


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        yield running


@pytest.fixture
async def running(issuer: TestIssuer) -> AsyncIterator[Running]:
    server = Server(config(issuer))
    address = await server.start()
    client = Running(server, grpc.aio.insecure_channel(address))
    client.address = address  # type: ignore[attr-defined]
    await keys_in(client, issuer)
    yield client
    await server.stop(0)


async def until(condition: Callable[[], bool], seconds: float) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def keys_in(client: Running, issuer: TestIssuer) -> None:
    for _ in range(100):
        if (await client.check(issuer.mint())).status.code == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no keys")


class RawH2:
    """A hand-driven HTTP/2 client: opens gRPC streams and sends only what it is told to."""

    def __init__(self, address: str, *, initial_window: int | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self._lock = threading.Lock()
        self._flush()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _flush(self) -> None:
        with self._lock:
            data = self.conn.data_to_send()
            if data:
                self.sock.sendall(data)

    def _read(self) -> None:  # answers SETTINGS and PINGs (h2 does it), never WINDOW_UPDATEs
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.conn.receive_data(data)
            self._flush()

    def open(self, path: str, message: bytes | None) -> int:
        with self._lock:
            stream = self.conn.get_next_available_stream_id()
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
            self.conn.send_headers(stream, headers, end_stream=False)
            if message is not None:
                frame = b"\x00" + len(message).to_bytes(4, "big") + message
                self.conn.send_data(stream, frame, end_stream=True)
        self._flush()
        return stream

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


async def test_headers_only_check_streams_starve_every_check(running: Running, issuer: TestIssuer) -> None:
    """Check streams that send HEADERS but never the request message, more than there are request
    threads: each holds its thread (grpc's sync server reads the unary request inside the request
    thread); without the stuck-thread replacement every other Check, from anyone, would wait until
    those streams went away."""
    address = running.address  # type: ignore[attr-defined]
    raw = RawH2(address)
    try:
        for _ in range(2 * DEFAULT_THREADS):
            raw.open(CHECK, None)  # no grpc-timeout, no DATA
        await asyncio.sleep(0.5)
        token = issuer.mint()
        try:
            response = await asyncio.wait_for(running.check(token), 3)
            code = response.status.code
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            code = f"stalled: {type(exc).__name__}"
        assert code == 0, code
    finally:
        raw.close()


async def test_zero_window_watch_holds_the_health_lock(running: Running) -> None:
    """A Watch from a client that advertises a zero flow-control window: grpc's sync
    HealthServicer sends the first status *under its lock* and waits for the send to complete.
    Health Checks then block (each holding a request thread), and so would set_serving() on the
    asyncio loop (start, readiness changes, stop): the loop, which does every key fetch, stops."""
    address = running.address  # type: ignore[attr-defined]
    raw = RawH2(address, initial_window=0)
    try:
        raw.open(WATCH, health_pb2.HealthCheckRequest(service="").SerializeToString())
        await asyncio.sleep(0.5)
        # What the loop would do on a readiness change, in a daemon thread so the test survives.
        done = threading.Event()

        def set_serving() -> None:
            running.server.health.set_serving(True)
            done.set()

        threading.Thread(target=set_serving, daemon=True).start()
        set_returned = await asyncio.to_thread(done.wait, 3)
        try:
            status: object = await asyncio.wait_for(running.health_status(), 3)
        except (TimeoutError, grpc.aio.AioRpcError) as exc:
            status = f"stalled: {type(exc).__name__}"
        assert (set_returned, status) == (True, health_pb2.HealthCheckResponse.SERVING), (
            f"set_serving returned: {set_returned}; Health.Check: {status}"
        )
    finally:
        raw.close()


async def test_check_without_deadline_on_new_kid(running: Running, issuer: TestIssuer) -> None:
    """A caller with no gRPC deadline (grpcurl, an Envoy with timeout 0s, an in-house client):
    the sync server's time_remaining() is then ~1e19 s, not None, and the handoff's
    ``outcome.result(left + 5)`` overflows: the wait for a new kid fails with a 500."""
    kid = issuer.rotate()
    token = issuer.mint(kid=kid)

    request = check_request("/orders", token)
    started = time.monotonic()
    response = await asyncio.wait_for(running.stub.Check(request), 10)  # no timeout=: no deadline
    assert response.status.code == 0, (response.denied_response.status.code, response.denied_response.body)
    assert time.monotonic() - started < 5


async def test_unknown_kid_requests_neither_churn_threads_nor_pin_ended_ones(
    running: Running, issuer: TestIssuer
) -> None:
    """Every Check whose kid is not in the key set hands a wait to the loop, even when the
    answer is immediate (rate-limited: 503, or judged unknown: 401). Each handoff starts a new
    request thread and the returning one exits; the exited thread and its counters stay in
    CheckCollector._live until /metrics is next scraped. An outside attacker sends these through
    Envoy (an unsigned token with the right iss and a random kid is enough)."""
    server = running.server
    threads = server._threads
    live = server.metrics._checks._live
    started_before = threads._started
    for i in range(300):
        token = issuer.mint(headers={"kid": f"attacker-{i}"})
        await running.check(token)
    started = threads._started - started_before
    dead = sum(1 for thread, _ in live if not thread.is_alive())
    assert (started, dead) < (50, 50), f"{started} threads started, {dead} exited ones pinned, for 300 Checks"


async def test_stop_while_a_check_waits_on_the_loop(issuer: TestIssuer) -> None:
    """Stop (grace 0) while a Check waits for a slow IdP refetch: stop must not hang, and the
    request thread must not stay parked."""
    server = Server(config(issuer))
    address = await server.start()
    client = Running(server, grpc.aio.insecure_channel(address))
    await keys_in(client, issuer)

    issuer.delay_path(JWKS_PATH, 4)
    token = issuer.mint(kid=issuer.rotate())
    pending = asyncio.ensure_future(client.check(token))
    threads = server._threads
    await until(lambda: threads.waiting > 0, 3)
    started = time.monotonic()
    await asyncio.wait_for(server.stop(0, 0), 8)
    stop_took = time.monotonic() - started
    outcome = await asyncio.gather(pending, return_exceptions=True)
    await until(lambda: threads.waiting == 0, 8)
    assert stop_took < 2, (stop_took, outcome)
