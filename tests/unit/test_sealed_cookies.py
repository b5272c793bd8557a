"""Sealed cookies (ext_authz/sessions/cookies.py): what opens, and everything that must not."""

from __future__ import annotations

import base64

import pytest

from ext_authz.sessions.cookies import (
    CHUNK_CHARS,
    MAX_CHUNKS,
    VERSION,
    Sealer,
    SecretError,
    chunk_names,
    join,
    parse_secrets,
    split,
)

NOW = 1_800_000_000.0  # a fixed clock
A, B, C = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
NAME = "__Host-ext-authz"


def sealed(sealer: Sealer, data: object = None, *, lifetime: float = 3600, purpose: str = "session") -> str:
    return sealer.seal(
        purpose, NAME, {"sub": "alice"} if data is None else data, now=NOW, lifetime_seconds=lifetime
    )


def test_round_trip_and_rotation() -> None:
    old = Sealer([A])
    value = sealed(old)
    assert value.startswith(VERSION)
    assert old.open("session", NAME, value, now=NOW + 10) == {"sub": "alice"}
    rotated = Sealer([B, A])  # a new secret first, the old one still accepted
    assert rotated.open("session", NAME, value, now=NOW) == {"sub": "alice"}
    assert Sealer([A]).open("session", NAME, sealed(rotated), now=NOW) is None  # sealed with B
    assert Sealer([C]).open("session", NAME, value, now=NOW) is None  # the old secret removed


def test_two_seals_of_the_same_data_differ() -> None:
    sealer = Sealer([A])
    assert sealed(sealer) != sealed(sealer)  # a fresh nonce each time


def test_bound_to_purpose_and_name() -> None:
    sealer = Sealer([A])
    transaction = sealed(sealer, purpose="transaction")
    assert sealer.open("session", NAME, transaction, now=NOW) is None
    assert sealer.open("transaction", "other-cookie", transaction, now=NOW) is None
    assert sealer.open("transaction", NAME, transaction, now=NOW) == {"sub": "alice"}


def test_expiry_and_a_future_iat() -> None:
    sealer = Sealer([A])
    value = sealed(sealer, lifetime=100)
    assert sealer.open("session", NAME, value, now=NOW + 99) is not None
    assert sealer.open("session", NAME, value, now=NOW + 100) is None  # at exp: expired
    assert sealer.open("session", NAME, value, now=NOW - 61) is None  # iat beyond the skew ahead


def test_every_changed_byte_and_every_truncation_is_refused() -> None:
    sealer = Sealer([A])
    value = sealed(sealer)
    body = bytearray(base64.urlsafe_b64decode(value[len(VERSION) :] + "=="))
    for i in range(len(body)):
        tampered = bytearray(body)
        tampered[i] ^= 0x01
        text = VERSION + base64.urlsafe_b64encode(bytes(tampered)).rstrip(b"=").decode()
        assert sealer.open("session", NAME, text, now=NOW) is None, i
    for cut in range(len(value)):
        assert sealer.open("session", NAME, value[:cut], now=NOW) is None, cut


@pytest.mark.parametrize(
    "value",
    [
        "",
        "v1.",
        "v2." + "A" * 60,
        "v1.!!!!",
        "v1.\u00e9\u00e9\u00e9\u00e9",
        "v1." + "A" * 21,
        "v1." + "A" * 5000,
        "1~v1.x",
    ],
)
def test_junk_is_no_value(value: str) -> None:
    assert Sealer([A]).open("session", NAME, value, now=NOW) is None


def test_split_and_join() -> None:
    sealer = Sealer([A])
    small = sealed(sealer)
    assert split(NAME, small) == [(NAME, small)]
    assert join(NAME, {NAME: small}) == small
    large = sealed(sealer, {"blob": "x" * 9000})
    cookies = dict(split(NAME, large))
    assert len(cookies) == 4 and all(len(v) <= CHUNK_CHARS + 2 for v in cookies.values())
    assert set(cookies) <= set(chunk_names(NAME))
    assert join(NAME, cookies) == large
    assert sealer.open("session", NAME, join(NAME, cookies) or "", now=NOW) == {"blob": "x" * 9000}
    missing = dict(cookies)
    del missing[f"{NAME}.2"]
    assert join(NAME, missing) is None
    swapped = {**cookies, f"{NAME}.1": cookies[f"{NAME}.2"], f"{NAME}.2": cookies[f"{NAME}.1"]}
    assert sealer.open("session", NAME, join(NAME, swapped) or "", now=NOW) is None
    assert join(NAME, {NAME: "99~abc"}) is None and join(NAME, {NAME: "1~abc"}) is None
    assert join(NAME, {}) is None
    with pytest.raises(ValueError, match="cookies"):
        split(NAME, "v1." + "A" * (CHUNK_CHARS * MAX_CHUNKS + 1))


def test_secrets_file() -> None:
    assert parse_secrets(f"# new\n{B.hex()}\n\n{A.hex()}\n") == (B, A)
    with pytest.raises(SecretError, match="line 1: 16 bytes"):
        parse_secrets("00" * 16)
    with pytest.raises(SecretError, match="line 2: not hex"):
        parse_secrets(f"{A.hex()}\nnot-hex-at-all")
    with pytest.raises(SecretError, match="no secret"):
        parse_secrets("# only a comment\n")
    with pytest.raises(SecretError):
        Sealer([])
    with pytest.raises(SecretError):
        Sealer([b"short"])


def test_a_secret_never_appears_in_an_error() -> None:
    secret = "ab" * 20 + "zz"
    with pytest.raises(SecretError) as raised:
        parse_secrets(secret)
    assert secret not in str(raised.value)


def test_none_cannot_be_sealed() -> None:
    # open() answers None for "no value": a sealed None would be indistinguishable from a refusal.
    with pytest.raises(ValueError, match="None"):
        Sealer([A]).seal("session", NAME, None, now=NOW, lifetime_seconds=60)


def test_set_cookie_attributes_and_leftover_parts() -> None:
    from ext_authz.sessions.cookies import expire_cookies, set_cookie, set_cookies

    assert set_cookie(NAME, "v1.abc", max_age_seconds=3600) == (
        f"{NAME}=v1.abc; Max-Age=3600; Path=/; Secure; HttpOnly; SameSite=Lax"
    )
    sealer = Sealer([A])
    small = sealed(sealer)
    earlier = dict(split(NAME, sealed(sealer, {"blob": "x" * 9000})))  # 4 parts in the browser
    values = set_cookies(NAME, small, max_age_seconds=60, present=earlier)
    assert values[0].startswith(f"{NAME}={small}; Max-Age=60;")
    assert sorted(v.split("=")[0] for v in values[1:]) == [f"{NAME}.1", f"{NAME}.2", f"{NAME}.3"]
    assert all("Max-Age=0;" in v for v in values[1:])
    assert set_cookies(NAME, small, max_age_seconds=60, present={}) == values[:1]
    assert [v.split("=")[0] for v in expire_cookies(NAME, earlier)] == [
        NAME,
        f"{NAME}.1",
        f"{NAME}.2",
        f"{NAME}.3",
    ]


@pytest.mark.parametrize(
    ("scheme", "host", "secure"),
    [
        ("https", "app.example.com", True),
        ("HTTPS", "app.example.com", True),
        ("http", "localhost", True),
        ("http", "app.localhost", True),
        ("http", "127.0.0.1", True),
        ("http", "[::1]", True),
        ("http", "app.example.com", False),
        ("http", "127.0.0.2", False),
        ("http", "localhost.example.com", False),
        ("ftp", "localhost", False),
    ],
)
def test_secure_context(scheme: str, host: str, secure: bool) -> None:
    from ext_authz.sessions.cookies import secure_context

    assert secure_context(scheme, host) is secure
