"""Fetching keys over a real, awkward network: bodies that arrive in many small TCP segments are
read to the end within the size cap (whatever the framing, whatever Content-Length claims), and
redirects are followed hop by hop under the provider's URL policy.

Every server here is a `SlowIdP` on 127.0.0.1 (tests/support/keys_fetch.py). Redirect targets
that must be refused name hosts that are not loopback (`0.0.0.0`, `example.invalid`): the
refusal happens before any connection or name lookup, and the servers' request counters show
that the refused hop was never requested.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.config.model import ProviderSettings
from ext_authz.config.parse import parse
from ext_authz.keys.fetch import MAX_DOCUMENT_BYTES, Document, FetchError, HttpFetcher
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.provider import ProviderKeys
from ext_authz.server import Server
from tests.support.keys_fetch import (
    IDP_KEY_SETS,
    Framing,
    Reply,
    SlowIdP,
    TlsPair,
    idp_jwks,
    json_reply,
    redirect,
    tls_pair,
)

DEFAULT_SSL = ssl.create_default_context()
FRAMINGS: list[Framing] = ["length", "chunked", "close"]


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpFetcher]:
    http = HttpFetcher()
    yield http
    await http.close()


@pytest.fixture
def idp() -> Iterator[SlowIdP]:
    with SlowIdP() as server:
        yield server


@pytest.fixture
def tls(tmp_path: Path) -> TlsPair:
    return tls_pair(tmp_path)


@pytest.fixture
def secure_idp(tls: TlsPair) -> Iterator[SlowIdP]:
    with SlowIdP(tls=tls.server) as server:
        yield server


async def fetch(
    fetcher: HttpFetcher,
    url: str,
    *,
    ssl_context: ssl.SSLContext = DEFAULT_SSL,
    allow_insecure_http: bool = False,
    within: float = 5.0,
) -> Document:
    async with asyncio.timeout(within):  # the caller's bound, as ProviderKeys sets it
        return await fetcher.get_json(url, ssl_context=ssl_context, allow_insecure_http=allow_insecure_http)


def provider_settings(idp: SlowIdP, **provider: Any) -> ProviderSettings:
    return parse(
        {"providers": [{"name": "slow", "issuer": idp.url, "audiences": ["api"], **provider}]}
    ).providers[0]


def provider_keys(idp: SlowIdP, fetcher: HttpFetcher, **provider: Any) -> ProviderKeys:
    return ProviderKeys(
        provider_settings(idp, **provider), fetcher, None, clock=time.time, on_change=lambda: None
    )


# ---- item 4: bodies read to the end ------------------------------------------------------------


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("idp_name", list(IDP_KEY_SETS))
async def test_a_key_set_in_many_small_delayed_writes_is_read_to_the_end(
    idp: SlowIdP, fetcher: HttpFetcher, idp_name: str, framing: Framing
) -> None:
    expected = idp_jwks(idp_name)
    reply = json_reply(expected.document, framing=framing)
    assert len(reply.body) // reply.piece >= 7  # the smallest set still arrives in many pieces
    idp.reply("/keys", reply)
    document = await fetch(fetcher, idp.url + "/keys")
    assert document.body == expected.document
    assert sorted(k.kid or "" for k in parse_jwks(document.body).keys) == sorted(expected.signing)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_provider_keys_over_the_slow_idp_verify_tokens(
    idp: SlowIdP, fetcher: HttpFetcher, framing: Framing
) -> None:
    """Discovery and then every IdP's key set through ProviderKeys, one after the other (a
    rotation refetch is a fetch like the first)."""
    keys = provider_keys(idp, fetcher)
    discovery = {"issuer": idp.url, "jwks_uri": idp.url + "/keys"}
    idp.reply("/.well-known/openid-configuration", json_reply(discovery, framing=framing))
    for idp_name in IDP_KEY_SETS:
        expected = idp_jwks(idp_name)
        idp.reply("/keys", json_reply(expected.document, framing=framing))
        assert await keys.refresh(from_idp=True) == "installed", (idp_name, keys.stats.fetches)
        for kid, private in expected.signing.items():
            key = await keys.key_for(kid, "RS256")
            token = jwt.encode({"sub": "alice"}, private, algorithm="RS256", headers={"kid": kid})
            assert jwt.decode(token, key.key, algorithms=["RS256"])["sub"] == "alice"


def _oversized(extra: int = 64 * 1024) -> bytes:
    return json.dumps({"keys": [], "padding": "x" * (MAX_DOCUMENT_BYTES + extra)}).encode()


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_a_body_over_the_cap_is_refused_as_soon_as_the_cap_is_passed(
    idp: SlowIdP, fetcher: HttpFetcher, framing: Framing
) -> None:
    # No Content-Length, and the body never ends: only counting while reading can stop it.
    idp.reply("/keys", Reply(body=_oversized(), framing=framing, piece=16 * 1024, pause=0.0005, hang=True))
    started = time.monotonic()
    with pytest.raises(FetchError, match="larger than") as caught:
        await fetch(fetcher, idp.url + "/keys", within=5)
    assert caught.value.outcome == "invalid"
    assert time.monotonic() - started < 3


async def test_a_declared_length_over_the_cap_is_refused_before_reading(
    idp: SlowIdP, fetcher: HttpFetcher
) -> None:
    idp.reply("/keys", Reply(body=_oversized(), piece=1024, pause=0.01, hang=True))  # ~6 s to send
    started = time.monotonic()
    with pytest.raises(FetchError, match="larger than"):
        await fetch(fetcher, idp.url + "/keys", within=5)
    assert time.monotonic() - started < 1


async def test_exactly_the_cap_is_accepted(idp: SlowIdP, fetcher: HttpFetcher) -> None:
    head = b'{"keys": [], "padding": "'
    body = head + b"x" * (MAX_DOCUMENT_BYTES - len(head) - 2) + b'"}'
    assert len(body) == MAX_DOCUMENT_BYTES
    idp.reply("/keys", Reply(body=body, framing="chunked", piece=32 * 1024, pause=0))
    assert (await fetch(fetcher, idp.url + "/keys")).body == {
        "keys": [],
        "padding": body[len(head) : -2].decode(),
    }


async def test_a_content_length_shorter_than_the_body_is_a_fetch_error(
    idp: SlowIdP, fetcher: HttpFetcher
) -> None:
    body = json.dumps(idp_jwks("okta").document).encode()
    idp.reply("/keys", Reply(body=body, content_length=len(body) - 10))
    with pytest.raises(FetchError) as caught:
        await fetch(fetcher, idp.url + "/keys")
    assert caught.value.outcome == "invalid"
    # The bytes left over on that connection do not spoil the next fetch.
    idp.reply("/keys", Reply(body=body))
    assert (await fetch(fetcher, idp.url + "/keys")).body == idp_jwks("okta").document


async def test_a_content_length_longer_than_the_body_is_a_fetch_error(
    idp: SlowIdP, fetcher: HttpFetcher
) -> None:
    body = json.dumps(idp_jwks("okta").document).encode()
    idp.reply("/keys", Reply(body=body, content_length=len(body) + 10, close=True))
    with pytest.raises(FetchError) as caught:
        await fetch(fetcher, idp.url + "/keys")
    assert caught.value.outcome == "network_error"


async def test_a_body_that_never_ends_is_bounded_by_the_fetch_timeout(
    idp: SlowIdP, fetcher: HttpFetcher
) -> None:
    body = json.dumps(idp_jwks("okta").document).encode()
    idp.reply("/keys", Reply(body=body, content_length=len(body) + 10, hang=True))
    keys = provider_keys(idp, fetcher, jwks_uri=idp.url + "/keys", fetch_timeout_seconds=0.3)
    started = time.monotonic()
    assert await keys.refresh(from_idp=True) == "failed"
    assert time.monotonic() - started < 1.5
    assert keys.stats.fetches["timeout"] == 1
    idp.reply("/keys", Reply(body=body))
    assert await keys.refresh(from_idp=True) == "installed"


# ---- item 5 through the whole server ------------------------------------------------------------


async def check(channel: grpc.aio.Channel, token: str) -> external_auth_pb2.CheckResponse:
    headers = {":method": "GET", ":path": "/orders", "authorization": f"Bearer {token}"}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/orders", headers=headers)
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
    response: external_auth_pb2.CheckResponse = await stub.Check(request, timeout=5)
    return response


async def test_the_server_serves_entra_and_keycloak_sets_with_an_odd_key_sent_slowly(idp: SlowIdP) -> None:
    entra, keycloak = idp_jwks("entra"), idp_jwks("keycloak")
    odd = [
        {"kty": "EC", "crv": "P-999", "kid": "odd-curve", "x": "AA", "y": "AA"},
        {"kty": "RSA", "kid": "odd-n", "n": "_" * 400_000, "e": "AQAB"},
    ]
    document = {"keys": [odd[0], *entra.document["keys"], odd[1], *keycloak.document["keys"]]}
    idp.reply(
        "/.well-known/openid-configuration", json_reply({"issuer": idp.url, "jwks_uri": idp.url + "/keys"})
    )
    idp.reply("/keys", json_reply(document, framing="chunked", piece=4096))
    config = parse(
        {"listen": "127.0.0.1:0", "providers": [{"name": "slow", "issuer": idp.url, "audiences": ["api"]}]}
    )
    server = Server(config)
    address = await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            async with asyncio.timeout(10):
                async for update in health.Watch(health_pb2.HealthCheckRequest()):
                    if update.status == serving:
                        break
            now = int(time.time())
            claims = {"iss": idp.url, "aud": "api", "sub": "alice", "iat": now, "exp": now + 300}
            for kid, private in {**entra.signing, **keycloak.signing}.items():
                token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid})
                assert (await check(channel, token)).status.code == 0, kid
            # Keycloak's encryption key verifies nothing.
            [enc_kid] = keycloak.skipped
            token = jwt.encode(
                claims, next(iter(entra.signing.values())), algorithm="RS256", headers={"kid": enc_kid}
            )
            assert (await check(channel, token)).denied_response.status.code == 401
    finally:
        await server.stop(0)


# ---- item 6: redirects hop by hop --------------------------------------------------------------


def whole(document: object) -> Reply:
    """An answer in one write: these tests are about where a fetch goes, not how bodies arrive."""
    return json_reply(document, piece=1 << 20, pause=0)


async def test_https_to_http_to_https_is_refused_at_the_http_hop(
    secure_idp: SlowIdP, idp: SlowIdP, fetcher: HttpFetcher, tls: TlsPair
) -> None:
    # 0.0.0.0 is not loopback to the URL policy (on Linux a connection to it would reach this
    # machine, so even a regression sends nothing off it).
    secure_idp.reply("/start", redirect(f"http://0.0.0.0:{idp.port}/hop"))
    idp.reply("/hop", redirect(secure_idp.url + "/keys"))
    secure_idp.reply("/keys", whole(idp_jwks("okta").document))
    with pytest.raises(FetchError, match="must use https") as caught:
        await fetch(fetcher, secure_idp.url + "/start", ssl_context=tls.client)
    assert caught.value.outcome == "invalid"
    assert idp.counts == {} and secure_idp.count("/keys") == 0


@pytest.mark.parametrize(
    "target",
    [
        "http://example.invalid/keys",
        "file:///etc/passwd",
        "ftp://127.0.0.1/keys",
        "gopher://127.0.0.1:70/keys",
        "data:application/json,{}",
        "https://user:secret@{host}/keys",
        "https://[::1/keys",
        # Parser differentials: urlsplit and yarl read these hosts differently; both refused.
        "http://127.0.0.1\\@example.invalid/keys",
        "http://[::1]example.invalid/keys",
        "https://{host}:99999/keys",
    ],
)
async def test_a_redirect_off_the_url_policy_is_refused_before_it_is_requested(
    secure_idp: SlowIdP, fetcher: HttpFetcher, tls: TlsPair, target: str
) -> None:
    secure_idp.reply("/start", redirect(target.replace("{host}", f"127.0.0.1:{secure_idp.port}")))
    secure_idp.reply("/keys", whole(idp_jwks("okta").document))
    with pytest.raises(FetchError) as caught:
        await fetch(fetcher, secure_idp.url + "/start", ssl_context=tls.client)
    assert caught.value.outcome == "invalid", caught.value
    assert secure_idp.counts == {"/start": 1}


async def test_three_redirects_with_relative_locations_are_followed(
    secure_idp: SlowIdP, fetcher: HttpFetcher, tls: TlsPair
) -> None:
    secure_idp.reply("/a/start", redirect("/b/next", 301))  # absolute path
    secure_idp.reply("/b/next", redirect("then", 303))  # relative path: /b/then
    secure_idp.reply("/b/then", redirect(f"//127.0.0.1:{secure_idp.port}/keys#frag", 308))  # network-path
    secure_idp.reply("/keys", whole(idp_jwks("cognito").document))
    document = await fetch(fetcher, secure_idp.url + "/a/start", ssl_context=tls.client)
    assert document.body == idp_jwks("cognito").document
    assert secure_idp.counts == {"/a/start": 1, "/b/next": 1, "/b/then": 1, "/keys": 1}


async def test_a_fourth_redirect_is_refused(secure_idp: SlowIdP, fetcher: HttpFetcher, tls: TlsPair) -> None:
    for hop, status in enumerate((302, 307, 302, 307)):
        secure_idp.reply(f"/{hop}", redirect(f"/{hop + 1}", status))
    secure_idp.reply("/4", whole(idp_jwks("okta").document))
    with pytest.raises(FetchError, match="too many redirects") as caught:
        await fetch(fetcher, secure_idp.url + "/0", ssl_context=tls.client)
    assert caught.value.outcome == "invalid"
    assert secure_idp.count("/4") == 0


async def test_a_redirect_without_location_is_a_fetch_error(idp: SlowIdP, fetcher: HttpFetcher) -> None:
    idp.reply("/keys", Reply(status=302))
    with pytest.raises(FetchError, match="without a Location"):
        await fetch(fetcher, idp.url + "/keys")


async def test_http_to_https_upgrade_is_followed(
    idp: SlowIdP, secure_idp: SlowIdP, fetcher: HttpFetcher, tls: TlsPair
) -> None:
    idp.reply("/keys", redirect(secure_idp.url + "/keys", 301))
    secure_idp.reply("/keys", whole(idp_jwks("google").document))
    assert (await fetch(fetcher, idp.url + "/keys", ssl_context=tls.client)).body == idp_jwks(
        "google"
    ).document


@pytest.mark.parametrize("allow_insecure_http", [False, True])
async def test_the_providers_allow_insecure_http_decides_each_hop(
    idp: SlowIdP, fetcher: HttpFetcher, allow_insecure_http: bool
) -> None:
    with SlowIdP() as elsewhere:
        idp.reply("/keys", redirect(f"http://0.0.0.0:{elsewhere.port}/keys"))
        elsewhere.reply("/keys", whole(idp_jwks("okta").document))
        keys = provider_keys(
            idp, fetcher, jwks_uri=idp.url + "/keys", allow_insecure_http=allow_insecure_http
        )
        result = await keys.refresh(from_idp=True)
        if allow_insecure_http:
            assert result == "installed"
            assert elsewhere.counts == {"/keys": 1}
        else:
            assert result == "failed" and keys.stats.fetches["invalid"] == 1
            assert elsewhere.counts == {}


async def test_discovery_redirects_are_checked_too(idp: SlowIdP, fetcher: HttpFetcher) -> None:
    idp.reply(
        "/.well-known/openid-configuration",
        redirect("http://example.invalid/.well-known/openid-configuration"),
    )
    with pytest.raises(FetchError, match="must use https"):
        async with asyncio.timeout(5):
            await fetcher.discover_jwks_uri(idp.url, ssl_context=DEFAULT_SSL, allow_insecure_http=False)
