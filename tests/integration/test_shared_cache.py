"""A JWKS cache shared through a real redis-server by two real ext-authz processes.

Both processes use `jwks_cache: {backend: redis}` against one Redis and one test issuer. The
issuer's request counter is the witness: one JWKS fetch serves both processes at start and one
per refresh period afterwards. Then Redis goes away (stopped, or frozen with SIGSTOP so that it
accepts connections and never answers), and both processes keep answering correctly on keys
they fetch and hold themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
from tests.support.idp import DISCOVERY_PATH, JWKS_PATH, TestIssuer, tamper_signature
from tests.support.processes import start_ext_authz
from tests.support.redis import RedisServer

REFRESH = 2.0
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
        jwks_cache={"backend": "redis", "url": redis_server.url},
    )
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
