"""A browser sign-in stack on loopback: the dev issuer (with its login endpoints, in a thread of
its own), the echo backend, a real ext-authz process with `sessions:` and a real Envoy; and a
small cookie-keeping client that walks the flow as a browser would (without one)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ext_authz.dev.http import bound_port, listen_socket
from ext_authz.dev.issuer import LoginConfig, issuer_app
from ext_authz.dev.keys import IssuerSettings, KeyDir
from ext_authz.dev.login import LoginSettings
from tests.support.echo import EchoBackend, EchoRequest
from tests.support.envoy import TRACE_HEADER, EnvoyProcess, HttpResponse, send, start_envoy
from tests.support.oidc_client import start_site
from tests.support.processes import ExtAuthzProcess, start_ext_authz

CLIENT_ID = "web-app"
AUDIENCE = "api"
SESSION_SECRET = "ab" * 32
COOKIE = "__Host-ext-authz"
NAVIGATE = (("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate"), ("Sec-Fetch-Site", "none"))


@dataclass
class ThreadedIssuer:
    """The dev issuer's app on 127.0.0.1 in a thread with its own loop (blocking callers, such as
    a WebDriver client or http.client, do not stop it)."""

    url: str
    key_dir: KeyDir
    _stop: threading.Event
    _thread: threading.Thread

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@contextlib.contextmanager
def threaded_issuer(
    tmp_path: Path, settings: LoginSettings, backchannel: Sequence[str] = ()
) -> Iterator[ThreadedIssuer]:
    key_dir = KeyDir(tmp_path / "issuer-keys")
    key_dir.ensure_key("ES256")
    sock = listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(sock)}"
    key_dir.write_settings(IssuerSettings(url, AUDIENCE))
    stop = threading.Event()
    started = threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        config = LoginConfig(settings, AUDIENCE, tuple(backchannel), time.time)
        runner = await start_site(issuer_app(key_dir, url, config), sock)
        started.set()
        try:
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # reported to the test
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="dev-issuer", daemon=True)
    thread.start()
    assert started.wait(10), "the dev issuer did not start"
    if failure:
        raise failure[0]
    issuer = ThreadedIssuer(url, key_dir, stop, thread)
    try:
        yield issuer
    finally:
        issuer.close()


def signin_config(issuer: str, path: Path, *, admin: bool | str = False, **sessions: Any) -> Path:
    """``admin``: True for an admin listener on an ephemeral port, or its HOST:PORT."""
    secret = path.parent / "session-keys"
    secret.write_text(f"{SESSION_SECRET}\n")
    document: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "providers": [
            {
                "name": "dev",
                "issuer": issuer,
                "audiences": [AUDIENCE],
                "allow_insecure_http": True,
                "clock_skew_seconds": 0,
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-user-groups", "claim": "groups"},
                    {"header": "x-user-scope", "claim": "scope"},
                    {"header": "x-user-sid", "claim": "sid"},
                ],
                "login": {
                    "client_id": CLIENT_ID,
                    "scopes": ["openid", "profile", "email", "offline_access"],
                    "forward_access_token": "x-forwarded-access-token",
                },
            }
        ],
        "sessions": {"secret_file": secret.name, "refresh_before_seconds": 5, **sessions},
        "rules": [
            {"name": "health", "match": {"paths": ["/healthz"]}, "allow": "anonymous"},
            {"name": "api", "match": {"paths": ["/api/*"]}, "require": {}},
            {
                "name": "admin",
                "match": {"paths": ["/app/admin/*"]},
                "login": "dev",
                "require": {"groups": ["admin"]},
            },
            {
                "name": "app",
                "match": {"paths": ["/app/*", "/app"]},
                "login": "dev",
                "require": {"groups": ["staff"]},
            },
        ],
    }
    if admin:
        document["admin"] = admin if isinstance(admin, str) else "127.0.0.1:0"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def admin_address(authz: ExtAuthzProcess) -> str:
    """The bound admin address from the server's `admin listening` log line."""
    return authz.logged_address("admin listening")


@dataclass(frozen=True, slots=True)
class Answer:
    response: HttpResponse
    backend: EchoRequest | None

    def describe(self) -> str:
        seen = "backend not reached" if self.backend is None else f"backend saw {dict(self.backend)}"
        return f"{self.response.describe()}\n--- {seen}"


_PENDING = re.compile(r'name="pending" value="([^"]+)"')


@dataclass
class CookieBrowser:
    """Keeps cookies as a browser does for http://127.0.0.1 (a secure context: Secure cookies
    count), follows nothing by itself: each step is one request."""

    base: str  # Envoy's URL
    echo: EchoBackend
    jar: dict[str, str] = field(default_factory=dict)

    def _store(self, response: HttpResponse) -> None:
        for line in response.header_values("set-cookie"):
            pair, _, attributes = line.partition(";")
            name, _, value = pair.strip().partition("=")
            max_age = re.search(r"max-age=(-?\d+)", attributes, re.IGNORECASE)
            if max_age is not None and int(max_age.group(1)) <= 0:
                self.jar.pop(name, None)
            else:
                self.jar[name] = value

    def cookie_header(self) -> list[tuple[str, str]]:
        return [("Cookie", "; ".join(f"{k}={v}" for k, v in self.jar.items()))] if self.jar else []

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = NAVIGATE,
        *,
        body: bytes | None = None,
        host: str | None = None,
    ) -> Answer:
        trace = uuid.uuid4().hex
        lines = [(TRACE_HEADER, trace), *headers, *self.cookie_header()]
        response = send(self.base, method, path, lines, body=body, host=host)
        self._store(response)
        reached = [r for r in self.echo.requests if r.header_values(TRACE_HEADER) == [trace]]
        return Answer(response, reached[0] if reached else None)

    def get(self, path: str, headers: Sequence[tuple[str, str]] = NAVIGATE) -> Answer:
        return self.request("GET", path, headers)

    def sign_in_at_issuer(self, location: str, *, sub: str = "alice", groups: str = "staff") -> str:
        """At the IdP: GET the login page, POST the form; the redirect back (the callback URL)."""
        page = send(_origin(location), "GET", _path_query(location))
        assert page.status == 200, page.describe()
        pending = _PENDING.search(page.body.decode())
        assert pending is not None, page.describe()
        form = urllib.parse.urlencode(
            [
                ("pending", html.unescape(pending.group(1))),
                ("sub", sub),
                ("groups", groups),
                ("email", f"{sub}@example.com"),
                ("action", "sign-in"),
                *(("scope", s) for s in ("openid", "profile", "email", "offline_access")),
            ]
        ).encode()
        answer = send(
            _origin(location),
            "POST",
            "/authorize",
            [("Content-Type", "application/x-www-form-urlencoded")],
            body=form,
        )
        assert answer.status == 302, answer.describe()
        target = answer.header("location")
        assert target is not None
        return target

    def sign_in(self, path: str = "/app/", **user: str) -> Answer:
        """The whole flow from a navigation to ``path``: the answer to the return there."""
        start = self.get(path)
        assert start.response.status == 302, start.describe()
        location = start.response.header("location")
        assert location is not None
        callback = self.sign_in_at_issuer(location, **user)
        back = self.get(_path_query(callback))
        assert back.response.status == 302, back.describe()
        target = back.response.header("location")
        assert target is not None, back.describe()
        if target.startswith(self.base + "/"):  # nginx makes a path absolute: the same origin
            target = target[len(self.base) :]
        assert target.startswith("/") and not target.startswith("//"), back.describe()
        return self.get(target)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _path_query(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


@dataclass
class SigninStack:
    issuer: ThreadedIssuer
    echo: EchoBackend
    authz: ExtAuthzProcess
    envoy: EnvoyProcess
    # More replicas (each its own ext-authz and Envoy, one echo and one issuer), with replicas=N.
    others: list[tuple[ExtAuthzProcess, EnvoyProcess]] = field(default_factory=list)

    def browser(self, replica: int = 0) -> CookieBrowser:
        envoy = self.envoy if replica == 0 else self.others[replica - 1][1]
        return CookieBrowser(envoy.base_url, self.echo)


@contextlib.contextmanager
def signin_stack(
    tmp_path: Path,
    settings: LoginSettings | None = None,
    *,
    replicas: int = 1,
    admin: bool | str = False,
    backchannel_logout_uris: Sequence[str] = (),
    request_body_paths: Sequence[str] = (),
    **sessions: Any,
) -> Iterator[SigninStack]:
    with contextlib.ExitStack() as stack:
        issuer = stack.enter_context(
            threaded_issuer(tmp_path, settings or LoginSettings(), backchannel_logout_uris)
        )
        echo = stack.enter_context(EchoBackend())
        config = signin_config(issuer.url, tmp_path / "ext-authz.yaml", admin=admin, **sessions)
        running = []
        for _ in range(replicas):
            authz = stack.enter_context(start_ext_authz(config))
            envoy = stack.enter_context(
                start_envoy(authz.address, echo.port, request_body_paths=request_body_paths)
            )
            running.append((authz, envoy))
        (authz, envoy), *others = running
        yield SigninStack(issuer, echo, authz, envoy, others)
