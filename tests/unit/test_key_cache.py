"""The shared key cache's document authentication (seal/unseal) and its Redis connection options,
as pure functions; through a real redis-server in tests/integration/test_shared_cache.py."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ext_authz.config.model import JwksCacheSettings
from ext_authz.keys.cache import (
    MAX_DOCUMENT_BYTES,
    CachedDocument,
    Rejected,
    SharedKeyCache,
    cache_key,
    redis_options,
    seal,
    unseal,
)

SECRET = b"k" * 32
KEY = cache_key("https://idp.example.com/", "https://idp.example.com/jwks")
NOW = 1_800_000_000.25
JWKS = {"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB", "x-ü": "\ud800"}]}
DOCUMENT = CachedDocument(JWKS, NOW, 300.0)
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError


def opened(raw: str, *, secret: bytes = SECRET, not_after: float = NOW + 60) -> CachedDocument | Rejected:
    return unseal(secret, KEY, raw, not_after=not_after)


def test_a_sealed_document_opens_to_itself() -> None:
    assert opened(seal(SECRET, KEY, DOCUMENT)) == DOCUMENT
    without_max_age = CachedDocument(JWKS, NOW, None)
    assert opened(seal(SECRET, KEY, without_max_age)) == without_max_age
    assert cache_key("https://i/", None) == cache_key("https://i/", "")
    assert str(KEY) == KEY.digest and len(KEY.digest) == 32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("issuer", "https://evil.example.com/"),
        ("jwks_uri", "https://evil.example.com/jwks"),
        ("fetched_at", 1e12),
        ("fetched_at", NOW + 1e-6),
        ("max_age", 86400.0),
        ("max_age", None),
        ("jwks", {"keys": []}),
        ("jwks", {**JWKS, "extra": 1}),
        ("mac", "0" * 64),
        ("mac", "é" * 64),
        ("mac", ""),
    ],
)
def test_every_field_is_authenticated(field: str, value: Any) -> None:
    entry = json.loads(seal(SECRET, KEY, DOCUMENT))
    entry[field] = value
    assert isinstance(opened(json.dumps(entry)), Rejected)


def test_the_mac_binds_the_issuer_and_key_url_even_if_the_fields_are_rewritten() -> None:
    other = cache_key("https://other.example.com/", "")
    replayed = {**json.loads(seal(SECRET, other, DOCUMENT)), "issuer": KEY.issuer, "jwks_uri": KEY.jwks_uri}
    assert opened(json.dumps(replayed)) == Rejected("unauthenticated")
    # The other provider's own document is good for it, and not for us even unchanged.
    assert unseal(SECRET, other, seal(SECRET, other, DOCUMENT), not_after=math.inf) == DOCUMENT
    assert opened(seal(SECRET, other, DOCUMENT)) == Rejected("unauthenticated")
    # Fields that disagree with a valid MAC (only a holder of the secret could write them).
    mislabelled = {**json.loads(seal(SECRET, KEY, DOCUMENT)), "issuer": other.issuer}
    assert opened(json.dumps(mislabelled)) == Rejected("wrong_source")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps({"jwks": JWKS, "fetched_at": 1e12, "max_age": None}), "unauthenticated"),
        ("not json", "malformed"),
        ("[]", "unauthenticated"),
        ('"a string"', "unauthenticated"),
        (json.dumps({"mac": 1}), "unauthenticated"),
        (json.dumps({"mac": "00", "v": 1, "jwks": JWKS, "fetched_at": "x", "max_age": None}), "malformed"),
        (json.dumps({"mac": "00", "v": 1, "jwks": JWKS, "fetched_at": True, "max_age": None}), "malformed"),
        (json.dumps({"mac": "00", "v": 1, "jwks": JWKS, "fetched_at": NOW, "max_age": "1"}), "malformed"),
        (json.dumps({"mac": "00", "v": 2, "jwks": JWKS, "fetched_at": NOW, "max_age": None}), "malformed"),
        (json.dumps({"mac": "00", "v": 1, "fetched_at": NOW, "max_age": None}), "malformed"),
        ('{"mac": "00", "v": 1, "jwks": {}, "fetched_at": NaN, "max_age": null}', "malformed"),
        ('{"mac": "00", "v": 1, "jwks": {}, "fetched_at": 1e400, "max_age": null}', "malformed"),
        ('{"mac": "00", "v": 1, "fetched_at": 1, "max_age": null, "jwks": ' + DEEP + "}", "malformed"),
        ("x" * (MAX_DOCUMENT_BYTES + 1), "malformed"),
    ],
    ids=lambda v: v if v in ("unauthenticated", "malformed") else None,
)  # fmt: skip
def test_unauthenticated_or_malformed_documents_are_rejected(raw: str, reason: str) -> None:
    assert opened(raw) == Rejected(reason)  # type: ignore[arg-type]


def test_a_wrong_secret_is_rejected() -> None:
    assert opened(seal(b"w" * 32, KEY, DOCUMENT)) == Rejected("unauthenticated")


def test_times_are_checked_after_the_mac() -> None:
    """A process that holds the secret may still have a wrong clock (or a bug)."""
    future = CachedDocument(JWKS, NOW + 61, None)
    assert opened(seal(SECRET, KEY, future)) == Rejected("future")
    assert opened(seal(SECRET, KEY, future), not_after=NOW + 61) == future  # within the skew
    assert opened(seal(SECRET, KEY, CachedDocument(JWKS, NOW, -1.0))) == Rejected("bad_time")
    assert opened(seal(SECRET, KEY, CachedDocument(JWKS, 10**400, None))) == Rejected("bad_time")
    with pytest.raises(ValueError, match="not JSON compliant"):  # a NaN is never even stored
        seal(SECRET, KEY, CachedDocument(JWKS, math.nan, None))


async def test_the_memory_backend_round_trips_and_never_trusts_a_stranger() -> None:
    cache = SharedKeyCache(JwksCacheSettings())
    assert await cache.get(KEY) is None
    await cache.put(KEY, DOCUMENT, ttl_seconds=60)
    assert await cache.get(KEY) == DOCUMENT
    assert await cache.get(KEY, not_after=NOW - 1) == Rejected("future")
    # the same storage, another secret
    stranger = SharedKeyCache(JwksCacheSettings("memory", None, 0.5, b"s" * 32), storage=cache.storage)
    assert await stranger.get(KEY) == Rejected("unauthenticated")
    await cache.put(KEY, CachedDocument(JWKS, math.nan, None), ttl_seconds=60)  # not stored
    assert await cache.get(KEY) == DOCUMENT


def test_redis_options_user_password_and_tls() -> None:
    plain = redis_options(JwksCacheSettings("redis", "redis://cache/3", 0.5, SECRET))
    assert (plain["endpoint"], plain["port"], plain["db"], plain["password"], plain["ssl"]) == (
        "cache",
        6379,
        3,
        None,
        False,
    )
    assert plain["connection_pool_kwargs"] == {}
    acl = redis_options(JwksCacheSettings("redis", "rediss://ext%2Dauthz:p%40ss@cache:6380/0", 0.5, SECRET))
    assert (acl["port"], acl["password"], acl["ssl"]) == (6380, "p@ss", True)
    assert acl["connection_pool_kwargs"] == {
        "username": "ext-authz",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": None,
    }
    from_file = JwksCacheSettings("redis", "rediss://cache", 0.5, SECRET, password="pw", ca_file="/ca.pem")
    options = redis_options(from_file)
    assert options["password"] == "pw" and options["connection_pool_kwargs"]["ssl_ca_certs"] == "/ca.pem"


def test_settings_repr_hides_the_secret_and_passwords() -> None:
    cache = JwksCacheSettings(
        "redis", "redis://user:hunter2hunter2@cache/0", 0.5, b"S3CR3T" * 6, password="pw-pw"
    )
    text = repr(cache)
    assert "S3CR3T" not in text and "hunter2" not in text and "pw-pw" not in text
    assert "redis://user:***@cache/0" in text
