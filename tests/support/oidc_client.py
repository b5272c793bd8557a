"""The development issuer's sign-in in this process (port 0, a movable clock) and a small OIDC client
that walks the authorization code flow with PKCE over real HTTP, as a browser and an RP would."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus, urlsplit

import aiohttp
import jwt
from aiohttp import web

from ext_authz.dev.http import bound_port, listen_socket
from ext_authz.dev.issuer import LoginConfig, issuer_app
from ext_authz.dev.keys import IssuerSettings, KeyDir
from ext_authz.dev.login import LoginSettings

AUDIENCE = "api"


@dataclass
class FakeClock:
    """Starts at the real time (so PyJWT accepts fresh tokens) and moves only when told."""

    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)  # 64 characters of the RFC 7636 §4.1 alphabet
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


@dataclass(frozen=True, slots=True)
class RunningIssuer:
    url: str
    key_dir: KeyDir
    clock: FakeClock


async def start_site(app: web.Application, sock: socket.socket) -> web.AppRunner:
    """As ext_authz.dev.http.start_site, with shutdown_timeout on the runner, where aiohttp 3.10+
    wants it (on the site it warns, and warnings are errors here)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return runner


@asynccontextmanager
async def login_issuer(
    tmp_path: Path,
    settings: LoginSettings | None = None,
    backchannel: tuple[str, ...] = (),
    clock: FakeClock | None = None,
) -> AsyncIterator[RunningIssuer]:
    """issuer_app on 127.0.0.1, an ephemeral port, a fresh ES256 key."""
    key_dir = KeyDir(tmp_path / "keys")
    key_dir.ensure_key("ES256")
    sock = listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(sock)}"
    key_dir.write_settings(IssuerSettings(url, AUDIENCE))
    clock = clock or FakeClock()
    config = LoginConfig(settings or LoginSettings(), AUDIENCE, backchannel, clock)
    runner = await start_site(issuer_app(key_dir, url, config), sock)
    try:
        yield RunningIssuer(url, key_dir, clock)
    finally:
        await runner.cleanup()


def query_of(location: str) -> dict[str, str]:
    """A redirect's query parameters (each expected once)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query, keep_blank_values=True).items()}


_PENDING = re.compile(r'id="pending" name="pending" value="([^"]+)"')


@dataclass
class OidcClient:
    """One relying party: its id, redirect URI and (optional) secret, over one aiohttp session."""

    http: aiohttp.ClientSession
    issuer: str
    client_id: str = "web-app"
    redirect_uri: str = "http://127.0.0.1:9/callback?keep=1"
    secret: str | None = None

    async def authorize(self, **params: str) -> aiohttp.ClientResponse:
        """GET /authorize (no redirects followed); the response is read before it is returned."""
        async with self.http.get(
            f"{self.issuer}/authorize", params=params, allow_redirects=False
        ) as response:
            await response.read()
            return response

    def request_params(self, pkce: Pkce, scope: str, state: str, nonce: str | None) -> dict[str, str]:
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if nonce is not None:
            params["nonce"] = nonce
        return params

    async def sign_in(
        self,
        pkce: Pkce,
        *,
        sub: str = "alice",
        groups: str = "staff",
        scope: str = "openid profile email offline_access",
        state: str = "st-1",
        nonce: str | None = "n-1",
        action: str = "sign-in",
        granted: tuple[str, ...] | None = None,
    ) -> dict[str, str]:
        """The login page filled in and submitted: the query of the redirect to the client."""
        page = await self.authorize(**self.request_params(pkce, scope, state, nonce))
        assert page.status == 200, await page.text()
        match = _PENDING.search(await page.text())
        assert match is not None
        form: list[tuple[str, str]] = [
            ("pending", match.group(1)), ("sub", sub), ("groups", groups), ("email", ""), ("action", action),
        ]  # fmt: skip
        form += [("scope", s) for s in (scope.split() if granted is None else granted)]
        async with self.http.post(f"{self.issuer}/authorize", data=form, allow_redirects=False) as response:
            assert response.status == 302, await response.text()
            location = response.headers["Location"]
        assert location.startswith(self.redirect_uri.split("?")[0])
        return query_of(location)

    async def token(
        self, form: Mapping[str, str], *, basic: tuple[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        """POST /token as given, `basic` as HTTP Basic: (status, JSON body, headers)."""
        headers = {}
        if basic is not None:
            # RFC 6749 §2.3.1: id and secret are form-urlencoded, then joined by ":".
            joined = ":".join(quote_plus(part) for part in basic)
            headers["Authorization"] = "Basic " + base64.b64encode(joined.encode()).decode("ascii")
        async with self.http.post(f"{self.issuer}/token", data=dict(form), headers=headers) as response:
            body = await response.json()
            assert isinstance(body, dict)
            return response.status, body, response.headers

    def client_form(self) -> dict[str, str]:
        form = {"client_id": self.client_id}
        if self.secret is not None:
            form["client_secret"] = self.secret
        return form

    async def exchange(self, code: str, pkce: Pkce, **overrides: str) -> tuple[int, dict[str, Any]]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": pkce.verifier,
            **self.client_form(),
            **overrides,
        }
        status, body, _ = await self.token(form)
        return status, body

    async def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token, **self.client_form()}
        status, body, _ = await self.token(form)
        return status, body

    async def code_flow(self, **sign_in: Any) -> dict[str, Any]:
        """Sign in and exchange the code: the token response."""
        pkce = Pkce.new()
        redirect = await self.sign_in(pkce, **sign_in)
        status, body = await self.exchange(redirect["code"], pkce)
        assert status == 200, body
        return body

    async def verify(self, token: str, audience: str, leeway: float = 0.0) -> dict[str, Any]:
        """A token checked against the issuer's JWKS, as an RP would; `leeway` for a moved clock."""
        async with self.http.get(f"{self.issuer}/jwks.json") as response:
            jwks = jwt.PyJWKSet.from_dict(await response.json())
        kid = jwt.get_unverified_header(token)["kid"]
        key = next(k for k in jwks.keys if k.key_id == kid)
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["ES256"], audience=audience, issuer=self.issuer, leeway=leeway
        )
        return claims
