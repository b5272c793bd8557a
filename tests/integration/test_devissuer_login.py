"""The development issuer's browser sign-in over real HTTP, in this process: the authorization code
flow with PKCE (RFC 6749 §4.1, RFC 7636), refresh rotation, RP-initiated and back-channel logout.
A movable clock stands in for waiting."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web

from ext_authz import cli
from ext_authz.dev.http import bound_port, listen_socket
from ext_authz.dev.login import LoginSettings
from tests.support.oidc_client import (
    AUDIENCE,
    OidcClient,
    Pkce,
    RunningIssuer,
    login_issuer,
    query_of,
    start_site,
)

SECRET = "s3cret:with/odd chars"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def issuer(tmp_path: Path) -> AsyncIterator[RunningIssuer]:
    async with login_issuer(tmp_path, LoginSettings(token_lifetime=120, refresh_lifetime=3600)) as running:
        yield running


@pytest.fixture
def client(http: aiohttp.ClientSession, issuer: RunningIssuer) -> OidcClient:
    return OidcClient(http, issuer.url)


def header_of(token: str) -> dict[str, Any]:
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert isinstance(header, dict)
    return header


async def test_discovery_names_the_sign_in_endpoints(client: OidcClient, issuer: RunningIssuer) -> None:
    async with client.http.get(f"{issuer.url}/.well-known/openid-configuration") as response:
        document = await response.json()

    assert document["authorization_endpoint"] == f"{issuer.url}/authorize"
    assert document["token_endpoint"] == f"{issuer.url}/token"
    assert document["end_session_endpoint"] == f"{issuer.url}/logout"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert document["response_types_supported"] == ["code", "id_token"]
    assert document["authorization_response_iss_parameter_supported"] is True  # RFC 9207
    assert document["backchannel_logout_supported"] and document["backchannel_logout_session_supported"]
    assert "offline_access" in document["scopes_supported"]


async def test_login_page_has_the_stable_ids_and_safe_headers(client: OidcClient) -> None:
    page = await client.authorize(**client.request_params(Pkce.new(), "openid email", "st", "n"))
    text = await page.text()

    assert page.status == 200
    ids = ("sub", "groups", "email", "sign-in", "deny", "scope-openid", "scope-email", "pending")
    for element in (*(f'id="{i}"' for i in ids), 'value="alice"', 'value="staff"'):
        assert element in text, element
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    # The redirect answering the form must be allowed by form-action, or browsers block it.
    assert "form-action 'self' http://127.0.0.1:9" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["X-Frame-Options"] == "DENY"


async def test_code_flow_with_pkce_gives_verifiable_tokens(client: OidcClient, issuer: RunningIssuer) -> None:
    pkce = Pkce.new()
    redirect = await client.sign_in(pkce, sub="bob", groups="staff, admins", state="xyz", nonce="n-42")

    assert redirect["state"] == "xyz"
    assert redirect["iss"] == issuer.url  # RFC 9207
    assert redirect["keep"] == "1"  # the redirect URI's own query is kept
    status, tokens = await client.exchange(redirect["code"], pkce)
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 120
    assert tokens["scope"] == "openid profile email offline_access"
    assert tokens["refresh_token"]
    id_token = await client.verify(tokens["id_token"], client.client_id)
    assert (id_token["sub"], id_token["nonce"], id_token["email"]) == ("bob", "n-42", "bob@example.com")
    assert id_token["groups"] == ["staff", "admins"]
    assert id_token["sid"] and id_token["auth_time"] <= id_token["iat"]
    assert id_token["exp"] - id_token["iat"] == 120
    access = await client.verify(tokens["access_token"], AUDIENCE)
    assert (access["sub"], access["client_id"], access["scope"]) == ("bob", "web-app", tokens["scope"])
    assert access["jti"] and access["groups"] == ["staff", "admins"]
    assert header_of(tokens["access_token"])["typ"] == header_of(tokens["id_token"])["typ"] == "JWT"


async def test_only_the_checked_scopes_are_granted_and_no_refresh_without_offline_access(
    client: OidcClient,
) -> None:
    tokens = await client.code_flow(granted=("openid", "email"), nonce=None)

    assert tokens["scope"] == "openid email"
    assert "refresh_token" not in tokens
    assert "nonce" not in await client.verify(tokens["id_token"], client.client_id)


@pytest.mark.parametrize(
    ("override", "client_id"),
    [
        ({"code_verifier": Pkce.new().verifier}, None),
        ({"code_verifier": "short"}, None),
        ({"redirect_uri": "http://127.0.0.1:9/other"}, None),
        ({}, "another-app"),
    ],
    ids=["wrong-verifier", "malformed-verifier", "wrong-redirect-uri", "other-client"],
)
async def test_a_code_is_refused_unless_everything_matches(
    client: OidcClient, override: dict[str, str], client_id: str | None
) -> None:
    pkce = Pkce.new()
    code = (await client.sign_in(pkce))["code"]
    if client_id is not None:
        override = {**override, "client_id": client_id}

    status, body = await client.exchange(code, pkce, **override)

    assert (status, body["error"]) == (400, "invalid_grant"), body
    # Spent by that first presentation: the right verifier no longer helps.
    assert (await client.exchange(code, pkce))[1]["error"] == "invalid_grant"


async def test_a_reused_code_is_refused_and_revokes_what_it_gave(client: OidcClient) -> None:
    pkce = Pkce.new()
    code = (await client.sign_in(pkce))["code"]
    status, tokens = await client.exchange(code, pkce)
    assert status == 200

    status, body = await client.exchange(code, pkce)

    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await client.refresh(tokens["refresh_token"]))[1]["error"] == "invalid_grant"  # RFC 6749 §4.1.2


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: OidcClient, issuer: RunningIssuer
) -> None:
    first = await client.code_flow(sub="carol")
    old_id = await client.verify(first["id_token"], client.client_id)
    issuer.clock.advance(10)

    status, second = await client.refresh(first["refresh_token"])

    assert status == 200, second
    assert second["refresh_token"] != first["refresh_token"]
    new_id = await client.verify(second["id_token"], client.client_id, leeway=15)
    assert (new_id["sub"], new_id["sid"], new_id["aud"]) == ("carol", old_id["sid"], client.client_id)
    assert "nonce" not in new_id  # OIDC Core §12.2
    assert new_id["iat"] == old_id["iat"] + 10
    status, third = await client.refresh(second["refresh_token"])  # the new one works
    assert status == 200
    # The spent one is refused, and its reuse ends the family: the newest is refused too.
    assert (await client.refresh(first["refresh_token"]))[1]["error"] == "invalid_grant"
    assert (await client.refresh(third["refresh_token"]))[1]["error"] == "invalid_grant"


async def test_dev_revoke_makes_refresh_fail(client: OidcClient, issuer: RunningIssuer) -> None:
    alice = await client.code_flow(sub="alice")
    bob = await client.code_flow(sub="bob")

    async with client.http.post(f"{issuer.url}/dev/revoke", data={"sub": "alice"}) as response:
        assert (await response.json())["revoked"] == 1

    assert (await client.refresh(alice["refresh_token"]))[1]["error"] == "invalid_grant"
    status, bob = await client.refresh(bob["refresh_token"])
    assert status == 200
    async with client.http.post(f"{issuer.url}/dev/revoke") as response:  # no sub: everyone
        assert (await response.json())["revoked"] == 1
    assert (await client.refresh(bob["refresh_token"]))[1]["error"] == "invalid_grant"


async def test_lifetimes_follow_the_clock(client: OidcClient, issuer: RunningIssuer) -> None:
    pkce = Pkce.new()
    late_code = (await client.sign_in(pkce))["code"]
    issuer.clock.advance(61)  # codes live 60 s
    assert (await client.exchange(late_code, pkce))[1]["error"] == "invalid_grant"

    tokens = await client.code_flow()
    access = await client.verify(tokens["access_token"], AUDIENCE, leeway=70)
    assert access["exp"] == int(issuer.clock.now) + 120  # token_lifetime
    issuer.clock.advance(3601)  # past refresh_lifetime
    assert (await client.refresh(tokens["refresh_token"]))[1]["error"] == "invalid_grant"


@pytest.mark.parametrize("method", ["basic", "post", "missing", "wrong", "both"])
async def test_a_client_secret_when_configured(
    tmp_path: Path, http: aiohttp.ClientSession, method: str
) -> None:
    async with login_issuer(tmp_path, LoginSettings(client_secret=SECRET)) as issuer:
        client = OidcClient(http, issuer.url)
        pkce = Pkce.new()
        code = (await client.sign_in(pkce))["code"]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
                "code_verifier": pkce.verifier}  # fmt: skip
        basic = None
        if method in ("basic", "both"):
            basic = (client.client_id, SECRET)
        if method in ("post", "both", "wrong"):
            form |= {"client_id": client.client_id, "client_secret": SECRET if method != "wrong" else "nope"}
        if method == "missing":
            form["client_id"] = client.client_id

        status, body, headers = await client.token(form, basic=basic)

    if method in ("basic", "post"):
        assert status == 200, body
        assert headers["Cache-Control"] == "no-store"
    elif method == "both":
        assert (status, body["error"]) == (400, "invalid_request")
    else:
        assert (status, body["error"]) == (401, "invalid_client")
        assert headers["WWW-Authenticate"].startswith("Basic")


async def test_basic_credentials_are_form_urlencoded(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with login_issuer(tmp_path, LoginSettings(client_secret=SECRET)) as issuer:
        client = OidcClient(http, issuer.url, client_id="my app")
        pkce = Pkce.new()
        code = (await client.sign_in(pkce))["code"]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri,
                "code_verifier": pkce.verifier}  # fmt: skip
        status, body, _ = await client.token(form, basic=("my app", SECRET))  # sent form-urlencoded

    assert status == 200, body


async def test_a_public_client_may_send_a_secret_that_is_ignored(client: OidcClient) -> None:
    client.secret = "anything"
    assert (await client.code_flow())["access_token"]


async def test_token_endpoint_errors(client: OidcClient) -> None:
    status, body, headers = await client.token({"grant_type": "password", "client_id": "x"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    assert headers["Cache-Control"] == "no-store"
    assert (await client.token({"client_id": "x"}))[1]["error"] == "invalid_request"
    assert (await client.token({"grant_type": "authorization_code", "client_id": "x"}))[1]["error"] == (
        "invalid_request"
    )
    assert (await client.token({"grant_type": "authorization_code"}))[0] == 401
    async with client.http.post(f"{client.issuer}/token", json={"grant_type": "refresh_token"}) as response:
        assert (response.status, (await response.json())["error"]) == (400, "invalid_request")


async def test_deny_sends_access_denied(client: OidcClient, issuer: RunningIssuer) -> None:
    redirect = await client.sign_in(Pkce.new(), state="s-9", action="deny")

    assert redirect["error"] == "access_denied"
    assert (redirect["state"], redirect["iss"]) == ("s-9", issuer.url)
    assert "code" not in redirect


async def test_bad_requests_go_back_to_the_client_or_onto_a_page(
    client: OidcClient, issuer: RunningIssuer
) -> None:
    params = client.request_params(Pkce.new(), "openid", "st", None)

    no_pkce = await client.authorize(**{**params, "code_challenge_method": "plain"})
    assert no_pkce.status == 302
    answer = query_of(no_pkce.headers["Location"])
    assert (answer["error"], answer["state"], answer["iss"]) == ("invalid_request", "st", issuer.url)
    assert (
        query_of((await client.authorize(**{**params, "response_type": "token"})).headers["Location"])[
            "error"
        ]
        == "unsupported_response_type"
    )
    for unusable in ("/relative", "javascript:alert(1)", "http://127.0.0.1:9/cb#frag"):
        page = await client.authorize(**{**params, "redirect_uri": unusable})
        assert page.status == 400, unusable
        assert page.content_type == "text/html"
    assert (await client.authorize(**{k: v for k, v in params.items() if k != "client_id"})).status == 400


async def test_reflected_values_are_html_escaped(client: OidcClient) -> None:
    script = "<script>alert(1)</script>"
    params = client.request_params(Pkce.new(), "openid x<img>", script, None)
    params["client_id"] = f'"{script}'

    page = await client.authorize(**params)
    text = await page.text()

    assert page.status == 200
    assert "<script>" not in text and "<img>" not in text
    assert "&lt;script&gt;" in text and "&quot;" in text
    # The state is kept server-side, not in the page, and comes back as it was sent.
    bad = await client.authorize(**{**params, "redirect_uri": f"x{script}"})
    assert bad.status == 400
    assert "<script>" not in await bad.text()


async def test_an_unknown_pending_request_is_refused(client: OidcClient, issuer: RunningIssuer) -> None:
    form = {"pending": "forged", "sub": "mallory", "action": "sign-in"}
    async with client.http.post(f"{issuer.url}/authorize", data=form, allow_redirects=False) as response:
        assert response.status == 400
        assert "Location" not in response.headers


async def test_logout_redirects_with_state_and_revokes_refresh(
    client: OidcClient, issuer: RunningIssuer
) -> None:
    tokens = await client.code_flow()
    other = await client.code_flow(sub="bob")  # another session stays signed in
    issuer.clock.advance(500)  # an expired hint is still a hint
    params = {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": "http://127.0.0.1:9/bye",
              "state": "after", "client_id": client.client_id}  # fmt: skip

    async with client.http.get(f"{issuer.url}/logout", params=params, allow_redirects=False) as response:
        assert response.status == 302
        location = response.headers["Location"]

    assert location == "http://127.0.0.1:9/bye?state=after"
    assert (await client.refresh(tokens["refresh_token"]))[1]["error"] == "invalid_grant"
    assert (await client.refresh(other["refresh_token"]))[0] == 200


async def test_logout_without_a_valid_hint(client: OidcClient, issuer: RunningIssuer) -> None:
    redirect_only = {"post_logout_redirect_uri": "http://evil.example/"}
    async with client.http.get(f"{issuer.url}/logout", params=redirect_only, allow_redirects=False) as page:
        assert page.status == 200  # no proof of which client asks: no redirect
        assert 'id="signed-out"' in await page.text()
    forged = jwt.encode({"iss": issuer.url, "sub": "a", "aud": "web-app", "sid": "x"}, "k" * 32, "HS256")
    async with client.http.get(f"{issuer.url}/logout", params={"id_token_hint": forged}) as page:
        assert page.status == 400


class LogoutReceiver:
    """An RP's back-channel logout endpoint (OIDC Back-Channel Logout 1.0 §2.5)."""

    def __init__(self) -> None:
        self.tokens: asyncio.Queue[str] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert request.content_type == "application/x-www-form-urlencoded"
        self.tokens.put_nowait(str(form["logout_token"]))
        return web.Response(status=200)


async def test_back_channel_logout_posts_a_logout_token(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    receiver = LogoutReceiver()
    app = web.Application()
    app.router.add_post("/backchannel", receiver.handle)
    sock = listen_socket("127.0.0.1", 0)
    uri = f"http://127.0.0.1:{bound_port(sock)}/backchannel"
    runner = await start_site(app, sock)
    try:
        async with login_issuer(tmp_path, backchannel=(uri,)) as issuer:
            client = OidcClient(http, issuer.url)
            tokens = await client.code_flow()
            sid = (await client.verify(tokens["id_token"], client.client_id))["sid"]
            async with http.get(f"{issuer.url}/logout", params={"id_token_hint": tokens["id_token"]}) as page:
                assert page.status == 200
            logout_token = await asyncio.wait_for(receiver.tokens.get(), timeout=5)
            claims = await client.verify(logout_token, client.client_id)
    finally:
        await runner.cleanup()

    assert header_of(logout_token)["typ"] == "logout+jwt"
    assert (claims["sid"], claims["sub"]) == (sid, "alice")
    assert claims["events"] == {"http://schemas.openid.net/event/backchannel-logout": {}}
    assert "nonce" not in claims and claims["jti"]
    assert claims["exp"] - claims["iat"] == 120


async def test_an_unreachable_back_channel_does_not_hold_up_logout(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    closed = listen_socket("127.0.0.1", 0)
    uri = f"http://127.0.0.1:{bound_port(closed)}/gone"
    closed.close()
    async with login_issuer(tmp_path, backchannel=(uri,)) as issuer:
        client = OidcClient(http, issuer.url)
        tokens = await client.code_flow()
        async with http.get(f"{issuer.url}/logout", params={"id_token_hint": tokens["id_token"]}) as page:
            assert page.status == 200


def test_serve_rejects_bad_sign_in_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("x\n")
    base = ["dev-issuer", "serve", "--port", "0", "--key-dir", str(tmp_path / "keys")]
    for extra, message in [
        (["--client-secret", "a", "--client-secret-file", str(secret_file)], "one or the other"),
        (["--token-lifetime", "0"], "positive"),
        (["--backchannel-logout-uri", "not-a-url"], "absolute"),
    ]:
        assert cli.main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "keys").exists()  # refused before anything was written
