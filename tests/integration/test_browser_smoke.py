"""A real headless Chromium through a cookie sign-in, and the secure-context rule for cookies.

The app (aiohttp, on its own thread's event loop: the WebDriver calls block) stands in for what the
OIDC tests will meet: /app/ without a session redirects to a login form, the form's POST sets a
Secure, HttpOnly, SameSite=Lax cookie and redirects back. The sign-in tests will serve that over
plain http on 127.0.0.1, which works only because Chromium counts loopback as a secure context;
the second test pins that down (and that a Secure cookie from any other http host is dropped).
"""

from __future__ import annotations

import asyncio
import html
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Self

import pytest
from aiohttp import web

from tests.support.browser import headless_chromium
from tests.support.lifecycle import StopOnExit

pytestmark = pytest.mark.timeout(20)

# A name that is not loopback-looking, resolved to the app by Chromium itself (no DNS, no hosts file).
OTHER_HOST = "app.test"


class SignInApp(StopOnExit):
    """The aiohttp app on 127.0.0.1:ephemeral, served by an event loop on a thread of its own."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sign-in-app", daemon=True)
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()
        self._seen: list[tuple[str, str]] = []  # (Host, Cookie) of each GET /echo
        self.port = 0

    def __enter__(self) -> Self:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def cookies_seen_by(self, host: str) -> list[str]:
        with self._lock:
            return [cookie for seen_host, cookie in self._seen if seen_host == f"{host}:{self.port}"]

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_get("/app/", self._app)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/set", self._set)
        app.router.add_get("/echo", self._echo)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _app(self, request: web.Request) -> web.Response:
        user = request.cookies.get("s")
        if not user:
            return web.Response(status=302, headers={"Location": "/login?return=/app/"})
        return _page(f"<p id='msg'>hello {html.escape(user)}</p>")

    async def _login_form(self, request: web.Request) -> web.Response:
        action = "/login?" + urllib.parse.urlencode({"return": _return_path(request)})
        return _page(
            f"<form method='post' action='{html.escape(action)}'>"
            "<input id='user' name='user' type='text'>"
            "<button id='go' type='submit'>Sign in</button></form>"
        )

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        response = web.Response(status=302, headers={"Location": _return_path(request)})
        response.set_cookie(
            "s", str(form.get("user", "")), path="/", httponly=True, samesite="Lax", secure=True
        )
        return response

    async def _set(self, request: web.Request) -> web.Response:
        response = _page("<p>set</p>")
        response.set_cookie("sec", "1", path="/", secure=True)
        response.set_cookie("plain", "1", path="/")  # the control: kept on any host
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        cookie = request.headers.get("Cookie", "")
        with self._lock:
            self._seen.append((request.host, cookie))
        return _page(f"<p id='cookie'>{html.escape(cookie)}</p>")


def _return_path(request: web.Request) -> str:
    path = request.query.get("return", "/app/")
    return path if path.startswith("/") and not path.startswith("//") else "/app/"


def _page(body: str) -> web.Response:
    return web.Response(text=f"<!doctype html><html><body>{body}</body></html>", content_type="text/html")


@pytest.fixture(scope="module")
def sign_in_app() -> Iterator[SignInApp]:
    with SignInApp() as app:
        yield app


def test_sign_in_form_sets_secure_http_only_cookie_and_returns(sign_in_app: SignInApp) -> None:
    base = sign_in_app.url()
    with headless_chromium() as browser:
        browser.open(f"{base}/app/")
        browser.wait_until(lambda b: b.current_url.startswith(f"{base}/login"), what="on the login form")
        assert browser.current_url == f"{base}/login?return=/app/"

        browser.fill("user", "bob")
        browser.click("go")
        browser.wait_until(
            lambda b: b.current_url == f"{base}/app/" and "hello bob" in b.page_text(),
            what="back at /app/ signed in",
        )

        cookie = browser.cookie("s")
        assert cookie is not None, browser.cookies()
        assert (cookie.value, cookie.path, cookie.domain) == ("bob", "/", "127.0.0.1")
        assert cookie.secure
        assert cookie.http_only
        assert cookie.same_site == "Lax"
        # HttpOnly: the page's scripts cannot read it.
        assert "s=" not in browser.execute("return document.cookie;")


@pytest.mark.parametrize(
    ("host", "secure_context"),
    [("127.0.0.1", True), ("localhost", True), (OTHER_HOST, False)],
)
def test_secure_cookie_over_http_is_kept_only_on_loopback(
    sign_in_app: SignInApp, host: str, secure_context: bool
) -> None:
    base = sign_in_app.url(host)
    with headless_chromium(host_map={OTHER_HOST: "127.0.0.1"}) as browser:
        browser.open(f"{base}/set")
        assert browser.execute("return window.isSecureContext;") is secure_context
        browser.open(f"{base}/echo")
        browser.wait_until(lambda b: "plain=1" in b.page_text(), what="the control cookie sent back")

        sent = sign_in_app.cookies_seen_by(host)
        assert len(sent) == 1, sent
        pairs = set(sent[0].split("; "))
        assert "plain=1" in pairs
        assert ("sec=1" in pairs) is secure_context, sent
        assert (browser.cookie("sec") is not None) is secure_context, browser.cookies()
