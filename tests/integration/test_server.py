"""A real server (grpc's sync server) on port 0 with a real client, keys from a real issuer over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2

from ext_authz.config.parse import load, parse
from ext_authz.model import Decision, Request
from ext_authz.server import ServeError, Server
from tests.support.idp import JWKS_PATH, TestIssuer
from tests.support.inprocess import Running, config, start


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        yield running


@pytest.fixture
async def running(issuer: TestIssuer) -> AsyncIterator[Running]:
    server, client = await start(config(issuer))
    yield client
    await server.stop(0)


async def test_allow_and_deny_over_grpc(running: Running, issuer: TestIssuer) -> None:
    allowed = await running.check(issuer.mint())
    assert allowed.status.code == 0
    assert [(h.header.key, h.header.value) for h in allowed.ok_response.headers] == [("x-user-id", "alice")]
    denied = await running.check(None)
    assert denied.status.code == 16
    assert denied.denied_response.status.code == 401
    expired = await running.check(issuer.mint(ttl=-3600))
    assert "expired" in json.loads(expired.denied_response.body)["error_description"]


async def test_health_serving_once_keys_are_fetched(running: Running) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    seen = []
    async with asyncio.timeout(5):
        async for update in running.health.Watch(health_pb2.HealthCheckRequest(service="")):
            seen.append(update.status)
            if update.status == serving:
                break
    assert seen[-1] == serving
    assert await running.health_status("envoy.service.auth.v3.Authorization") == serving


async def test_discovery_fetches_once(running: Running, issuer: TestIssuer) -> None:
    for _ in range(20):
        assert (await running.check(issuer.mint())).status.code == 0
    assert issuer.request_count("/.well-known/openid-configuration") == 1
    assert issuer.request_count(JWKS_PATH) == 1


async def test_explicit_jwks_uri_skips_discovery(issuer: TestIssuer) -> None:
    server, client = await start(config(issuer, jwks_uri=issuer.jwks_uri))
    try:
        assert (await client.check(issuer.mint())).status.code == 0
        assert issuer.request_count("/.well-known/openid-configuration") == 0
    finally:
        await server.stop(0)


async def test_static_keys_need_no_fetch(issuer: TestIssuer) -> None:
    server, client = await start(config(issuer, jwks=issuer.jwks()))
    try:
        assert (await client.check(issuer.mint())).status.code == 0
        assert issuer.request_counts == {}
    finally:
        await server.stop(0)


async def test_issuer_down_gives_503_then_recovers(issuer: TestIssuer) -> None:
    issuer.fail_path(JWKS_PATH, 500)
    server, client = await start(config(issuer))
    try:
        denied = await client.check(issuer.mint())
        assert denied.denied_response.status.code == 503
        headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
        assert int(headers["retry-after"]) >= 1
        assert json.loads(denied.denied_response.body)["error"] == "temporarily_unavailable"
        assert await client.health_status() != health_pb2.HealthCheckResponse.SERVING
        # Alive all the same: a liveness probe must not restart a replica waiting for keys.
        assert await client.health_status("liveness") == health_pb2.HealthCheckResponse.SERVING
        # Requests never fetch keys themselves: only the background retries reach the IdP.
        fetches = issuer.request_count(JWKS_PATH)
        for _ in range(20):
            assert (await client.check(issuer.mint())).denied_response.status.code == 503
        assert issuer.request_count(JWKS_PATH) <= fetches + 1
        issuer.fail_path(JWKS_PATH, None)
        for _ in range(100):  # the background retry comes within about a second
            if (await client.check(issuer.mint())).status.code == 0:
                break
            await asyncio.sleep(0.1)
        assert (await client.check(issuer.mint())).status.code == 0
        assert await client.health_status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_discovery_with_another_issuer_is_refused(issuer: TestIssuer) -> None:
    # The config names the issuer with a trailing slash; the discovery document says it without.
    s = config(issuer)
    provider = s.providers[0]
    s = parse(
        {
            "providers": [
                {"name": provider.name, "issuer": issuer.url + "/", "audiences": ["api"]},
            ]
        }
    )
    server, client = await start(s)
    try:
        response = await client.check(issuer.mint({"iss": issuer.url + "/"}))
        assert response.denied_response.status.code == 503
        assert issuer.request_count(JWKS_PATH) == 0
    finally:
        await server.stop(0)


async def test_bind_failure_is_a_clean_error(issuer: TestIssuer) -> None:
    server, _ = await start(config(issuer))
    try:
        busy = Server(config(issuer), listen="256.0.0.1:1")
        with pytest.raises(ServeError, match="cannot listen"):
            await busy.start()
    finally:
        await server.stop(0)


async def test_a_check_in_flight_during_a_reload_is_logged_under_its_own_config(
    issuer: TestIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ext-authz.yaml"

    def write(log: dict[str, str]) -> None:
        provider = {"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "providers": [provider], "log": log}))

    write({"decisions": "all", "subject": "plain"})  # config A
    server = Server(load(path), config_path=path)
    client = Running(server, grpc.aio.insecure_channel(await server.start()))
    try:
        under_a = server.runtime
        # The Check is decided in a request thread: it is held there with threading's events.
        decide, entered, release = under_a.pipeline.decide, threading.Event(), threading.Event()

        async def held(request: Request) -> Decision:
            entered.set()
            release.wait(5)
            return await decide(request)

        monkeypatch.setattr(under_a.pipeline, "decide", held)
        in_flight = asyncio.ensure_future(client.check(issuer.mint()))
        assert await asyncio.to_thread(entered.wait, 5)
        write({"decisions": "none"})  # config B: no decision lines
        assert await server.reload("test")
        assert server.runtime is not under_a
        capsys.readouterr()
        release.set()
        assert (await in_flight).status.code == 0
        assert (await client.check(issuer.mint())).status.code == 0  # decided and logged under B
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(line["decision"], line["subject"]) for line in lines] == [("allow", "alice")]
    finally:
        await server.stop(0)


async def test_a_reload_hands_unchanged_providers_keys_over(issuer: TestIssuer, tmp_path: Path) -> None:
    path = tmp_path / "ext-authz.yaml"

    def write(**provider: Any) -> None:
        entry = {"name": "test", "issuer": issuer.url, "audiences": ["api"], **provider}
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "providers": [entry]}))

    write()
    server = Server(load(path), config_path=path)
    client = Running(server, grpc.aio.insecure_channel(await server.start()))
    try:
        assert (await client.check(issuer.mint())).status.code == 0
        kept = server.keys.provider("test")
        write(audiences=["api", "other"])  # the same key source
        assert await server.reload("test")
        assert server.keys.provider("test") is kept
        assert kept.provider is server.settings.providers[0]  # serving the new config's settings
        assert (await client.check(issuer.mint())).status.code == 0
        assert issuer.request_count(JWKS_PATH) == 1
        write(jwks_uri=issuer.jwks_uri)  # another key source: fetched afresh
        assert await server.reload("test")
        assert server.keys.provider("test") is not kept
        assert (await client.check(issuer.mint())).status.code == 0
        assert issuer.request_count(JWKS_PATH) == 2
    finally:
        await server.stop(0)
