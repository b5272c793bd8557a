"""Outside review of browser sessions in Redis (store: redis) and OIDC Back-Channel Logout.

Tests marked ``# ATTACK (second outside review; fixed)`` assert the secure behaviour (they failed
before the fixes). The others
record attacks that are refused correctly. The store is an in-memory stand-in with the semantics of
sessions.redisstore.RedisSessionStore (SET overwrites, SET NX, TTLs on the test clock, the END
script deletes every member of an index set), so races can be driven step by step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from ext_authz.compiled import compile
from ext_authz.config.parse import parse
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from ext_authz.sessions import cookies
from ext_authz.sessions.oidc import LoginUnavailable, Tokens
from ext_authz.sessions.session import PREFIX, index_key
from tests.support.keystore import Clock
from tests.support.signin_fakes import FakeLogin
from tests.support.tokens import ISSUER, NOW, Mint

CLIENT_ID = "web-app"
COOKIE = "__Host-ext-authz"
HOST = "app.example.com"
NAV = {"sec-fetch-mode": "navigate", "sec-fetch-site": "none", "accept": "text/html"}
EVENT: dict[str, object] = {"http://schemas.openid.net/event/backchannel-logout": {}}
LOGOUT_TYP = {"typ": "logout+jwt"}


class MemoryStore:
    """RedisSessionStore's semantics in memory, TTLs on ``clock``; ``down`` makes it unreachable."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.values: dict[str, tuple[object, float]] = {}
        self.down = False

    def _get(self, key: str) -> object | None:
        item = self.values.get(key)
        if item is None or item[1] <= self.clock.now:
            self.values.pop(key, None)
            return None
        return item[0]

    def _check(self) -> None:
        if self.down:
            raise LoginUnavailable("store_unavailable", "redis load: ConnectionError")

    async def load(self, key: str, idle_seconds: int) -> str | None:
        self._check()
        value = self._get(key)
        if isinstance(value, str):
            self.values[key] = (value, self.clock.now + idle_seconds)
            return value
        return None

    async def save(
        self,
        key: str,
        record: str,
        *,
        idle_seconds: int,
        index: Sequence[str],
        expires_at: float,
        expected: str | None = None,
    ) -> bool:
        self._check()
        if expected is not None and self._get(key) != expected:
            return False
        self.values[key] = (record, self.clock.now + idle_seconds)
        for name in index:
            members = self._get(name)
            members = members if isinstance(members, set) else set()
            members.add(key)
            self.values[name] = (members, expires_at + 60)
        return True

    async def delete(self, key: str) -> None:
        self._check()
        self.values.pop(key, None)

    async def lock(self, key: str, token: str, ttl_seconds: float) -> bool:
        self._check()
        if self._get(key) is not None:
            return False
        self.values[key] = (token, self.clock.now + ttl_seconds)
        return True

    async def unlock(self, key: str, token: str) -> None:
        self._check()
        if self._get(key) == token:
            del self.values[key]

    async def end(self, index: str) -> int:
        self._check()
        members = self._get(index)
        self.values.pop(index, None)
        ended = 0
        for key in members if isinstance(members, set) else ():
            ended += self.values.pop(key, None) is not None
        return ended

    async def first_use(self, marker: str, ttl_seconds: int) -> bool:
        self._check()
        if self._get(marker) is not None:
            return False
        self.values[marker] = ("1", self.clock.now + ttl_seconds)
        return True

    async def count(self) -> int:
        self._check()
        return sum(1 for k in list(self.values) if k.startswith(f"{PREFIX}s:") and self._get(k) is not None)

    def records(self) -> list[str]:
        return [k for k in list(self.values) if k.startswith(f"{PREFIX}s:") and self._get(k) is not None]


def settings_doc(tmp_path: Path, providers: list[dict[str, Any]] | None = None, **sessions: Any) -> Any:
    (tmp_path / "session-keys").write_text("ab" * 32 + "\n")
    return {
        "providers": providers
        or [
            {
                "name": "idp",
                "issuer": ISSUER,
                "audiences": ["api"],
                "jwks_uri": "https://idp.example.com/jwks",
                "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
                "login": {"client_id": CLIENT_ID},
            }
        ],
        "sessions": {
            "secret_file": "session-keys",
            "store": "redis",
            "redis_url": "redis://127.0.0.1:1/0",
            "backchannel_logout_path": "/oauth2/backchannel",
            **sessions,
        },
        "rules": [
            {"name": "app", "match": {"paths": ["/app/*"]}, "login": "idp", "require": {}},
            {"name": "api", "match": {"paths": ["/*"]}, "require": {}},
        ],
    }


def make_pipeline(
    tmp_path: Path, resolver: StaticKeys, clock: Clock, login: FakeLogin, store: MemoryStore, **kw: Any
) -> Pipeline:
    settings = parse(settings_doc(tmp_path, **kw), base_dir=tmp_path)
    return Pipeline(compile(settings), resolver, clock=clock, login_client=login, session_store=store)


def req(path: str, method: str = "GET", query: str = "", body: str = "", **headers: str) -> Request:
    return Request(method, path, query, HOST, headers=headers, scheme="https", body=body)


def set_cookies(decision: Any) -> dict[str, str]:
    headers = decision.headers if isinstance(decision, Deny) else decision.response_headers
    out = {}
    for name, value in headers:
        if name == "set-cookie":
            k, _, v = value.split(";", 1)[0].partition("=")
            out[k] = v
    return out


def cookie_header(jar: Mapping[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in jar.items() if v)


async def sign_in(p: Pipeline, login: FakeLogin, mint: Mint, **overrides: Any) -> dict[str, str]:
    first = await p.decide(req("/app/home", **NAV))
    assert isinstance(first, Deny) and first.status == 302, first
    location = next(v for n, v in first.headers if n == "location")
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    jar = set_cookies(first)
    expires_in = overrides.pop("expires_in", 3600)
    id_token = mint(aud=CLIENT_ID, nonce=params["nonce"], sid="sid-1", exp=int(NOW) + 86400, **overrides)
    login.answers.append(Tokens("access-1", id_token, "refresh-1", expires_in, None))
    query = urlencode({"state": params["state"], "code": "c0de"})
    callback = await p.decide(req("/oauth2/callback", query=query, cookie=cookie_header(jar), **NAV))
    assert isinstance(callback, Deny) and callback.status == 302, callback
    jar.update(set_cookies(callback))
    return {k: v for k, v in jar.items() if v}


def logout_body(mint: Mint, headers: Mapping[str, Any] | None = None, **claims: Any) -> str:
    base: dict[str, Any] = {
        "aud": CLIENT_ID,
        "sid": "sid-1",
        "jti": "jti-1",
        "events": EVENT,
        "iat": int(NOW),
        "exp": int(NOW) + 120,
    }
    base.update(claims)
    token = mint(headers=LOGOUT_TYP if headers is None else headers, **base)
    return urlencode({"logout_token": token})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def login() -> FakeLogin:
    return FakeLogin()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock)


@pytest.fixture
def pipeline(
    tmp_path: Path, resolver: StaticKeys, clock: Clock, login: FakeLogin, store: MemoryStore
) -> Pipeline:
    return make_pipeline(tmp_path, resolver, clock, login, store)


# ---------------------------------------------------------------- working attacks


# ATTACK (second outside review; fixed)
async def test_backchannel_logout_during_a_refresh_is_undone_by_the_refresh(
    pipeline: Pipeline, login: FakeLogin, mint: Mint, clock: Clock, store: MemoryStore
) -> None:
    """RedisSessions.refreshed: the lock holder asks the IdP, then ``_save`` SETs the record
    unconditionally. A back-channel logout (END script: DEL of every record of the sid) that lands
    while the refresh is at the IdP is overwritten: the session is recreated, and (saved with
    index=()) it is no longer in any sid/sub set, so a second logout cannot end it either."""
    jar = await sign_in(pipeline, login, mint, expires_in=120)
    clock.now = NOW + 100  # within refresh_before_seconds of the tokens' expiry
    login.gate = asyncio.Event()
    login.answers.append(Tokens("access-2", None, "refresh-2", 3600, None))
    check = asyncio.create_task(pipeline.decide(req("/app/x", cookie=cookie_header(jar))))
    await asyncio.wait_for(login.entered.wait(), 5)
    assert pipeline.browsers is not None
    status, _ = await pipeline.browsers.backchannel_logout(logout_body(mint, iat=int(clock.now)))
    assert status == 200
    assert store.records() == [], "the logout ended the session"
    login.gate.set()
    await check
    again = await pipeline.decide(req("/app/y", cookie=cookie_header(jar)))
    assert not isinstance(again, Allow), "the session survived back-channel logout (refresh wrote it back)"
    assert store.records() == [], "the refresh recreated the logged-out record in Redis"


# ATTACK (second outside review; fixed)
async def test_front_logout_during_a_refresh_is_undone_by_the_refresh(
    pipeline: Pipeline, login: FakeLogin, mint: Mint, clock: Clock, store: MemoryStore
) -> None:
    """Same race through the front logout (Backing.end: DEL of the record): a stolen cookie the
    victim 'logged out' keeps working when another tab's refresh was in flight."""
    jar = await sign_in(pipeline, login, mint, expires_in=120)
    clock.now = NOW + 100
    login.gate = asyncio.Event()
    login.answers.append(Tokens("access-2", None, "refresh-2", 3600, None))
    check = asyncio.create_task(pipeline.decide(req("/app/x", cookie=cookie_header(jar))))
    await asyncio.wait_for(login.entered.wait(), 5)
    assert pipeline.browsers is not None
    await pipeline.browsers._backing.end(cookies_value(jar))
    assert store.records() == []
    login.gate.set()
    await check
    again = await pipeline.decide(req("/app/y", cookie=cookie_header(jar)))
    assert not isinstance(again, Allow), "the session survived logout (refresh wrote it back)"


def cookies_value(jar: Mapping[str, str]) -> str:
    value = cookies.join(COOKIE, jar)
    assert value is not None
    return value


# ATTACK (second outside review; fixed)
async def test_logout_token_replay_after_the_jti_marker_expires(
    pipeline: Pipeline, mint: Mint, clock: Clock
) -> None:
    """The jti marker lives _LOGOUT_TOKEN_SECONDS (600 s) whatever the token's exp: a logout
    token valid for an hour is accepted again 11 minutes later (and then ends the user's NEW
    sessions of that sid/sub). The marker should live until the token's exp (+ skew), or tokens
    whose exp/iat are older than the marker's life refused."""
    assert pipeline.browsers is not None
    body = logout_body(mint, sub="alice", sid=None, exp=int(NOW) + 3600)
    assert (await pipeline.browsers.backchannel_logout(body))[0] == 200
    assert (await pipeline.browsers.backchannel_logout(body))[0] == 400  # replay refused
    clock.now = NOW + 700
    status, _ = await pipeline.browsers.backchannel_logout(body)
    assert status == 400, "a replayed logout token was accepted once its jti marker expired"


# ATTACK (second outside review; fixed)
async def test_logout_token_without_jti_or_exp_is_refused(
    pipeline: Pipeline, mint: Mint, clock: Clock
) -> None:
    """Back-Channel Logout 1.0 §2.4: jti and exp are REQUIRED. Without jti there is no replay
    check at all; without exp (and no bound on iat's age) a captured token works forever: here a
    day-old token without jti is accepted twice."""
    assert pipeline.browsers is not None
    clock.now = NOW + 86400
    body = logout_body(mint, sub="alice", sid=None, jti=None, exp=None, iat=int(NOW))
    statuses = [(await pipeline.browsers.backchannel_logout(body))[0] for _ in range(2)]
    assert statuses == [400, 400], f"a day-old logout token without jti/exp was accepted: {statuses}"


# ATTACK (second outside review; fixed)
async def test_index_keys_of_providers_with_colons_do_not_collide(tmp_path: Path) -> None:
    """index_key joins provider and value with ':' and provider names may contain ':' (the config
    accepts them): provider "corp:eu"'s IdP naming sub "alice" ends provider "corp"'s sessions of
    sub "eu:alice" (the sid sets collide the same way). Encode the parts (length-prefix or hash)."""
    doc = settings_doc(tmp_path)
    doc["providers"][0]["name"] = "corp:eu"
    doc["rules"][0]["login"] = "corp:eu"
    parse(doc, base_dir=tmp_path)  # accepted
    assert index_key("sub", "corp", "eu:alice") != index_key("sub", "corp:eu", "alice")


# ATTACK (second outside review; fixed) (an exception out of the back-channel logout)
@pytest.mark.parametrize("body", ["&" * 100_000, "a=1&b=2&c=3&d=4&e=5&f=6&g=7&h=8&logout_token=x"])
async def test_a_body_of_many_fields_is_a_clean_400(pipeline: Pipeline, body: str) -> None:
    """flow.backchannel_logout: parse_qs(max_num_fields=8) raises ValueError for a 9th field; it
    escapes (admin: aiohttp 500; Envoy: 'check failed' with a traceback per request, a cheap
    unauthenticated log flood). Catch ValueError and answer 400 invalid_request."""
    assert pipeline.browsers is not None
    try:
        status, _ = await pipeline.browsers.backchannel_logout(body)
    except ValueError as exc:
        pytest.fail(f"backchannel_logout raised {exc!r}")
    assert status == 400


# ATTACK (second outside review; fixed) (a logout that ends nothing)
async def test_backchannel_logout_of_a_refreshed_sid_ends_the_session(
    pipeline: Pipeline, login: FakeLogin, mint: Mint, clock: Clock, store: MemoryStore
) -> None:
    """A refresh that returns an ID token with another sid is saved with index=() (refreshed ->
    _save(..., ())): the session is filed only under its first sid, so the IdP's logout for the
    sid it now has ends nothing. Index the refreshed ID token's sid/sub too (or refuse a sid change)."""
    jar = await sign_in(pipeline, login, mint, expires_in=120)
    clock.now = NOW + 100
    new_id = mint(aud=CLIENT_ID, sid="sid-2", iat=int(clock.now), exp=int(NOW) + 86400)
    login.answers.append(Tokens("access-2", new_id, "refresh-2", 3600, None))
    assert isinstance(await pipeline.decide(req("/app/x", cookie=cookie_header(jar))), Allow)
    assert pipeline.browsers is not None
    status, _ = await pipeline.browsers.backchannel_logout(logout_body(mint, sid="sid-2", iat=int(clock.now)))
    assert status == 200
    assert not isinstance(await pipeline.decide(req("/app/y", cookie=cookie_header(jar))), Allow)


# ---------------------------------------------------------------- refused correctly


async def test_backchannel_logout_ends_the_session(
    pipeline: Pipeline, login: FakeLogin, mint: Mint, store: MemoryStore
) -> None:
    jar = await sign_in(pipeline, login, mint)
    assert isinstance(await pipeline.decide(req("/app/x", cookie=cookie_header(jar))), Allow)
    decision = await pipeline.decide(req("/oauth2/backchannel", "POST", body=logout_body(mint)))
    assert isinstance(decision, Deny) and decision.status == 200, decision
    assert not isinstance(await pipeline.decide(req("/app/x", cookie=cookie_header(jar))), Allow)
    assert store.records() == []


@pytest.mark.parametrize(
    ("headers", "claims"),
    [
        ({"typ": "JWT"}, {}),  # an ID token's typ
        (None, {"events": None}),  # no event: an ID token
        (None, {"events": {"http://schemas.openid.net/event/backchannel-logout": "x"}}),
        (None, {"nonce": "n"}),
        (None, {"aud": "api"}),  # another audience
        (None, {"iss": "https://other.example.com/"}),
        (None, {"exp": int(NOW) - 3600}),
        (None, {"iat": int(NOW) + 3600}),
        (None, {"iat": None}),
        (None, {"sid": None, "sub": None}),
        (None, {"sid": "", "sub": ""}),
    ],
)
async def test_bad_logout_tokens_are_refused_and_end_nothing(
    pipeline: Pipeline,
    login: FakeLogin,
    mint: Mint,
    store: MemoryStore,
    headers: Any,
    claims: dict[str, Any],
) -> None:
    jar = await sign_in(pipeline, login, mint)
    assert pipeline.browsers is not None
    status, _ = await pipeline.browsers.backchannel_logout(logout_body(mint, headers, **claims))
    assert status == 400
    assert isinstance(await pipeline.decide(req("/app/x", cookie=cookie_header(jar))), Allow)


async def test_the_id_token_itself_is_no_logout_token(
    pipeline: Pipeline, login: FakeLogin, mint: Mint
) -> None:
    jar = await sign_in(pipeline, login, mint)
    assert pipeline.browsers is not None
    id_token = mint(aud=CLIENT_ID, sid="sid-1", nonce="n")
    for body in (urlencode({"logout_token": id_token}), f"logout_token={id_token}&logout_token={id_token}"):
        assert (await pipeline.browsers.backchannel_logout(body))[0] == 400
    assert isinstance(await pipeline.decide(req("/app/x", cookie=cookie_header(jar))), Allow)


async def test_odd_and_huge_bodies_are_refused(pipeline: Pipeline) -> None:
    assert pipeline.browsers is not None
    for body in ("", "logout_token=", "x" * 5_000_000, "logout_token=a.b.c", "\udcff" * 10):
        assert (await pipeline.browsers.backchannel_logout(body))[0] == 400
    get = await pipeline.decide(req("/oauth2/backchannel", body="logout_token=x"))
    assert isinstance(get, Deny) and get.status == 405


async def test_a_lying_redis_cannot_move_or_forge_a_record(
    tmp_path: Path,
    resolver: StaticKeys,
    clock: Clock,
    login: FakeLogin,
    mint: Mint,
    store: MemoryStore,
) -> None:
    p = make_pipeline(tmp_path, resolver, clock, login, store)
    alice = await sign_in(p, login, mint, sub="alice")
    alice_key = store.records()[0]
    mallory = await sign_in(p, login, mint, sub="mallory")
    mallory_key = next(k for k in store.records() if k != alice_key)
    # Alice's sealed record written under Mallory's key: refused (sealed to its key).
    store.values[mallory_key] = store.values[alice_key]
    moved = await p.decide(req("/app/x", cookie=cookie_header(mallory)))
    assert not isinstance(moved, Allow)
    for junk in (
        "",
        "x",
        "{}",
        json.dumps({"p": "idp", "i": mint(sub="admin")}),
        str(store.values[alice_key][0])[:-2],
    ):
        store.values[alice_key] = (junk, NOW + 3600)
        assert not isinstance(await p.decide(req("/app/x", cookie=cookie_header(alice))), Allow)


async def test_store_down_fails_closed_without_raising(
    pipeline: Pipeline, login: FakeLogin, mint: Mint, store: MemoryStore
) -> None:
    jar = await sign_in(pipeline, login, mint)
    store.down = True
    decision = await pipeline.decide(req("/app/x", cookie=cookie_header(jar)))
    assert isinstance(decision, Deny) and decision.status == 503
    assert pipeline.browsers is not None
    assert (await pipeline.browsers.backchannel_logout(logout_body(mint)))[0] == 503


async def test_a_body_does_not_change_a_decision(pipeline: Pipeline, login: FakeLogin, mint: Mint) -> None:
    jar = await sign_in(pipeline, login, mint)
    body = logout_body(mint)
    anonymous = await pipeline.decide(req("/api/x", "POST", body=body))
    assert isinstance(anonymous, Deny) and anonymous.status == 401
    allowed = await pipeline.decide(req("/app/x", "POST", body=body, cookie=cookie_header(jar)))
    assert isinstance(allowed, Allow)


# ---------------------------------------------------------------- the same with a real redis-server


@pytest.fixture
def real_redis() -> Any:
    from tests.support.redis import RedisServer

    with RedisServer() as server:
        yield server


# ATTACK (second outside review; fixed)
async def test_real_redis_backchannel_logout_during_a_refresh_is_undone(
    tmp_path: Path, resolver: StaticKeys, clock: Clock, login: FakeLogin, mint: Mint, real_redis: Any
) -> None:
    from ext_authz.sessions.redisstore import RedisSessionStore

    store = RedisSessionStore(real_redis.url)
    try:
        settings = parse(settings_doc(tmp_path, redis_url=real_redis.url), base_dir=tmp_path)
        p = Pipeline(compile(settings), resolver, clock=clock, login_client=login, session_store=store)
        jar = await sign_in(p, login, mint, expires_in=120)
        clock.now = NOW + 100
        login.gate = asyncio.Event()
        login.answers.append(Tokens("access-2", None, "refresh-2", 3600, None))
        check = asyncio.create_task(p.decide(req("/app/x", cookie=cookie_header(jar))))
        await asyncio.wait_for(login.entered.wait(), 5)
        assert p.browsers is not None
        status, _ = await p.browsers.backchannel_logout(logout_body(mint, iat=int(clock.now)))
        assert status == 200
        login.gate.set()
        await check
        again = await p.decide(req("/app/y", cookie=cookie_header(jar)))
        assert not isinstance(again, Allow), "the session survived back-channel logout in real Redis"
    finally:
        await store.close()


async def test_real_redis_paused_fails_closed_within_the_timeout(
    tmp_path: Path, resolver: StaticKeys, clock: Clock, login: FakeLogin, mint: Mint, real_redis: Any
) -> None:
    from ext_authz.sessions.redisstore import RedisSessionStore

    store = RedisSessionStore(real_redis.url)
    try:
        settings = parse(settings_doc(tmp_path, redis_url=real_redis.url), base_dir=tmp_path)
        p = Pipeline(compile(settings), resolver, clock=clock, login_client=login, session_store=store)
        jar = await sign_in(p, login, mint)
        real_redis.pause()
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            decision = await p.decide(req("/app/x", cookie=cookie_header(jar)))
            assert isinstance(decision, Deny) and decision.status == 503
            assert p.browsers is not None
            assert (await p.browsers.backchannel_logout(logout_body(mint)))[0] == 503
            assert loop.time() - started < 3
        finally:
            real_redis.resume()
    finally:
        await store.close()
