"""`make run`'s browser route in a real headless Chromium: /app/ signs in on the dev issuer's login
page, the echo backend sees the identity headers (and no session cookie), and logout goes through
the issuer's end_session back to the signed-out page; /app/ then asks to sign in again.

The stack runs as `make run` does (subprocesses, ephemeral ports on 127.0.0.1, as in
test_make_run.py): nothing serves on this test's thread, so the blocking WebDriver calls cannot
starve it. Chromium keeps Secure cookies over plain http for 127.0.0.1 only (test_browser_smoke.py),
hence every URL here is on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ext_authz.dev.plan import SIGNED_OUT_PATH
from ext_authz.dev.stack import READY_MARKER
from tests.integration.test_make_run import REPO_ROOT, STAMP, STARTUP_TIMEOUT, stack_env
from tests.support.browser import Browser, headless_chromium
from tests.support.processes import ManagedProcess

COOKIE = "__Host-ext-authz"  # sessions.cookie's default
WAIT = 15.0


@dataclass(frozen=True)
class Stack:
    process: ManagedProcess
    base: str  # Envoy
    issuer: str

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    assert shutil.which("make") is not None, "make is not installed"
    env = stack_env(tmp_path / "keys")
    argv = ["make", "--no-print-directory", "-o", STAMP, "run", f"PY={sys.executable}"]
    process = ManagedProcess("make run", argv, env=env, cwd=REPO_ROOT, separate_stdout=True, keep_lines=2000)
    try:
        lines = process.wait_for_stdout(
            lambda seen: READY_MARKER in seen, timeout=STARTUP_TIMEOUT, what="ready"
        )
        base = f"http://127.0.0.1:{env['RUN_ENVOY_PORT']}"
        # The printed instructions name the route and the logout URL this test walks.
        assert any(line.startswith(f"Browser: open {base}/app/") for line in lines), lines
        assert any(f"log out at {base}/oauth2/logout" in line for line in lines), lines
        yield Stack(process, base, f"http://127.0.0.1:{env['RUN_ISSUER_PORT']}")
    finally:
        process.stop()


def echoed(browser: Browser) -> dict[str, Any] | None:
    """What reached the echo backend, as the page shows its JSON answer (None: not that page)."""
    text = browser.page_text().strip()
    try:
        seen = json.loads(text[text.find("{") :]) if "{" in text else None
    except ValueError:
        return None
    return seen if isinstance(seen, dict) and "headers" in seen else None


def echoed_at(url: str) -> Callable[[Browser], dict[str, Any] | None]:
    """A wait condition: the echo's answer, once the browser is at `url` (the query aside)."""

    def condition(browser: Browser) -> dict[str, Any] | None:
        return echoed(browser) if browser.current_url.split("?")[0] == url else None

    return condition


def on_login_page(stack: Stack, browser: Browser) -> bool:
    return browser.current_url.startswith(f"{stack.issuer}/authorize") and bool(
        browser.execute("return document.getElementById('sign-in') !== null;")
    )


def test_sign_in_at_app_shows_the_identity_and_logout_ends_the_session(stack: Stack) -> None:
    with headless_chromium() as browser:
        browser.open(stack.url("/app/"))
        browser.wait_until(lambda b: on_login_page(stack, b), timeout=WAIT, what="on the login page")
        browser.fill("sub", "carol")
        browser.fill("groups", "staff")
        browser.click("sign-in")

        seen = browser.wait_until(echoed_at(stack.url("/app/")), timeout=WAIT, what="back at /app/")
        headers = seen["headers"]
        assert seen["path"] == "/app/"
        assert headers["x-user-id"] == ["carol"], seen
        assert headers["x-user-groups"] == ["staff"], seen
        assert headers["x-user-email"] == ["carol@example.com"], seen
        assert "carol" in browser.page_text()
        # The session cookie: kept by the browser, HttpOnly and Secure, never shown to the backend.
        cookie = browser.cookie(COOKIE)
        assert cookie is not None, browser.cookies()
        assert cookie.http_only and cookie.secure and cookie.path == "/", cookie
        assert not any(COOKIE in value for value in headers.get("cookie", [])), seen
        assert "authorization" not in headers  # forward_access_token: none (the default)

        # What the logout answers (not followed): RP-initiated logout at the issuer's end_session.
        location = logout_location(stack, cookie.value)
        assert location.startswith(f"{stack.issuer}/logout?"), location
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
        assert query["post_logout_redirect_uri"] == [stack.url(SIGNED_OUT_PATH)], query
        assert "id_token_hint" in query

        # A typed URL (Sec-Fetch-Site: none): accepted as a same-origin GET.
        browser.open(stack.url("/oauth2/logout"))
        after = browser.wait_until(
            echoed_at(stack.url(SIGNED_OUT_PATH)), timeout=WAIT, what="back at the post-logout page"
        )
        assert "x-user-id" not in after["headers"], after  # an anonymous page now
        assert browser.cookie(COOKIE) is None, browser.cookies()

        browser.open(stack.url("/app/"))
        browser.wait_until(lambda b: on_login_page(stack, b), timeout=WAIT, what="asked to sign in again")


def logout_location(stack: Stack, session: str) -> str:
    """GET /oauth2/logout as a typed URL with the session cookie; the redirect's Location."""
    parts = urllib.parse.urlsplit(stack.base)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(
            "GET",
            "/oauth2/logout",
            headers={
                "Cookie": f"{COOKIE}={session}",
                "Accept": "text/html",
                "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Site": "none",
            },
        )
        response = conn.getresponse()
        response.read()
        assert response.status in (302, 303), (response.status, stack.process.tail())
        return response.getheader("Location") or ""
    finally:
        conn.close()
