"""Browser sign-in end to end: a client -> real Envoy -> real ext-authz (sessions: cookie store)
-> echo backend, with the dev issuer's authorization, token and end-session endpoints."""

from __future__ import annotations

import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from ext_authz.dev.login import LoginSettings
from ext_authz.sessions import cookies
from tests.support.envoy import send
from tests.support.signin import COOKIE, NAVIGATE, SigninStack, signin_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigninStack]:
    with signin_stack(tmp_path_factory.mktemp("signin"), LoginSettings(token_lifetime=300)) as running:
        yield running


def test_navigation_is_sent_to_sign_in_and_returns_to_the_page(stack: SigninStack) -> None:
    browser = stack.browser()
    start = browser.get("/app/orders?page=2")
    assert start.response.status == 302, start.describe()
    assert start.backend is None
    location = start.response.header("location")
    assert location is not None and location.startswith(f"{stack.issuer.url}/authorize?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["web-app"]
    assert query["redirect_uri"] == [f"{stack.envoy.base_url}/oauth2/callback"]
    assert query["code_challenge_method"] == ["S256"]
    assert set(query) >= {"state", "nonce", "code_challenge", "scope"}
    transaction = [c for c in start.response.header_values("set-cookie") if c.startswith(f"{COOKIE}-signin-")]
    assert len(transaction) == 1
    assert "HttpOnly" in transaction[0] and "Secure" in transaction[0] and "SameSite=Lax" in transaction[0]

    callback = browser.sign_in_at_issuer(location)
    back = browser.get(urllib.parse.urlsplit(callback).path + "?" + urllib.parse.urlsplit(callback).query)
    assert back.response.status == 302, back.describe()
    assert back.response.header("location") == "/app/orders?page=2"
    set_cookies = back.response.header_values("set-cookie")
    assert any(c.startswith(f"{COOKIE}=") for c in set_cookies), back.describe()
    assert any(c.startswith(f"{COOKIE}-signin-") and "Max-Age=0" in c for c in set_cookies), back.describe()

    page = browser.get("/app/orders?page=2")
    assert page.response.status == 200, page.describe()
    assert page.backend is not None
    assert page.backend.header_values("x-user-id") == ["alice"]
    assert page.backend.header_values("x-user-groups") == ["staff"]
    assert "offline_access" in page.backend.header_values("x-user-scope")[0]
    assert len(page.backend.header_values("x-forwarded-access-token")) == 1
    # The session cookie never reaches the backend.
    assert not any(COOKIE in v for v in page.backend.header_values("cookie")), page.describe()


def test_other_cookies_reach_the_backend_without_the_session(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    browser.jar["theme"] = "dark"
    page = browser.get("/app/")
    assert page.backend is not None, page.describe()
    assert page.backend.header_values("cookie") == ["theme=dark"]


def test_api_requests_get_401_not_a_redirect(stack: SigninStack) -> None:
    browser = stack.browser()
    for headers in ((("Accept", "application/json"),), (("Sec-Fetch-Mode", "cors"), ("Accept", "text/html"))):
        answer = browser.get("/app/", headers)
        assert answer.response.status == 401, answer.describe()
        assert answer.response.header("location") is None
    post = browser.request("POST", "/app/", (("Accept", "text/html"),), body=b"")
    assert post.response.status == 401, post.describe()


def test_requirements_apply_to_sessions(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    denied = browser.get("/app/admin/users")
    assert denied.response.status == 403, denied.describe()
    assert denied.backend is None


def test_a_session_cookie_is_no_token_on_a_route_without_login(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    api = browser.get("/api/orders")
    assert api.response.status == 401, api.describe()
    health = browser.get("/healthz")
    assert health.response.status == 200, health.describe()
    assert health.backend is not None
    assert not any(COOKIE in v for v in health.backend.header_values("cookie"))


def test_two_tabs_sign_in_at_once(stack: SigninStack) -> None:
    browser = stack.browser()
    first = browser.get("/app/one")
    second = browser.get("/app/two")
    callbacks = [browser.sign_in_at_issuer(a.response.header("location") or "") for a in (first, second)]
    for callback, path in zip(reversed(callbacks), ("/app/two", "/app/one"), strict=True):
        parts = urllib.parse.urlsplit(callback)
        back = browser.get(f"{parts.path}?{parts.query}")
        assert back.response.status == 302, back.describe()
        assert back.response.header("location") == path


def test_forged_or_replayed_state_is_400(stack: SigninStack) -> None:
    browser = stack.browser()
    start = browser.get("/app/")
    callback = browser.sign_in_at_issuer(start.response.header("location") or "")
    parts = urllib.parse.urlsplit(callback)
    query = urllib.parse.parse_qs(parts.query)
    forged = dict(query, state=["forged"])
    answer = browser.get(f"{parts.path}?{urllib.parse.urlencode(forged, doseq=True)}")
    assert answer.response.status == 400, answer.describe()
    ok = browser.get(f"{parts.path}?{parts.query}")
    assert ok.response.status == 302, ok.describe()
    replayed = browser.get(f"{parts.path}?{parts.query}")  # the transaction cookie is gone
    assert replayed.response.status == 400, replayed.describe()


def test_access_denied_at_the_idp_is_a_403_page(stack: SigninStack) -> None:
    browser = stack.browser()
    start = browser.get("/app/")
    location = start.response.header("location") or ""
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["state"][0]
    query = urllib.parse.urlencode({"error": "access_denied", "state": state, "iss": stack.issuer.url})
    answer = browser.get(f"/oauth2/callback?{query}")
    assert answer.response.status == 403, answer.describe()
    assert answer.response.header("location") is None
    assert (answer.response.header("content-type") or "").startswith("text/html")


def test_open_redirect_return_paths_come_back_to_root(stack: SigninStack) -> None:
    for evil in ("//evil.example/x", "/\\evil.example"):
        browser = stack.browser()
        answer = browser.request("GET", "/app/x", browser_headers())
        assert answer.response.status == 302
        # The request path itself is what Envoy normalised; a crafted path cannot leave the host.
        result = browser.sign_in(evil if evil.startswith("/app") else "/app/")
        assert result.response.status == 200, result.describe()


def browser_headers() -> tuple[tuple[str, str], ...]:
    return (("Accept", "text/html"),)


def test_tampered_and_foreign_cookies_count_as_no_session(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    good = browser.jar[COOKIE]
    for bad in (good[:-4] + "AAAA", good[: len(good) // 2], "v1." + "A" * 80, "garbage"):
        browser.jar = {COOKIE: bad}
        answer = browser.get("/app/", (("Accept", "application/json"),))
        assert answer.response.status == 401, answer.describe()
        assert any(
            c.startswith(f"{COOKIE}=") and "Max-Age=0" in c
            for c in answer.response.header_values("set-cookie")
        )


def test_logout_ends_the_session_at_the_idp(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    cross_site = browser.request("POST", "/oauth2/logout", (("Origin", "https://evil.example"),), body=b"")
    assert cross_site.response.status == 403, cross_site.describe()
    assert browser.get("/app/").response.status == 200  # CSRF did not log out
    out = browser.request("POST", "/oauth2/logout", (("Origin", stack.envoy.base_url),), body=b"")
    assert out.response.status == 302, out.describe()
    location = out.response.header("location") or ""
    assert location.startswith(f"{stack.issuer.url}/logout?"), out.describe()
    assert "id_token_hint=" in location
    assert COOKIE not in browser.jar
    assert browser.get("/app/", (("Accept", "application/json"),)).response.status == 401
    idp = send(stack.issuer.url, "GET", location[len(stack.issuer.url) :])
    assert idp.status == 302, idp.describe()
    assert idp.header("location") == f"{stack.envoy.base_url}/"


def test_refresh_renews_the_session_cookie(tmp_path: Path) -> None:
    with signin_stack(tmp_path, LoginSettings(token_lifetime=7)) as short:
        browser = short.browser()
        assert browser.sign_in().response.status == 200
        first = browser.jar[COOKIE]
        time.sleep(2.5)  # within refresh_before_seconds (5) of the tokens' expiry
        page = browser.get("/app/")
        assert page.response.status == 200, page.describe()
        assert browser.jar[COOKIE] != first, page.describe()
        assert any(c.startswith(f"{COOKIE}=") for c in page.response.header_values("set-cookie"))
        # The refreshed session keeps working; a revoked refresh token ends it.
        assert browser.get("/app/").response.status == 200
        revoke = send(
            short.issuer.url,
            "POST",
            "/dev/revoke",
            [("Content-Type", "application/x-www-form-urlencoded")],
            body=b"",
        )
        assert revoke.status in (200, 204), revoke.describe()
        time.sleep(2.5)
        again = browser.get("/app/")
        assert again.response.status == 302, again.describe()  # a navigation signs in again
        assert COOKIE not in browser.jar


def test_an_idp_outage_keeps_valid_sessions_then_answers_503(tmp_path: Path) -> None:
    with signin_stack(tmp_path, LoginSettings(token_lifetime=7)) as short:
        browser = short.browser()
        assert browser.sign_in().response.status == 200
        short.issuer.close()  # the IdP goes down
        time.sleep(2.5)  # a refresh is due, and fails: the tokens still hold
        kept = browser.get("/app/")
        assert kept.response.status == 200, kept.describe()
        time.sleep(5)  # now they have expired
        down = browser.get("/app/")
        assert down.response.status == 503, down.describe()
        assert down.response.header("retry-after") is not None
        assert down.response.header("location") is None  # not a sign-in loop
        assert COOKIE in browser.jar


def test_a_bearer_token_on_a_login_route_is_verified_as_always(stack: SigninStack) -> None:
    tokens = stack.browser()
    assert tokens.sign_in().response.status == 200
    page = tokens.get("/app/")
    assert page.backend is not None
    (access_token,) = page.backend.header_values("x-forwarded-access-token")
    api = stack.browser()
    bearer = api.get("/app/", (("Authorization", f"Bearer {access_token}"), *NAVIGATE))
    assert bearer.response.status == 200, bearer.describe()
    forged = api.get("/app/", (("Authorization", f"Bearer {access_token[:-4]}AAAA"), *NAVIGATE))
    assert forged.response.status == 401, forged.describe()  # refused, not sent to sign in
    assert forged.response.header("location") is None


def test_a_code_issued_to_another_client_is_refused(stack: SigninStack) -> None:
    browser = stack.browser()
    start = browser.get("/app/")
    ours = urllib.parse.parse_qs(urllib.parse.urlsplit(start.response.header("location") or "").query)
    # The attacker's own sign-in at the IdP, as another client, with our redirect URI and state.
    other = {k: v[0] for k, v in ours.items()}
    other["client_id"] = "attacker-app"
    callback = browser.sign_in_at_issuer(f"{stack.issuer.url}/authorize?{urllib.parse.urlencode(other)}")
    parts = urllib.parse.urlsplit(callback)
    answer = browser.get(f"{parts.path}?{parts.query}")
    assert answer.response.status == 403, answer.describe()
    assert COOKIE not in browser.jar


def test_a_cookie_sealed_under_a_removed_key_is_no_session(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    old = cookies.Sealer([b"\x01" * 32])  # a key the config does not (or no longer) list
    data = {
        "p": "dev",
        "i": "a.b.c",
        "e": int(time.time()) + 600,
        "s": "openid",
        "t": int(time.time()),
        "w": int(time.time()),
    }
    browser.jar = {COOKIE: old.seal("session", COOKIE, data, now=time.time(), lifetime_seconds=600)}
    answer = browser.get("/app/", (("Accept", "application/json"),))
    assert answer.response.status == 401, answer.describe()


def test_no_token_cookie_or_code_in_the_log_lines(stack: SigninStack) -> None:
    browser = stack.browser()
    start = browser.get("/app/")
    callback = browser.sign_in_at_issuer(start.response.header("location") or "")
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query)["code"][0]
    parts = urllib.parse.urlsplit(callback)
    browser.get(f"{parts.path}?{parts.query}")
    page = browser.get("/app/")
    assert page.backend is not None
    (access_token,) = page.backend.header_values("x-forwarded-access-token")
    secrets = [code, browser.jar[COOKIE], access_token, *access_token.split(".")[1:]]
    output = "\n".join(stack.authz.process.output_lines())
    assert "sign_in_completed" in output  # the decision log is in there
    for secret in secrets:
        assert secret not in output


def test_a_reload_that_rotates_the_session_secret_keeps_sessions(tmp_path: Path) -> None:
    with signin_stack(tmp_path) as running:
        browser = running.browser()
        assert browser.sign_in().response.status == 200
        old_cookie = browser.jar[COOKIE]
        # A new key first (it seals from now on), the old one kept (it still opens).
        keys = tmp_path / "session-keys"
        keys.write_text("ef" * 32 + "\n" + keys.read_text())
        reloads = sum("config reloaded" in line for line in running.authz.process.output_lines())
        running.authz.process.popen.send_signal(signal.SIGHUP)
        running.authz.process.wait_for_line(
            lambda line: (
                "config reloaded" in line
                and sum("config reloaded" in seen for seen in running.authz.process.output_lines()) > reloads
            ),
            timeout=10,
            what="the reload",
        )
        assert browser.get("/app/").response.status == 200  # the old key still opens it
        fresh = running.browser()
        assert fresh.sign_in().response.status == 200
        new_sealer, old_sealer = (
            cookies.Sealer([bytes.fromhex("ef" * 32)]),
            cookies.Sealer([bytes.fromhex("ab" * 32)]),
        )
        now = time.time()
        assert new_sealer.open("session", COOKIE, fresh.jar[COOKIE], now=now) is not None
        assert old_sealer.open("session", COOKIE, old_cookie, now=now) is not None
        assert old_sealer.open("session", COOKIE, fresh.jar[COOKIE], now=now) is None


def test_tokens_that_have_expired_are_refreshed(tmp_path: Path) -> None:
    with signin_stack(tmp_path, LoginSettings(token_lifetime=2), refresh_before_seconds=0) as short:
        browser = short.browser()
        assert browser.sign_in().response.status == 200
        first = browser.jar[COOKIE]
        time.sleep(2.5)  # the access and ID tokens have expired
        page = browser.get("/app/")
        assert page.response.status == 200, page.describe()
        assert browser.jar[COOKIE] != first
        assert page.backend is not None and page.backend.header_values("x-user-id") == ["alice"]
