"""Token introspection (RFC 7662) against a real test issuer on 127.0.0.1: client authentication,
endpoint discovery, the answers, their cache (an injected clock), single flight and failures."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import replace
from typing import Any, Literal, cast

import pytest

from ext_authz import errors
from ext_authz.config.model import IntrospectionSettings, IssuerTemplate, ProviderSettings
from ext_authz.config.parse import parse
from ext_authz.introspection import MAX_IN_FLIGHT, HttpIntrospector, Introspected, NoIntrospection
from ext_authz.keys.fetch import DISCOVERY_PATH, HttpFetcher
from tests.support.idp import INTROSPECTION_PATH, TestIssuer

CLIENT_ID = "ext authz:1"  # a space and a ':' survive client_secret_basic's form-urlencoding
SECRET = "s3cr:et+/value"


class Clock:
    """Wall time (the issuer's exp is real time) that only moves when a test moves it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        running.set_introspection_client(CLIENT_ID, SECRET)
        yield running


@pytest.fixture
async def fetcher() -> AsyncIterator[HttpFetcher]:
    fetcher = HttpFetcher()
    yield fetcher
    await fetcher.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def introspector(fetcher: HttpFetcher, clock: Clock) -> HttpIntrospector:
    return HttpIntrospector(fetcher, clock=clock)


def provider(
    issuer: TestIssuer,
    *,
    endpoint: str | None = None,
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic",
    client_id: str = CLIENT_ID,
    secret: str = SECRET,
    cache_seconds: float = 60,
    negative_cache_seconds: float = 5,
    timeout: float = 2.0,
    allow_insecure_http: bool = True,
) -> ProviderSettings:
    document = {
        "providers": [
            {
                "name": "corp",
                "issuer": issuer.url,
                "audiences": [issuer.audience],
                "allow_insecure_http": True,
            }
        ]
    }
    parsed = parse(document).providers[0]
    settings = IntrospectionSettings(
        endpoint=endpoint,
        client_id=client_id,
        client_secret=secret,
        auth_method=auth_method,
        cache_seconds=cache_seconds,
        negative_cache_seconds=negative_cache_seconds,
    )
    keys = replace(parsed.keys, fetch_timeout_seconds=timeout, refresh_interval_seconds=600)
    return replace(parsed, introspection=settings, keys=keys, allow_insecure_http=allow_insecure_http)


def introspections(issuer: TestIssuer) -> int:
    return issuer.request_count(INTROSPECTION_PATH)


# ---- client authentication -------------------------------------------------------------------


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_an_active_token_with_either_client_authentication(
    issuer: TestIssuer,
    introspector: HttpIntrospector,
    auth_method: Literal["client_secret_basic", "client_secret_post"],
) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, auth_method=auth_method)
    token = issuer.issue_opaque({"sub": "bob", "scope": "read write"})
    answer = await introspector.introspect(corp, token)
    assert answer.active
    assert answer.claims["sub"] == "bob" and answer.claims["scope"] == "read write"
    assert answer.claims["iss"] == issuer.url and answer.claims["aud"] == issuer.audience
    assert "active" not in answer.claims
    assert introspector.answer_now(corp, token) == answer
    assert introspections(issuer) == 1


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
@pytest.mark.parametrize(("client_id", "secret"), [(CLIENT_ID, "wrong"), ("someone-else", SECRET)])
async def test_refused_client_credentials_are_unavailable_not_inactive(
    issuer: TestIssuer,
    introspector: HttpIntrospector,
    caplog: pytest.LogCaptureFixture,
    auth_method: Literal["client_secret_basic", "client_secret_post"],
    client_id: str,
    secret: str,
) -> None:
    corp = provider(
        issuer,
        endpoint=issuer.introspection_endpoint,
        auth_method=auth_method,
        client_id=client_id,
        secret=secret,
    )
    token = issuer.issue_opaque()
    with (
        caplog.at_level(logging.WARNING, logger="ext_authz.introspection"),
        pytest.raises(errors.IntrospectionUnavailable) as caught,
    ):
        await introspector.introspect(corp, token)
    assert caught.value.status == 503
    fields = getattr(caplog.records[-1], "fields", {})
    assert fields["provider"] == "corp" and fields["outcome"] == "http_error"
    assert "HTTP 401" in fields["error"]
    assert introspector.answer_now(corp, token) is None  # a failure is never cached
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(corp, token)
    assert introspections(issuer) == 2


async def test_an_issuer_without_a_configured_client_refuses_everyone(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    issuer.set_introspection_client(None)
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(provider(issuer), issuer.issue_opaque())


# ---- the endpoint -----------------------------------------------------------------------------


async def test_the_endpoint_is_discovered_once_and_kept_through_a_failed_refetch(
    issuer: TestIssuer, introspector: HttpIntrospector, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    corp = provider(issuer)  # no endpoint: the discovery document's introspection_endpoint
    assert introspector.answer_now(corp, "anything") is None  # nothing discovered yet
    first, second = issuer.issue_opaque(), issuer.issue_opaque()
    assert (await introspector.introspect(corp, first)).active
    assert (await introspector.introspect(corp, second)).active
    assert issuer.request_count(DISCOVERY_PATH) == 1 and introspections(issuer) == 2

    clock.now += 601  # past refresh_interval_seconds (and every cached answer); the IdP's discovery fails
    issuer.fail_path(DISCOVERY_PATH, 500)
    with caplog.at_level(logging.WARNING, logger="ext_authz.introspection"):
        assert not (await introspector.introspect(corp, "unknown")).active
        assert not (await introspector.introspect(corp, "unknown-too")).active
    assert issuer.request_count(DISCOVERY_PATH) == 2  # not retried per request during the outage
    assert [getattr(r, "fields", {})["outcome"] for r in caplog.records] == ["http_error"]

    clock.now += corp.keys.refetch_min_interval_seconds
    issuer.fail_path(DISCOVERY_PATH, None)
    assert not (await introspector.introspect(corp, "unknown-three")).active
    assert issuer.request_count(DISCOVERY_PATH) == 3


async def test_concurrent_discovery_is_one_fetch(issuer: TestIssuer, introspector: HttpIntrospector) -> None:
    issuer.delay_path(DISCOVERY_PATH, 0.1)
    corp = provider(issuer)
    tokens = [issuer.issue_opaque() for _ in range(5)]
    answers = await asyncio.gather(*(introspector.introspect(corp, t) for t in tokens))
    assert all(a.active for a in answers)
    assert issuer.request_count(DISCOVERY_PATH) == 1 and introspections(issuer) == 5


@pytest.mark.parametrize(
    "change",
    [
        {"introspection_endpoint": None},
        {"introspection_endpoint": 5},
        {"introspection_endpoint": "http://idp.example/introspect"},  # plain http, not loopback
        {"issuer": "http://127.0.0.1:1"},
    ],
)
async def test_a_discovery_document_without_a_usable_endpoint_is_unavailable(
    issuer: TestIssuer, introspector: HttpIntrospector, change: Mapping[str, Any]
) -> None:
    document = {k: v for k, v in {**issuer.discovery(), **change}.items() if v is not None}
    issuer.override(DISCOVERY_PATH, 200, json.dumps(document).encode())
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(provider(issuer, allow_insecure_http=False), issuer.issue_opaque())
    assert introspections(issuer) == 0


async def test_an_issuer_template_discovers_at_its_discovery_issuer(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    pattern = re.compile(re.escape(issuer.url) + "/([^/]+)/v2")
    tenants = replace(provider(issuer), issuer=issuer.url + "/{tenant}/v2")
    common = replace(tenants, issuer_template=IssuerTemplate(pattern, None, discovery_issuer=issuer.url))
    assert (await introspector.introspect(common, issuer.issue_opaque())).active
    assert issuer.request_count(DISCOVERY_PATH) == 1
    without = replace(tenants, name="no-common", issuer_template=IssuerTemplate(pattern, None))
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(without, issuer.issue_opaque())
    assert issuer.request_count(DISCOVERY_PATH) == 1


@pytest.mark.parametrize("endpoint", ["http://idp.example/introspect", "ftp://127.0.0.1/x", "http://[::1/x"])
async def test_a_configured_endpoint_must_pass_the_url_policy(
    issuer: TestIssuer, introspector: HttpIntrospector, endpoint: str
) -> None:
    corp = provider(issuer, endpoint=endpoint, allow_insecure_http=False)
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(corp, issuer.issue_opaque())


# ---- answers and their cache --------------------------------------------------------------------


async def test_inactive_answers_carry_no_claims_and_are_cached_negatively(
    issuer: TestIssuer, introspector: HttpIntrospector, clock: Clock
) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, negative_cache_seconds=5)
    unknown = "never-issued"
    assert await introspector.introspect(corp, unknown) == Introspected(False, {})
    assert introspector.answer_now(corp, unknown) == Introspected(False, {})
    assert not (await introspector.introspect(corp, unknown)).active
    assert introspections(issuer) == 1
    clock.now += 5
    assert introspector.answer_now(corp, unknown) is None
    await introspector.introspect(corp, unknown)
    assert introspections(issuer) == 2


async def test_an_inactive_answers_other_members_are_ignored(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    issuer.override(INTROSPECTION_PATH, 200, b'{"active": false, "sub": "alice", "scope": "admin"}')
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    assert await introspector.introspect(corp, "t") == Introspected(False, {})


async def test_a_revoked_token_is_inactive_once_its_cached_answer_expires(
    issuer: TestIssuer, introspector: HttpIntrospector, clock: Clock
) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, cache_seconds=30)
    token = issuer.issue_opaque()
    assert (await introspector.introspect(corp, token)).active
    issuer.revoke_opaque(token)
    clock.now += 29
    assert (await introspector.introspect(corp, token)).active  # cached: at most cache_seconds late
    clock.now += 1
    assert introspector.answer_now(corp, token) is None
    assert not (await introspector.introspect(corp, token)).active
    assert introspections(issuer) == 2


async def test_an_active_answer_is_cached_no_longer_than_its_exp(
    issuer: TestIssuer, introspector: HttpIntrospector, clock: Clock
) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, cache_seconds=60)
    token = issuer.issue_opaque(ttl=10)
    exp = (await introspector.introspect(corp, token)).claims["exp"]
    assert isinstance(exp, int)
    clock.now = exp - 0.5
    assert introspector.answer_now(corp, token) is not None
    clock.now = exp
    assert introspector.answer_now(corp, token) is None


async def test_an_active_answer_past_its_exp_is_inactive(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    past = int(time.time()) - 1
    body = f'{{"active": true, "sub": "alice", "exp": {past}}}'.encode()
    issuer.override(INTROSPECTION_PATH, 200, body)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    assert await introspector.introspect(corp, "t") == Introspected(False, {})


async def test_cache_seconds_zero_caches_nothing(issuer: TestIssuer, introspector: HttpIntrospector) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, cache_seconds=0, negative_cache_seconds=0)
    token = issuer.issue_opaque()
    for expected in (1, 2):
        assert (await introspector.introspect(corp, token)).active
        assert introspector.answer_now(corp, token) is None
        assert introspections(issuer) == expected
    await introspector.introspect(corp, "unknown")
    assert introspector.answer_now(corp, "unknown") is None


async def test_the_cache_is_bounded_expired_entries_first_then_the_oldest(
    issuer: TestIssuer, fetcher: HttpFetcher, clock: Clock
) -> None:
    introspector = HttpIntrospector(fetcher, clock=clock, max_entries=2)
    corp = provider(
        issuer, endpoint=issuer.introspection_endpoint, cache_seconds=60, negative_cache_seconds=5
    )
    active = issuer.issue_opaque()
    await introspector.introspect(corp, active)  # the oldest, 60 s
    await introspector.introspect(corp, "inactive")  # 5 s
    clock.now += 6
    newer = issuer.issue_opaque()
    await introspector.introspect(corp, newer)  # room made by dropping the expired one, not the oldest
    assert introspector.answer_now(corp, active) is not None
    assert introspector.answer_now(corp, newer) is not None
    newest = issuer.issue_opaque()
    await introspector.introspect(corp, newest)  # nothing expired: the oldest goes
    assert introspector.answer_now(corp, active) is None
    assert introspector.answer_now(corp, newer) is not None
    assert introspector.answer_now(corp, newest) is not None


async def test_the_cache_is_keyed_by_a_digest_never_the_token(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    token = issuer.issue_opaque()
    await introspector.introspect(corp, token)
    other = replace(corp, name="other")  # another provider never reads corp's answers
    assert introspector.answer_now(other, token) is None
    keys = list(introspector._entries)
    assert len(keys) == 1 and token not in repr(keys) and token.encode() not in repr(keys).encode()


# ---- single flight and failures --------------------------------------------------------------------


async def test_concurrent_askers_share_one_request(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    issuer.delay_path(INTROSPECTION_PATH, 0.2)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    token = issuer.issue_opaque()
    answers = await asyncio.gather(*(introspector.introspect(corp, token) for _ in range(20)))
    assert len({id(a) for a in answers}) == 1 and answers[0].active
    assert introspections(issuer) == 1


async def test_a_cancelled_asker_does_not_cancel_the_shared_request(
    issuer: TestIssuer, introspector: HttpIntrospector
) -> None:
    issuer.delay_path(INTROSPECTION_PATH, 0.3)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    token = issuer.issue_opaque()
    impatient = asyncio.create_task(introspector.introspect(corp, token))
    patient = asyncio.create_task(introspector.introspect(corp, token))
    await asyncio.to_thread(issuer.wait_for_count, INTROSPECTION_PATH, 1, 5.0)
    impatient.cancel()
    assert (await patient).active
    assert impatient.cancelled()
    assert introspections(issuer) == 1


async def test_a_slow_endpoint_is_unavailable_within_the_timeout(
    issuer: TestIssuer, introspector: HttpIntrospector, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.delay_path(INTROSPECTION_PATH, 5.0)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint, timeout=0.3)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="ext_authz.introspection"),
        pytest.raises(errors.IntrospectionUnavailable),
    ):
        await introspector.introspect(corp, issuer.issue_opaque())
    assert time.monotonic() - started < 2.0
    assert getattr(caplog.records[-1], "fields", {})["outcome"] == "timeout"


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (500, b'{"active": true}', "application/json"),
        (200, b"<html>sign in</html>", "text/html"),
        (200, b'{"active": "true"}', "application/json"),
        (200, b'{"active": 1}', "application/json"),
        (200, b'{"sub": "alice"}', "application/json"),
        (200, b"[true]", "application/json"),
        (200, b'{"active": false, "active": true}', "application/json"),  # repeated member
        (200, b'{"active": true, "pad": "' + b"x" * 600_000 + b'"}', "application/json"),  # oversize
        (302, b"", "application/json"),
    ],
)
async def test_garbage_answers_are_unavailable(
    issuer: TestIssuer,
    introspector: HttpIntrospector,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
    content_type: str,
) -> None:
    issuer.override(INTROSPECTION_PATH, status, body, content_type)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    with (
        caplog.at_level(logging.WARNING, logger="ext_authz.introspection"),
        pytest.raises(errors.IntrospectionUnavailable),
    ):
        await introspector.introspect(corp, "t")
    assert introspector.answer_now(corp, "t") is None
    assert len(caplog.records) == 1


async def test_a_down_endpoint_is_unavailable(issuer: TestIssuer, introspector: HttpIntrospector) -> None:
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    issuer.stop()
    with pytest.raises(errors.IntrospectionUnavailable):
        await introspector.introspect(corp, "t")


async def test_no_log_record_names_the_token_or_the_secret(
    issuer: TestIssuer, introspector: HttpIntrospector, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.issue_opaque()
    with caplog.at_level(logging.DEBUG):
        for case in ("wrong-secret", "garbage", "slow", "discovery-down", "ok"):
            issuer.heal()
            corp = provider(issuer, secret=SECRET, timeout=0.3)
            fresh = HttpIntrospector(introspector._fetcher)
            if case == "wrong-secret":
                issuer.set_introspection_client(CLIENT_ID, "the-real-one")
            else:
                issuer.set_introspection_client(CLIENT_ID, SECRET)
            if case == "garbage":
                issuer.override(INTROSPECTION_PATH, 200, f'{{"active": "{token}"}}'.encode())
            if case == "slow":
                issuer.delay_path(INTROSPECTION_PATH, 2.0)
            if case == "discovery-down":
                issuer.fail_path(DISCOVERY_PATH, 503)
            try:
                await fresh.introspect(corp, token)
            except errors.IntrospectionUnavailable:
                assert case != "ok"
    assert len(caplog.records) >= 4
    for record in caplog.records:
        text = f"{record.getMessage()} {vars(record)}"
        assert token not in text and SECRET not in text


# ---- threads ------------------------------------------------------------------------------------------


async def test_request_threads_read_while_the_loop_writes_and_evicts(issuer: TestIssuer) -> None:
    """answer_now from threads during stores and evictions: never an error, never a wrong answer."""

    class Answering:
        async def post_form(self, url: str, form: Mapping[str, str], **_: Any) -> tuple[int, object]:
            await asyncio.sleep(0)
            return 200, {"active": True, "sub": form["token"]}

    introspector = HttpIntrospector(cast(HttpFetcher, Answering()), max_entries=50)
    corp = provider(issuer, endpoint=issuer.introspection_endpoint)
    tokens = [f"token-{i}" for i in range(400)]
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        while not stop.is_set():
            for token in tokens[::7]:
                answer = introspector.answer_now(corp, token)
                if answer is not None and answer.claims.get("sub") != token:
                    problems.append(token)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    try:
        for _ in range(3):
            for start in range(0, len(tokens), MAX_IN_FLIGHT):  # the bound on requests under way
                batch = tokens[start : start + MAX_IN_FLIGHT]
                await asyncio.gather(*(introspector.introspect(corp, t) for t in batch))
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=5)
    assert problems == []
    assert len(introspector._entries) <= 50


async def test_no_introspection_never_answers(issuer: TestIssuer) -> None:
    none = NoIntrospection()
    corp = provider(issuer)
    assert none.answer_now(corp, "t") is None
    with pytest.raises(errors.IntrospectionUnavailable):
        await none.introspect(corp, "t")
