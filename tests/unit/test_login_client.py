"""The login endpoints from discovery, the token endpoint's answers, and the client that asks."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import pytest

from ext_authz.config.model import LoginSettings, ProviderSettings
from ext_authz.config.parse import parse
from ext_authz.keys.fetch import Document, FetchError, HttpFetcher
from ext_authz.sessions.client import HttpLoginClient, client_authentication
from ext_authz.sessions.oidc import LoginUnavailable, TokenRefused, Tokens, endpoints_from, token_answer

ISSUER = "https://idp.example.com/"
DISCOVERY = {
    "issuer": ISSUER,
    "authorization_endpoint": "https://idp.example.com/authorize",
    "token_endpoint": "https://idp.example.com/token",
    "end_session_endpoint": "https://idp.example.com/logout",
    "authorization_response_iss_parameter_supported": True,
}


def provider() -> ProviderSettings:
    document = {
        "providers": [{"name": "corp", "issuer": ISSUER, "audiences": ["a"], "fetch_timeout_seconds": 0.2}]
    }
    login = LoginSettings(client_id="web", client_secret=None, token_endpoint_auth="none")
    return replace(parse(document).providers[0], login=login)


def test_endpoints_from_discovery() -> None:
    endpoints = endpoints_from(DISCOVERY, provider())
    assert endpoints.authorization == "https://idp.example.com/authorize"
    assert endpoints.token == "https://idp.example.com/token"
    assert endpoints.end_session == "https://idp.example.com/logout"
    assert endpoints.iss_parameter is True
    bare = endpoints_from(
        {k: v for k, v in DISCOVERY.items() if k.startswith(("issuer", "auth", "token"))}, provider()
    )
    assert bare.end_session is None and bare.iss_parameter is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"authorization_endpoint": None}, "no authorization_endpoint"),
        ({"token_endpoint": None}, "no token_endpoint"),
        ({"token_endpoint": "http://idp.example.com/token"}, "token_endpoint"),
        ({"issuer": "https://other.example/"}, "different issuer"),
        ({"end_session_endpoint": 5}, "end_session_endpoint"),
    ],
)
def test_discovery_without_usable_endpoints_is_refused(change: dict[str, Any], message: str) -> None:
    document = {k: v for k, v in {**DISCOVERY, **change}.items() if v is not None}
    with pytest.raises(LoginUnavailable) as caught:
        endpoints_from(document, provider())
    assert message in str(caught.value)


def test_token_answers() -> None:
    ok = token_answer(
        200, {"access_token": "at", "token_type": "bearer", "id_token": "x.y.z", "expires_in": "60"}
    )
    assert ok == Tokens("at", "x.y.z", None, 60.0, None)
    assert token_answer(400, {"error": "invalid_grant"}) == TokenRefused("invalid_grant")
    assert token_answer(401, {"error": "<script>"}) == TokenRefused("error")
    for status, body in [
        (500, {"error": "server_error"}),
        (200, {"token_type": "Bearer"}),
        (200, {"access_token": "at", "token_type": "DPoP"}),
        (200, {"access_token": "at", "token_type": "Bearer", "expires_in": -1}),
        (200, {"access_token": "at", "token_type": "Bearer", "expires_in": True}),
        (200, {"access_token": "a" * 40_000, "token_type": "Bearer"}),
        (200, {"access_token": "at", "token_type": "Bearer", "refresh_token": 5}),
        (200, [["access_token", "a"], ["access_token", "b"]]),  # duplicate members
        (302, None),
    ]:
        with pytest.raises(LoginUnavailable):
            token_answer(status, body)


def test_client_authentication_methods() -> None:
    basic = LoginSettings("my client", "s:e cret", "client_secret_basic")
    headers, form = client_authentication(basic)
    assert form == {}
    assert base64.b64decode(headers["Authorization"].removeprefix("Basic ")) == b"my+client:s%3Ae+cret"
    post = LoginSettings("c", "s", "client_secret_post")
    assert client_authentication(post) == ({}, {"client_id": "c", "client_secret": "s"})
    assert client_authentication(LoginSettings("c", None, "none")) == ({}, {"client_id": "c"})


class FakeFetcher:
    def __init__(self) -> None:
        self.documents: list[object] = []
        self.gets = 0
        self.posted: list[tuple[str, Mapping[str, str], Mapping[str, str]]] = []
        self.delay = 0.0

    async def get_json(self, url: str, **_: Any) -> Document:
        self.gets += 1
        await asyncio.sleep(self.delay)
        document = self.documents.pop(0)
        if isinstance(document, Exception):
            raise document
        return Document(document, None)

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str], **_: Any
    ) -> tuple[int, object]:
        self.posted.append((url, form, headers))
        await asyncio.sleep(self.delay)
        return 200, {"access_token": "at", "token_type": "Bearer"}


async def test_not_ready_until_the_endpoints_are_known_and_kept_through_an_outage() -> None:
    fetcher = FakeFetcher()
    now = [0.0]
    client = HttpLoginClient(cast(HttpFetcher, fetcher), clock=lambda: now[0])
    corp = provider()
    assert not client.ready((corp,))
    fetcher.documents = [{k: v for k, v in DISCOVERY.items() if k != "token_endpoint"}]
    with pytest.raises(LoginUnavailable):
        await client.endpoints(corp)
    assert not client.ready((corp,))  # discovery without a token endpoint: not ready
    fetcher.documents = [DISCOVERY]
    assert (await client.endpoints(corp)).token == DISCOVERY["token_endpoint"]
    assert client.ready((corp,))
    assert client.endpoints_now("corp") is not None
    now[0] += 10_000  # past refresh_interval_seconds; the IdP is down
    fetcher.documents = [FetchError("network_error", "down")]
    assert (await client.endpoints(corp)).token == DISCOVERY["token_endpoint"]
    assert client.ready((corp,))
    other_issuer = replace(corp, issuer="https://elsewhere.example/")
    assert not client.ready((other_issuer,))  # a reload to another issuer: fetched anew


async def test_one_fetch_for_concurrent_askers() -> None:
    fetcher = FakeFetcher()
    fetcher.delay = 0.05
    fetcher.documents = [DISCOVERY]
    client = HttpLoginClient(cast(HttpFetcher, fetcher))
    corp = provider()
    results = await asyncio.gather(*(client.endpoints(corp) for _ in range(5)))
    assert fetcher.gets == 1 and len({r.token for r in results}) == 1


async def test_token_requests_are_bounded_by_the_fetch_timeout() -> None:
    fetcher = FakeFetcher()
    fetcher.documents = [DISCOVERY]
    client = HttpLoginClient(cast(HttpFetcher, fetcher))
    corp = provider()
    endpoints = await client.endpoints(corp)
    fetcher.delay = 1.0  # the provider's fetch_timeout_seconds is 0.2
    with pytest.raises(LoginUnavailable) as caught:
        await client.token_request(corp, endpoints, {"grant_type": "refresh_token", "refresh_token": "r"})
    assert caught.value.outcome == "timeout"
    url, form, _ = fetcher.posted[0]
    assert url == DISCOVERY["token_endpoint"] and form["client_id"] == "web"
