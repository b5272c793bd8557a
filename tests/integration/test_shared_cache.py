"""A JWKS cache shared through a real redis-server by two real ext-authz processes.

Both processes use `jwks_cache: {backend: redis}` against one Redis and one test issuer. The
issuer's request counter is the witness: one JWKS fetch serves both processes at start and one
per refresh period afterwards. Then Redis goes away (stopped, or frozen with SIGSTOP so that it
accepts connections and never answers), and both processes keep answering correctly on keys
they fetch and hold themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from ext_authz.config.model import Settings
from ext_authz.config.parse import load, parse
from ext_authz.keys.cache import (
    MAC_VERSION,
    CachedDocument,
    CacheKey,
    Rejected,
    SharedKeyCache,
    cache_key,
    seal,
    unseal,
)
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.provider import ProviderKeys
from tests.support.authz import (
    AUDIENCE,
    Authz,
    AuthzClient,
    assert_invalid_token,
    assert_ok,
    assert_prompt,
    config,
    provider,
    random_kid_token,
    write_config,
)
from tests.support.idp import (
    DISCOVERY_PATH,
    JWKS_PATH,
    SigningKey,
    TestIssuer,
    generate_key,
    tamper_signature,
)
from tests.support.keys_shared import (
    TlsProxy,
    document_key,
    make_ca,
    make_server_cert,
    plant,
    read,
    redis_key,
)
from tests.support.processes import json_log_line, start_ext_authz
from tests.support.redis import RedisServer

REFRESH = 2.0
SECRET = b"shared-cache-test-secret-0123456789abcdef"
# Above the shared cache's own (0.5 s) bound on each Redis operation, so a frozen Redis costs a
# refetch its Redis timeout and still leaves time to fetch from the issuer.
# 0.5 s, as much as the default Redis timeout: a frozen Redis must not eat the whole fetch budget.
FETCH_TIMEOUT = 0.5
CHECK_BOUND = FETCH_TIMEOUT + 0.75


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience=AUDIENCE) as running:
        yield running


@pytest.fixture
def pair(tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer) -> Iterator[tuple[Authz, Authz]]:
    """Two ext-authz processes started at the same moment, sharing Redis and the issuer."""
    document = config(
        provider(
            issuer,
            refresh_interval_seconds=REFRESH,
            fetch_timeout_seconds=FETCH_TIMEOUT,
            max_stale_seconds=60,
        ),
        jwks_cache={"backend": "redis", "url": redis_server.url, "secret_file": "jwks-cache-secret"},
    )
    (tmp_path / "jwks-cache-secret").write_text(SECRET.decode() + "\n")
    path = write_config(tmp_path, document)
    with contextlib.ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(start_ext_authz, path) for _ in range(2)]
        servers: list[Authz] = []
        errors: list[BaseException] = []
        for future in futures:  # every process that did start is stopped, whatever else failed
            try:
                process = future.result()
            except Exception as exc:
                errors.append(exc)
                continue
            authz = Authz(process, AuthzClient(process.address))
            stack.callback(authz.close)
            servers.append(authz)
        if errors:
            raise errors[0]
        first, second = servers
        first.wait_serving()
        second.wait_serving()
        yield first, second


def assert_answers_correctly(authz: Authz, issuer: TestIssuer, bound: float = CHECK_BOUND) -> None:
    valid = authz.check(issuer.mint())
    assert_ok(valid, authz)
    assert_prompt(valid, authz, bound)
    forged = authz.check(tamper_signature(issuer.mint()))
    assert_invalid_token(forged, authz)
    assert_prompt(forged, authz, bound)


def test_one_fetch_serves_both_and_both_survive_redis_stopping(
    pair: tuple[Authz, Authz], issuer: TestIssuer, redis_server: RedisServer
) -> None:
    first, second = pair
    # Measured at once: the first routine refresh is 1.8-2 s after the start-up fetch.
    counts = issuer.request_counts
    assert counts.get(JWKS_PATH, 0) == 1, f"{counts}\n{first.log()}\n{second.log()}"
    assert counts.get(DISCOVERY_PATH, 0) <= 2, counts
    assert redis_server.dbsize() >= 1, "nothing was stored in Redis"
    for authz in pair:
        assert_answers_correctly(authz, issuer)

    # One refresh period later the two still fetch once between them: the one due first fetches,
    # the other takes what it stored (their schedules differ by at most 10% of the period).
    issuer.wait_for_count(JWKS_PATH, 2, timeout=REFRESH + 1.5)
    time.sleep(0.1 * REFRESH + 0.4)
    counts = issuer.request_counts
    assert counts[JWKS_PATH] == 2, f"{counts}\n{first.log()}\n{second.log()}"

    redis_server.stop()
    for authz in pair:
        assert_answers_correctly(authz, issuer)
    # Without Redis each process refreshes from the issuer itself: two fetches per period.
    stopped_at = issuer.request_count(JWKS_PATH)
    try:
        issuer.wait_for_count(JWKS_PATH, stopped_at + 2, timeout=2 * REFRESH + 1.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: no refresh without Redis\n{first.log()}\n{second.log()}") from None
    for authz in pair:
        assert_answers_correctly(authz, issuer)
        unknown = authz.check(random_kid_token(issuer))
        assert_invalid_token(unknown, authz)
        assert_prompt(unknown, authz)
        authz.process.process.check_alive()


def test_frozen_redis_fails_no_request_and_rotation_still_works(
    pair: tuple[Authz, Authz], issuer: TestIssuer, redis_server: RedisServer
) -> None:
    first, second = pair
    assert_ok(first.check(issuer.mint()), first)
    redis_server.pause()  # connections are accepted, nothing is ever answered
    for authz in pair:
        assert_answers_correctly(authz, issuer)

    # The issuer rotates while Redis hangs: the new kid is fetched without Redis, in time.
    new_kid = issuer.rotate()
    new_token = issuer.mint(kid=new_kid)
    for authz in pair:
        result = authz.check(new_token)
        assert_ok(result, authz)
        assert_prompt(result, authz)

    # And routine refreshes go on from the issuer while Redis stays frozen.
    before = issuer.request_count(JWKS_PATH)
    try:
        issuer.wait_for_count(JWKS_PATH, before + 2, timeout=2 * REFRESH + 2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: no refresh with Redis frozen\n{first.log()}\n{second.log()}") from None
    for authz in pair:
        assert_answers_correctly(authz, issuer)
        assert_ok(authz.check(new_token), authz)


# ---- Redis is inside the trust boundary: planted documents are not trusted ---------------------
#
# Whoever can write to Redis plants a key set of their own with `fetched_at` far in the future
# (1e12: about the year 33658). Before the shared documents were authenticated, every process
# adopted it and accepted the attacker's tokens, silently and until the entry expired.

GENUINE_CLOCK_SKEW = 60
# What the README tells operators to allow an ACL user (keys: ~ext-authz:jwks:*).
ACL_COMMANDS = ("+get", "+set", "+setex", "+psetex", "+del")


def attacker_jwks(issuer: TestIssuer, attacker: SigningKey) -> dict[str, Any]:
    """The attacker's key, under a kid of its own and under the issuer's real kid."""
    same_kid = SigningKey(issuer.default_kid, attacker.alg, attacker.private_key)
    return {"keys": [attacker.jwk(), same_kid.jwk()]}


def forged_tokens(issuer: TestIssuer, attacker: SigningKey) -> list[str]:
    return [
        issuer.mint(headers={"kid": attacker.kid}, key=attacker.private_key),
        issuer.mint(key=attacker.private_key),  # claims the issuer's kid
    ]


def _raw_mac(secret: bytes, key: CacheKey, fetched_at: object, max_age: object, jwks: object) -> str:
    """A MAC over whatever fields are given (NaN included): what a holder of the secret could store."""
    message = json.dumps(
        [MAC_VERSION, key.issuer, key.jwks_uri, fetched_at, max_age, jwks],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _envelope(key: CacheKey, fetched_at: object, max_age: object, jwks: object, mac: str) -> str:
    return json.dumps(
        {
            "v": 1,
            "issuer": key.issuer,
            "jwks_uri": key.jwks_uri,
            "fetched_at": fetched_at,
            "max_age": max_age,
            "jwks": jwks,
            "mac": mac,
        }
    )


def planted_document(variant: str, key: CacheKey, jwks: dict[str, Any], now: float) -> str | bytes:
    """The raw Redis value of each attack (all carry the attacker's key set)."""
    if variant == "not_utf8":
        return (
            json.dumps({"jwks": jwks, "fetched_at": 1e12, "max_age": None, "x": "\udcff"})
            .encode("utf-8", "surrogateescape")
            .replace(b"\\udcff", b"\xff")
        )
    if variant == "no_mac":  # the format every process trusted before
        return json.dumps({"jwks": jwks, "fetched_at": 1e12, "max_age": None})
    if variant == "wrong_secret":
        return seal(b"not-the-fleet-secret-0123456789abcdef", key, CachedDocument(jwks, 1e12, None))
    if variant == "replayed_other_issuer":
        # A genuine document (right secret) of another provider, copied under our key.
        other = cache_key("https://other-idp.example.com/", "https://other-idp.example.com/jwks")
        sealed = json.loads(seal(SECRET, other, CachedDocument(jwks, now, None)))
        return json.dumps({**sealed, "issuer": key.issuer, "jwks_uri": key.jwks_uri})
    if variant == "tampered_fetched_at":
        sealed = json.loads(seal(SECRET, key, CachedDocument(jwks, now, None)))
        return json.dumps({**sealed, "fetched_at": 1e12})
    if variant == "nested":  # a parser bomb: must not crash the refresh
        return (
            '{"mac": "00", "v": 1, "fetched_at": 1, "max_age": null, "jwks": '
            + "[" * 200_000
            + "]" * 200_000
            + "}"
        )
    # The rest carry a valid MAC: a process holding the secret, with a broken clock or a bug.
    fetched_at, max_age = {
        "nan": (math.nan, None),
        "inf": (math.inf, None),
        "huge_int": (10**400, None),
        "string": ("x", None),
        "future": (now + 3600, None),
        "negative_max_age": (now, -5),
    }[variant]
    return _envelope(key, fetched_at, max_age, jwks, _raw_mac(SECRET, key, fetched_at, max_age, jwks))


ATTACKS = [
    "no_mac",
    "wrong_secret",
    "replayed_other_issuer",
    "tampered_fetched_at",
    "nested",
    "not_utf8",
    "nan",
    "inf",
    "huge_int",
    "string",
    "future",
    "negative_max_age",
]


@pytest.fixture
def secured_redis() -> Iterator[RedisServer]:
    with RedisServer(password="redisTestPassw0rd") as server:
        yield server


def redis_settings(
    tmp_path: Path, issuer: TestIssuer, redis: RedisServer, url: str | None = None, **keys: Any
) -> Settings:
    (tmp_path / "jwks-cache-secret").write_bytes(SECRET + b"\n")
    document = config(
        provider(issuer, fetch_timeout_seconds=2, clock_skew_seconds=GENUINE_CLOCK_SKEW),
        jwks_cache={
            "backend": "redis",
            "url": url or redis.url,
            "secret_file": "jwks-cache-secret",
            **keys,
        },
    )
    return parse(document, base_dir=tmp_path)


@pytest.mark.parametrize("variant", ATTACKS)
async def test_a_planted_key_set_is_rejected_counted_and_the_idp_keys_used(
    tmp_path: Path, issuer: TestIssuer, secured_redis: RedisServer, variant: str
) -> None:
    config_ = redis_settings(tmp_path, issuer, secured_redis)
    [p] = config_.providers
    key = cache_key(p.issuer, p.jwks_uri)
    attacker = SigningKey("attacker", "RS256", generate_key("RS256"))
    plant(
        secured_redis,
        document_key(key.digest),
        planted_document(variant, key, attacker_jwks(issuer, attacker), time.time()),
    )
    # A peer holds the fetch lock and never delivers: a poisoned document must not make us wait.
    plant(secured_redis, redis_key("lock", key.digest), "1")
    cache = SharedKeyCache(config_.jwks_cache)
    fetcher = HttpFetcher()
    keys = ProviderKeys(p, fetcher, cache, clock=time.time, on_change=lambda: None)
    try:
        started = time.monotonic()
        assert await keys.refresh(from_idp=True) == "installed"
        elapsed = time.monotonic() - started

        installed = keys.current()
        assert installed.candidates(attacker.kid, "RS256") == ()
        [genuine] = installed.candidates(issuer.default_kid, "RS256")
        assert genuine.key.public_numbers() == issuer.key().public_key.public_numbers()  # type: ignore[union-attr]
        assert keys.stats.fetches == Counter({"rejected_shared": 1, "ok": 1}), keys.stats.fetches
        assert issuer.request_count(JWKS_PATH) == 1
        assert elapsed < 1.0, f"waited {elapsed:.2f}s on the lock holder despite the rejected document"
        # The genuine set replaced the planted one, so the fleet's next reader adopts it.
        stored = unseal(SECRET, key, read(secured_redis, document_key(key.digest)) or "", not_after=math.inf)
        assert isinstance(stored, CachedDocument), stored
        assert [k["kid"] for k in stored.jwks["keys"]] == list(issuer.kids)  # type: ignore[index]
    finally:
        await keys.stop()
        await fetcher.close()
        await cache.close()


def test_a_running_server_rejects_a_planted_key_set_and_says_so(
    tmp_path: Path, issuer: TestIssuer, secured_redis: RedisServer
) -> None:
    """End to end: a real ext-authz process, its Redis behind a password, a planted document."""
    (tmp_path / "jwks-cache-secret").write_bytes(SECRET + b"\n")
    document = config(
        provider(issuer, fetch_timeout_seconds=FETCH_TIMEOUT),
        jwks_cache={"backend": "redis", "url": secured_redis.url, "secret_file": "jwks-cache-secret"},
        admin="127.0.0.1:0",
    )
    path = write_config(tmp_path, document)
    p = load(path).providers[0]
    key = cache_key(p.issuer, p.jwks_uri)
    attacker = SigningKey("attacker", "RS256", generate_key("RS256"))
    plant(
        secured_redis,
        document_key(key.digest),
        planted_document("no_mac", key, attacker_jwks(issuer, attacker), 0),
    )

    process = start_ext_authz(path)
    authz = Authz(process, AuthzClient(process.address))
    try:
        authz.wait_serving()
        for forged in forged_tokens(issuer, attacker):
            assert_invalid_token(authz.check(forged), authz)
        assert_ok(authz.check(issuer.mint()), authz)
        line = authz.process.process.wait_for_line(
            lambda text: "admin listening" in text, timeout=5, what="admin listening"
        )
        record = json_log_line(line)
        assert record is not None
        with urllib.request.urlopen(f"http://{record['address']}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'ext_authz_key_fetches_total{outcome="rejected_shared",provider="test"} 1.0' in metrics, (
            metrics
        )
        log = "\n".join(authz.process.process.output_lines())
        assert '"outcome": "rejected_shared"' in log and '"reason": "unauthenticated"' in log, log
        # Neither the secret nor the Redis password is ever logged.
        assert SECRET.decode() not in log and (secured_redis.password or "?") not in log
    finally:
        authz.close()
    assert secured_redis.dbsize() >= 1  # it did use Redis, with the password from the URL


# ---- Redis credentials and TLS -----------------------------------------------------------------


async def _round_trip(cache: SharedKeyCache, key: CacheKey) -> CachedDocument | Rejected | None:
    document = CachedDocument({"keys": []}, time.time(), 60.0)
    await cache.put(key, document, ttl_seconds=60)
    return await cache.get(key)


async def test_the_redis_password_is_sent_and_a_missing_one_fails_safe(
    tmp_path: Path, issuer: TestIssuer, secured_redis: RedisServer
) -> None:
    key = cache_key("https://idp.example.com/", "")
    good = SharedKeyCache(redis_settings(tmp_path, issuer, secured_redis).jwks_cache)
    try:
        assert isinstance(await _round_trip(good, key), CachedDocument)
    finally:
        await good.close()
    assert secured_redis.dbsize() == 1
    # Without the password Redis refuses (NOAUTH): the cache reads as empty, nothing fails.
    url = secured_redis.url.replace(f":{secured_redis.password}@", "")
    anonymous = SharedKeyCache(
        replace(redis_settings(tmp_path, issuer, secured_redis).jwks_cache, url=url, password=None)
    )
    try:
        assert await _round_trip(anonymous, key) is None
    finally:
        await anonymous.close()


async def test_rediss_speaks_tls_and_verifies_the_server_certificate(
    tmp_path: Path, issuer: TestIssuer, redis_server: RedisServer
) -> None:
    ca, ca_key, ca_cert = make_ca(tmp_path)
    cert, cert_key = make_server_cert(tmp_path, ca_key, ca_cert)
    other_ca, _, _ = make_ca(tmp_path, "other-ca")
    key = cache_key("https://idp.example.com/", "")
    with TlsProxy(redis_server.port, cert, cert_key) as proxy:
        url = f"rediss://127.0.0.1:{proxy.port}/0"
        cache_settings = redis_settings(tmp_path, issuer, redis_server, url, ca_file=ca.name).jwks_cache
        assert cache_settings.ca_file == str(ca)
        trusted = SharedKeyCache(cache_settings)
        try:
            assert isinstance(await _round_trip(trusted, key), CachedDocument)
        finally:
            await trusted.close()
        assert proxy.handshakes >= 1 and redis_server.dbsize() == 1
        # A server whose certificate the configured CA did not sign is not spoken to.
        handshakes = proxy.handshakes
        untrusted = SharedKeyCache(replace(cache_settings, ca_file=str(other_ca)))
        try:
            assert await _round_trip(untrusted, key) is None
        finally:
            await untrusted.close()
        assert proxy.handshakes == handshakes
        # And plain redis:// to a TLS port gets nothing either (no silent downgrade to clear text).
        clear = SharedKeyCache(replace(cache_settings, url=f"redis://127.0.0.1:{proxy.port}/0", ca_file=None))
        try:
            assert await _round_trip(clear, key) is None
        finally:
            await clear.close()


async def test_an_acl_user_limited_to_the_cache_keys_and_commands_the_readme_lists(
    tmp_path: Path, issuer: TestIssuer, secured_redis: RedisServer
) -> None:
    admin = redis_py.Redis(host="127.0.0.1", port=secured_redis.port, password=secured_redis.password)
    try:
        admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "ext-authz", "on", ">aclPassw0rd", "~ext-authz:jwks:*", *ACL_COMMANDS
        )
    finally:
        admin.close()
    url = f"redis://ext-authz:aclPassw0rd@127.0.0.1:{secured_redis.port}/0"
    cache = SharedKeyCache(redis_settings(tmp_path, issuer, secured_redis, url).jwks_cache)
    key = cache_key("https://idp.example.com/", "")
    try:
        assert isinstance(await _round_trip(cache, key), CachedDocument)
        assert await cache.acquire("lock", key, 5) is True
        assert await cache.acquire("lock", key, 5) is False
        await cache.release("lock", key)
        assert await cache.acquire("lock", key, 5) is True
        assert cache.usable(), "a command the ACL refused made the cache back off"
    finally:
        await cache.close()
