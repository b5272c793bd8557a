"""Browser sessions in Redis (`sessions.store: redis`), end to end: real Envoy, real ext-authz
processes (two replicas sharing one real redis-server), the dev issuer; OIDC Back-Channel Logout
on the front (through Envoy, with_request_body) and on the admin listener."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ext_authz import jws
from ext_authz.dev.login import LoginSettings
from tests.support.envoy import send
from tests.support.redis import RedisServer, free_port, inline_command
from tests.support.signin import CLIENT_ID, COOKIE, NAVIGATE, SigninStack, admin_address, signin_stack

EVENT: dict[str, object] = {"http://schemas.openid.net/event/backchannel-logout": {}}
API = (("Accept", "application/json"),)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[SigninStack]:
    with signin_stack(
        tmp_path_factory.mktemp("signin-redis"),
        LoginSettings(token_lifetime=300),
        admin=True,
        request_body_paths=("/oauth2/backchannel_logout",),
        store="redis",
        redis_url=redis.url,
        backchannel_logout_path="/oauth2/backchannel_logout",
    ) as running:
        yield running


def logout_token(stack: SigninStack, **claims: Any) -> str:
    key = stack.issuer.key_dir.signing_key()
    payload: dict[str, Any] = {
        "iss": stack.issuer.url,
        "aud": CLIENT_ID,
        "iat": int(time.time()),
        "exp": int(time.time()) + 120,
        "jti": secrets.token_hex(8),
        "events": EVENT,
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return jws.sign({"alg": key.alg, "kid": key.kid, "typ": "logout+jwt"}, payload, key.private_key, key.alg)


def post_logout_token(stack: SigninStack, token: str) -> tuple[int, bytes]:
    body = urllib.parse.urlencode({"logout_token": token}).encode()
    answer = send(
        stack.envoy.base_url,
        "POST",
        "/oauth2/backchannel_logout",
        [("Content-Type", "application/x-www-form-urlencoded")],
        body=body,
    )
    return answer.status, answer.body


def test_the_cookie_holds_only_a_session_id(stack: SigninStack, redis: RedisServer) -> None:
    browser = stack.browser()
    page = browser.sign_in()
    assert page.response.status == 200, page.describe()
    assert page.backend is not None and page.backend.header_values("x-user-id") == ["alice"]
    assert len(browser.jar[COOKIE]) < 200  # a sealed id; the tokens stay in Redis
    assert COOKIE + ".1" not in browser.jar
    keys = inline_command(redis.port, "KEYS ext-authz:session:s:*")
    assert b"ext-authz:session:s:" in keys


def test_logout_ends_the_session_for_a_copied_cookie_too(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    copied = dict(browser.jar)
    out = browser.request("POST", "/oauth2/logout", (("Origin", stack.envoy.base_url),), body=b"")
    assert out.response.status == 302, out.describe()
    thief = stack.browser()
    thief.jar = copied
    assert thief.get("/app/", API).response.status == 401


def test_backchannel_logout_through_envoy_ends_the_sid(stack: SigninStack) -> None:
    browser = stack.browser()
    page = browser.sign_in()
    assert page.backend is not None
    (sid,) = page.backend.header_values("x-user-sid")
    other = stack.browser()
    assert other.sign_in().response.status == 200  # another sign-in of alice: another sid
    token = logout_token(stack, sid=sid)
    status, body = post_logout_token(stack, token)
    assert status == 200, body
    assert browser.get("/app/", API).response.status == 401
    assert other.get("/app/", API).response.status == 200
    assert post_logout_token(stack, token)[0] == 400  # a replayed logout token


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "another-client"},
        {"nonce": "n"},
        {"events": None},
        {"events": {"other": {}}},
        {"sid": None, "sub": None},
        {"iss": "https://idp.example"},
        {"iat": int(time.time()) + 3600},
        {"exp": int(time.time()) - 3600},
    ],
)
def test_bad_logout_tokens_end_nothing(stack: SigninStack, claims: dict[str, Any]) -> None:
    browser = stack.browser()
    page = browser.sign_in()
    assert page.backend is not None
    (sid,) = page.backend.header_values("x-user-sid")
    status, _ = post_logout_token(stack, logout_token(stack, **{"sid": sid, "sub": "alice", **claims}))
    assert status == 400
    assert browser.get("/app/", API).response.status == 200


def test_backchannel_logout_on_the_admin_listener_ends_every_session_of_the_sub(stack: SigninStack) -> None:
    browsers = [stack.browser(), stack.browser()]
    for browser in browsers:
        assert browser.sign_in(sub="bob").response.status == 200
    bystander = stack.browser()
    assert bystander.sign_in(sub="carol").response.status == 200
    body = urllib.parse.urlencode({"logout_token": logout_token(stack, sub="bob")}).encode()
    answer = send(
        f"http://{admin_address(stack.authz)}",
        "POST",
        "/backchannel_logout",
        [("Content-Type", "application/x-www-form-urlencoded")],
        body=body,
    )
    assert answer.status == 200, answer.describe()
    assert answer.header("cache-control") == "no-store"
    for browser in browsers:
        assert browser.get("/app/", API).response.status == 401
    assert bystander.get("/app/", API).response.status == 200


def test_two_replicas_refreshing_one_session_keep_it(tmp_path: Path, redis: RedisServer) -> None:
    # The dev issuer rotates refresh tokens and, on a reuse, revokes the session's family (as
    # real IdPs do): two replicas presenting the same refresh token would lose the session.
    with signin_stack(
        tmp_path, LoginSettings(token_lifetime=7), replicas=2, store="redis", redis_url=redis.url
    ) as pair:
        first = pair.browser(0)
        assert first.sign_in().response.status == 200
        second = pair.browser(1)
        second.jar = dict(first.jar)
        time.sleep(2.5)  # the tokens now expire within refresh_before_seconds (5)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: b.get("/app/", API), [first, second, first, second]))
        assert [a.response.status for a in answers] == [200] * 4, [a.describe() for a in answers]
        time.sleep(2.5)  # and again, from the refreshed tokens
        assert first.get("/app/", API).response.status == 200
        assert second.get("/app/", API).response.status == 200


def test_redis_down_is_503_never_a_sign_in_loop(tmp_path: Path) -> None:
    with RedisServer() as own, signin_stack(tmp_path, store="redis", redis_url=own.url) as running:
        browser = running.browser()
        assert browser.sign_in().response.status == 200
        own.stop()
        answer = browser.get("/app/", NAVIGATE)
        assert answer.response.status == 503, answer.describe()
        assert answer.response.header("retry-after") is not None
        assert answer.response.header("location") is None
        assert COOKIE in browser.jar  # kept: the session may well be fine


def test_metrics_count_sign_ins_logouts_and_sessions(stack: SigninStack) -> None:
    browser = stack.browser()
    assert browser.sign_in().response.status == 200
    browser.request("POST", "/oauth2/logout", (("Origin", stack.envoy.base_url),), body=b"")
    metrics = send(f"http://{admin_address(stack.authz)}", "GET", "/metrics").body.decode()
    samples = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['ext_authz_session_events_total{event="sign_in",outcome="started"}'] >= 1
    assert samples['ext_authz_session_events_total{event="sign_in",outcome="completed"}'] >= 1
    assert samples['ext_authz_session_events_total{event="logout",outcome="front"}'] >= 1
    assert samples['ext_authz_session_events_total{event="logout",outcome="backchannel"}'] >= 1
    assert "ext_authz_sessions_active" in samples
    assert "ext_authz_checks_total{" in metrics and 'reason="sign_in_started"' in metrics


def backchannel_count(authz: Any, outcome: str) -> float:
    metrics = send(f"http://{admin_address(authz)}", "GET", "/metrics").body.decode()
    wanted = f'ext_authz_session_events_total{{event="logout",outcome="{outcome}"}} '
    return sum(float(line[len(wanted) :]) for line in metrics.splitlines() if line.startswith(wanted))


def test_the_idps_own_logout_token_reaches_the_admin_listener(tmp_path: Path, redis: RedisServer) -> None:
    port = free_port()  # the admin port, known before the IdP starts (it is told where to POST)
    with signin_stack(
        tmp_path,
        admin=f"127.0.0.1:{port}",
        backchannel_logout_uris=(f"http://127.0.0.1:{port}/backchannel_logout",),
        store="redis",
        redis_url=redis.url,
        backchannel_logout_path="/oauth2/backchannel_logout",
    ) as running:
        browser = running.browser()
        assert browser.sign_in(sub="dana").response.status == 200
        out = browser.request("POST", "/oauth2/logout", (("Origin", running.envoy.base_url),), body=b"")
        location = out.response.header("location") or ""
        assert location.startswith(f"{running.issuer.url}/logout?"), out.describe()
        # At the IdP's end_session endpoint: it ends its session and POSTs a logout token (signed
        # by its own key, its own claims) to ext-authz's admin listener, which verifies it.
        assert send(running.issuer.url, "GET", location[len(running.issuer.url) :]).status == 302
        deadline = time.monotonic() + 10
        while backchannel_count(running.authz, "backchannel") < 1:
            assert time.monotonic() < deadline, "the IdP's logout token was not accepted"
            time.sleep(0.1)
        assert backchannel_count(running.authz, "backchannel_refused") == 0


def test_a_plain_http_origin_gets_a_page_and_no_cookie(stack: SigninStack) -> None:
    browser = stack.browser()
    answer = browser.request("GET", "/app/", NAVIGATE, host="app.example")
    assert answer.response.status == 400, answer.describe()
    assert answer.response.header_values("set-cookie") == []
    assert "https" in answer.response.body.decode()
