"""The development issuer's HTTP app: OIDC discovery, the JWKS of the key directory, and a browser
sign-in (authorization code flow with PKCE, refresh tokens, RP-initiated and back-channel logout).
The flow's state lives in ext_authz.dev.login, its pages in ext_authz.dev.loginpage."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web
from multidict import MultiMapping

from ext_authz import jws
from ext_authz.dev import loginpage
from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.http import (
    DEFAULT_HOST,
    bound_port,
    check_bind,
    is_loopback,
    listen_socket,
    start_site,
    stop_on_signals,
    url_host,
)
from ext_authz.dev.keys import DEFAULT_ALG, DEFAULT_AUDIENCE, IssuerSettings, KeyDir
from ext_authz.dev.login import (
    SCOPES_SUPPORTED,
    AuthorizeError,
    Clock,
    Grant,
    Identity,
    LoginSettings,
    LoginState,
    Session,
    TokenError,
    access_claims,
    check_client,
    client_auth,
    id_claims,
    is_absolute_http_url,
    logout_claims,
    origin,
    parse_authorize,
    with_params,
)

DEFAULT_PORT = 8999
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"
AUTHORIZE_PATH = "/authorize"
TOKEN_PATH = "/token"  # noqa: S105 -- a path, not a password
LOGOUT_PATH = "/logout"
REVOKE_PATH = "/dev/revoke"
BACKCHANNEL_TIMEOUT = 5.0
SHUTDOWN_GRACE = 1.0

BANNER = """\
*****************************************************************************
*  ext-authz dev-issuer: DEVELOPMENT ONLY.                                  *
*  It signs any token it is asked to; anyone who can read its key directory *
*  can mint tokens. Never configure a real deployment to trust it.          *
*****************************************************************************"""


def issuer_app(key_dir: KeyDir, issuer_url: str, login: LoginConfig | None = None) -> web.Application:
    """Discovery, JWKS and sign-in; keys are re-read from the directory on every request (rotation)."""

    async def discovery(_: web.Request) -> web.Response:
        algs = sorted({key.alg for key in key_dir.all_keys()})
        return web.json_response(
            {
                # OIDC Discovery §4.3: identical to the URL this document was fetched under.
                "issuer": issuer_url,
                "jwks_uri": f"{issuer_url}{JWKS_PATH}",
                "id_token_signing_alg_values_supported": algs,
                "response_types_supported": ["code", "id_token"],
                "subject_types_supported": ["public"],
                "authorization_endpoint": f"{issuer_url}{AUTHORIZE_PATH}",
                "token_endpoint": f"{issuer_url}{TOKEN_PATH}",
                "end_session_endpoint": f"{issuer_url}{LOGOUT_PATH}",
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "none",
                ],
                "authorization_response_iss_parameter_supported": True,  # RFC 9207 §3
                "scopes_supported": list(SCOPES_SUPPORTED),
                "backchannel_logout_supported": True,
                "backchannel_logout_session_supported": True,
            }
        )

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(key_dir.jwks(), headers={"Cache-Control": "max-age=60"})

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=f"{BANNER}\n\ndiscovery: {issuer_url}{DISCOVERY_PATH}\n")

    app = web.Application()
    app.router.add_get(DISCOVERY_PATH, discovery)
    app.router.add_get(JWKS_PATH, jwks)
    app.router.add_get("/", index)
    add_login_routes(app, key_dir, issuer_url, login or LoginConfig())
    return app


@dataclass(frozen=True, slots=True)
class LoginConfig:
    """What the sign-in endpoints need beyond the key directory and the issuer URL."""

    settings: LoginSettings = field(default_factory=LoginSettings)
    audience: str = DEFAULT_AUDIENCE  # of access tokens
    backchannel_logout_uris: tuple[str, ...] = ()
    clock: Clock = time.time
    err: TextIO = field(default_factory=lambda: sys.stderr)  # as it is then, not at import


LOGIN_STATE = web.AppKey("login_state", LoginState)

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",  # no clickjacking of the sign-in buttons
    "Referrer-Policy": "no-referrer",  # the page's URL carries state and nonce
}
_JSON_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


def _html(text: str, status: int = 200, form_origin: str | None = None) -> web.Response:
    # form-action also governs the redirect that answers the form (browsers enforce it on
    # redirects), so the client's origin is allowed too; is_absolute_http_url vetted its host.
    form_action = "'self'" if form_origin is None else f"'self' {form_origin}"
    csp = f"default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; frame-ancestors 'none'"
    headers = {**_PAGE_HEADERS, "Content-Security-Policy": csp}
    return web.Response(text=text, status=status, content_type="text/html", headers=headers)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _single_values(multi: MultiMapping[Any]) -> tuple[dict[str, str], list[str]]:
    """The parameters, and those sent more than once (RFC 6749 §3.1: "MUST NOT be included more than
    once"); file uploads are ignored."""
    values: dict[str, str] = {}
    repeated: list[str] = []
    for name in dict.fromkeys(multi.keys()):
        found = [v for v in multi.getall(name) if isinstance(v, str)]
        if len(found) > 1:
            repeated.append(name)
        if found:
            values[name] = found[0]
    return values, repeated


class _Login:
    """The sign-in endpoints of one app: handlers over a LoginState, signing with the key directory."""

    def __init__(self, key_dir: KeyDir, issuer_url: str, config: LoginConfig) -> None:
        self.key_dir = key_dir
        self.issuer_url = issuer_url
        self.config = config
        self.state = LoginState(config.settings, config.clock)
        self.client: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # --- the authorization endpoint (RFC 6749 §4.1.1, §4.1.2) ---

    async def authorize_page(self, request: web.Request) -> web.Response:
        params, repeated = _single_values(request.query)
        try:
            authorize = parse_authorize(params, repeated)
        except AuthorizeError as exc:
            if not exc.redirectable:
                return _html(loginpage.error_page(exc.description), status=400)
            return self._answer(params["redirect_uri"], params.get("state"), error=exc)
        pending_id = self.state.begin(authorize)
        return _html(loginpage.login_page(pending_id, authorize), form_origin=origin(authorize.redirect_uri))

    async def authorize_form(self, request: web.Request) -> web.Response:
        posted = await request.post()
        form, _ = _single_values(posted)
        scopes = tuple(v for v in posted.getall("scope", []) if isinstance(v, str))
        pending_id = form.get("pending", "")
        authorize = self.state.pending(pending_id)
        if authorize is None:
            return _html(loginpage.error_page("unknown or expired sign-in request; start again"), 400)
        action = form.get("action")
        if action == "deny":
            self.state.deny(pending_id)
            denied = AuthorizeError("access_denied", "the user denied the request")
            return self._answer(authorize.redirect_uri, authorize.state, error=denied)
        if action != "sign-in":
            return _html(loginpage.error_page("action: sign-in or deny"), status=400)
        try:
            identity = Identity.from_form(form.get("sub", ""), form.get("groups", ""), form.get("email", ""))
        except ValueError as exc:
            page = loginpage.login_page(pending_id, authorize, error=str(exc))
            return _html(page, status=400, form_origin=origin(authorize.redirect_uri))
        approved = self.state.approve(pending_id, identity, scopes)
        if approved is None:
            return _html(loginpage.error_page("unknown or expired sign-in request; start again"), 400)
        code, redirect_uri = approved
        return self._answer(redirect_uri, authorize.state, code=code)

    def _answer(
        self,
        redirect_uri: str,
        state: str | None,
        *,
        code: str | None = None,
        error: AuthorizeError | None = None,
    ) -> web.Response:
        """The authorization response; RFC 9207 §2: with `iss`, errors included."""
        params: dict[str, str | None] = {"code": code}
        if error is not None:
            params = {"error": error.error, "error_description": error.description}
        params.update({"state": state, "iss": self.issuer_url})
        return _redirect(with_params(redirect_uri, params))

    # --- the token endpoint (RFC 6749 §3.2, §4.1.3, §6) ---

    async def token(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self._token(request), headers=_JSON_HEADERS)
        except TokenError as exc:
            headers = dict(_JSON_HEADERS)
            if exc.status == 401:
                # RFC 6749 §5.2 with RFC 7235 §3.1: a 401 names the scheme to authenticate with.
                headers["WWW-Authenticate"] = 'Basic realm="ext-authz dev-issuer"'
            body = {"error": exc.error, "error_description": exc.description}
            return web.json_response(body, status=exc.status, headers=headers)

    async def _token(self, request: web.Request) -> dict[str, object]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise TokenError("invalid_request", "the body must be application/x-www-form-urlencoded")
        form, repeated = _single_values(await request.post())
        if repeated:
            raise TokenError("invalid_request", f"parameter repeated: {repeated[0]}")
        auth = client_auth(request.headers.get("Authorization"), form)
        check_client(auth, self.config.settings.client_secret)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            if not form.get("code"):
                raise TokenError("invalid_request", "code is missing")
            grant = self.state.redeem_code(
                form["code"], auth.client_id, form.get("redirect_uri"), form.get("code_verifier")
            )
        elif grant_type == "refresh_token":
            if not form.get("refresh_token"):
                raise TokenError("invalid_request", "refresh_token is missing")
            grant = self.state.rotate_refresh(form["refresh_token"], auth.client_id, form.get("scope"))
        elif grant_type is None:
            raise TokenError("invalid_request", "grant_type is missing")
        else:
            raise TokenError("unsupported_grant_type", "grant_type: authorization_code or refresh_token")
        return self._tokens(grant)

    def _tokens(self, grant: Grant) -> dict[str, object]:
        """RFC 6749 §5.1; an ID token when openid was granted (OIDC Core §3.1.3.3)."""
        now, lifetime = self.state.now(), self.config.settings.token_lifetime
        access = access_claims(
            grant, issuer=self.issuer_url, audience=self.config.audience, now=now, lifetime=lifetime
        )
        answer: dict[str, object] = {
            "access_token": self._sign(access, "JWT"),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": " ".join(grant.scopes),
        }
        if "openid" in grant.scopes:
            answer["id_token"] = self._sign(
                id_claims(grant, issuer=self.issuer_url, now=now, lifetime=lifetime), "JWT"
            )
        refresh = self.state.issue_refresh(grant)
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    def _sign(self, payload: Mapping[str, object], typ: str) -> str:
        key = self.key_dir.signing_key()
        return jws.sign({"alg": key.alg, "kid": key.kid, "typ": typ}, payload, key.private_key, key.alg)

    # --- RP-Initiated Logout 1.0 and Back-Channel Logout 1.0 ---

    async def logout(self, request: web.Request) -> web.Response:
        source = request.query if request.method == "GET" else await request.post()
        params, _ = _single_values(source)
        hint = params.get("id_token_hint")
        claims = self._verify_hint(hint) if hint else None
        if hint and claims is None:
            return _html(loginpage.error_page("id_token_hint: not an ID token of this issuer"), 400)
        client_id = params.get("client_id")
        if claims is not None and client_id is not None and claims["aud"] != client_id:
            return _html(loginpage.error_page("client_id differs from the id_token_hint's audience"), 400)
        if claims is not None:
            ended = self.state.end_session(str(claims["sid"]))
            if ended is not None:
                self._backchannel(ended)
        target = params.get("post_logout_redirect_uri")
        # §3: redirect only to a URI the client is known to use; with no registration here, the
        # proof is a valid id_token_hint, so without one the user sees the signed-out page.
        if target and claims is not None and is_absolute_http_url(target):
            return _redirect(with_params(target, {"state": params.get("state")}))
        return _html(loginpage.signed_out_page())

    def _verify_hint(self, token: str) -> dict[str, Any] | None:
        """An ID token this issuer signed; RP-Initiated Logout §2: an expired one is still a hint."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = next((k for k in self.key_dir.all_keys() if k.kid == kid), None)
            if key is None:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key.private_key.public_key(),
                algorithms=[key.alg],
                issuer=self.issuer_url,
                options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False,
                         "require": ["sub", "aud", "sid"]},
            )  # fmt: skip
        except jwt.PyJWTError:
            return None
        return claims if isinstance(claims.get("aud"), str) else None

    def _backchannel(self, session: Session) -> None:
        """Best effort, off the request: the user's redirect never waits for a relying party."""
        if not self.config.backchannel_logout_uris or self.client is None:
            return
        token = self._sign(logout_claims(session, issuer=self.issuer_url, now=self.state.now()), "logout+jwt")
        for uri in self.config.backchannel_logout_uris:
            task = asyncio.get_running_loop().create_task(self._post_logout_token(self.client, uri, token))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _post_logout_token(self, client: aiohttp.ClientSession, uri: str, token: str) -> None:
        where = origin(uri) + urlsplit(uri).path  # never the query: it may carry a secret
        timeout = aiohttp.ClientTimeout(total=BACKCHANNEL_TIMEOUT)
        try:
            async with client.post(uri, data={"logout_token": token}, timeout=timeout) as response:
                if not 200 <= response.status < 300:  # §2.8: the RP answers 200 OK
                    print(f"ext-authz dev-issuer: back-channel logout to {where}: HTTP {response.status}",
                          file=self.config.err, flush=True)  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            print(f"ext-authz dev-issuer: back-channel logout to {where} failed: {type(exc).__name__}",
                  file=self.config.err, flush=True)  # fmt: skip

    async def lifecycle(self, _: web.Application) -> AsyncIterator[None]:
        self.client = aiohttp.ClientSession()
        try:
            yield
        finally:
            await self._drain()
            await self.client.close()

    async def _drain(self) -> None:
        """Give logout tokens in flight a moment, then cancel them: no task outlives the app."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # --- the development-only test hook ---

    async def revoke(self, request: web.Request) -> web.Response:
        """DEVELOPMENT ONLY: revoke refresh tokens (of `sub`, else everyone's) so a test can watch a
        refresh being refused."""
        form, _ = _single_values(await request.post())
        revoked = self.state.revoke(form.get("sub") or None)
        return web.json_response({"revoked": revoked}, headers=_JSON_HEADERS)


def add_login_routes(app: web.Application, key_dir: KeyDir, issuer_url: str, config: LoginConfig) -> None:
    login = _Login(key_dir, issuer_url, config)
    app[LOGIN_STATE] = login.state
    app.cleanup_ctx.append(login.lifecycle)
    app.router.add_get(AUTHORIZE_PATH, login.authorize_page)
    app.router.add_post(AUTHORIZE_PATH, login.authorize_form)
    app.router.add_post(TOKEN_PATH, login.token)
    app.router.add_get(LOGOUT_PATH, login.logout)
    app.router.add_post(LOGOUT_PATH, login.logout)
    app.router.add_post(REVOKE_PATH, login.revoke)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How `dev-issuer serve` listens and what it publishes."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    issuer_url: str | None = None  # default http://HOST:PORT
    audience: str | None = None  # default: the key directory's, else DEFAULT_AUDIENCE
    alg: str = DEFAULT_ALG  # of a first key
    allow_non_loopback: bool = False
    client_secret: str | None = None  # set: token requests must authenticate with it
    client_secret_file: Path | None = None  # or read from here (kept out of `ps`)
    token_lifetime: int = 300  # of access and ID tokens, seconds
    refresh_lifetime: int = 86400
    backchannel_logout_uri: Sequence[str] = ()


def _client_secret(options: ServeOptions) -> str | None:
    if options.client_secret is not None and options.client_secret_file is not None:
        raise DevIssuerError("--client-secret and --client-secret-file: one or the other")
    if options.client_secret_file is None:
        return options.client_secret or None
    try:
        secret = options.client_secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DevIssuerError(
            f"--client-secret-file {options.client_secret_file}: unreadable ({exc})"
        ) from None
    if not secret:
        raise DevIssuerError(f"--client-secret-file {options.client_secret_file}: empty")
    return secret


def _login_config(options: ServeOptions, audience: str, err: TextIO) -> LoginConfig:
    if options.token_lifetime <= 0 or options.refresh_lifetime <= 0:
        raise DevIssuerError("--token-lifetime and --refresh-lifetime: a positive number of seconds")
    for uri in options.backchannel_logout_uri:
        if not is_absolute_http_url(uri):
            raise DevIssuerError(f"--backchannel-logout-uri {uri!r}: an absolute http(s) URL")
    settings = LoginSettings(options.token_lifetime, options.refresh_lifetime, _client_secret(options))
    return LoginConfig(settings, audience, tuple(options.backchannel_logout_uri), err=err)


async def serve_issuer(key_dir: KeyDir, options: ServeOptions, err: TextIO = sys.stderr) -> None:
    """Serve until SIGINT or SIGTERM."""
    host, issuer_url = options.host, options.issuer_url
    check_bind(host, options.allow_non_loopback)
    if issuer_url is not None and (issuer_url.endswith("/") or not urlsplit(issuer_url).hostname):
        raise DevIssuerError(
            "--issuer-url: an absolute URL without a trailing slash, e.g. http://issuer:8999"
        )
    audience = options.audience or key_dir.saved_audience() or DEFAULT_AUDIENCE
    login = _login_config(options, audience, err)  # before anything is written or bound
    key = key_dir.ensure_key(options.alg)
    sock = listen_socket(host, options.port)
    url = issuer_url or f"http://{url_host(host)}:{bound_port(sock)}"
    settings = IssuerSettings(url, audience)
    key_dir.write_settings(settings)
    runner = await start_site(issuer_app(key_dir, url, login), sock)
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop):
            print(BANNER, file=err)
            if not is_loopback(host):
                print(f"WARNING: listening on {host}, beyond loopback", file=err)
            print(
                f"ext-authz dev-issuer: serving {url} (audience {settings.audience}, signing kid "
                f"{key.kid}, keys in {key_dir.path})",
                file=err,
            )
            clients = "client secret required" if login.settings.client_secret else "public clients"
            print(f"sign-in: {url}{AUTHORIZE_PATH} ({clients})", file=err, flush=True)
            await stop.wait()
    finally:
        await runner.cleanup()
