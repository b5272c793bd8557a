"""Adversarial review of ext_authz/sessions/cookies.py: each attack must fail."""

from __future__ import annotations

import time

import pytest

from ext_authz.sessions.cookies import VERSION, Sealer, SecretError, join, parse_secrets, split

NOW = 1_800_000_000.0
A = bytes(range(32))
NAME = "__Host-ext-authz"


def _sealed(sealer: Sealer, purpose: str = "session", name: str = NAME) -> str:
    return sealer.seal(purpose, name, {"sub": "alice"}, now=NOW, lifetime_seconds=3600)


# F1 (medium: unauthenticated DoS / error path): join raises on a long digit count.
def test_join_never_raises_on_a_huge_chunk_count() -> None:
    # Python >= 3.11 refuses int() of more than 4300 digits: ValueError escapes join.
    first = "9" * 4301 + "~x"  # ~4.3 KB, one cookie
    assert join(NAME, {NAME: first}) is None


# F2 (low: encoding malleability): many distinct strings open to the same session.
def test_a_different_string_does_not_open() -> None:
    sealer = Sealer([A])
    value = _sealed(sealer)
    body = value[len(VERSION) :]
    variants = [
        VERSION + body[:10] + "!!!!" + body[10:],  # junk characters are discarded
        VERSION + body.replace("-", "+").replace("_", "/"),  # the standard alphabet too
        VERSION + "." * 4 + body,
    ]
    for v in variants:
        if v == value:
            continue
        assert sealer.open("session", NAME, v, now=NOW) is None, v


# F3 (low/defence in depth): the associated data "purpose:name" is ambiguous.
def test_purpose_and_name_are_unambiguous() -> None:
    sealer = Sealer([A])
    value = _sealed(sealer, purpose="session:a", name="b")
    assert sealer.open("session", "a:b", value, now=NOW) is None


# Checked safe (pass now): speed of junk, many chunks, key-id collisions.
def test_big_junk_is_fast() -> None:
    sealer = Sealer([A, bytes(range(1, 33))])
    t = time.perf_counter()
    for junk in ["v1." + "A" * 400_000, "v1." + "!" * 400_000, "v1." + "A" * 399_999 + "=="]:
        assert sealer.open("session", NAME, junk, now=NOW) is None
    cookies = {NAME: "8~" + "A" * 4000, **{f"{NAME}.{i}": "A" * 4000 for i in range(1, 8)}}
    assert sealer.open("session", NAME, join(NAME, cookies) or "", now=NOW) is None
    assert time.perf_counter() - t < 1.0


def test_recombined_chunks_refused() -> None:
    sealer = Sealer([A])

    def big() -> str:
        return sealer.seal("session", NAME, {"x": "y" * 9000}, now=NOW, lifetime_seconds=60)

    c1, c2 = dict(split(NAME, big())), dict(split(NAME, big()))
    mixed = {**c1, f"{NAME}.2": c2[f"{NAME}.2"]}
    assert sealer.open("session", NAME, join(NAME, mixed) or "", now=NOW) is None


def test_parse_secrets_only_secret_error() -> None:
    for text in ["\u0660" * 64, "zz" * 40, "aa" * 31 + " a", "\x00" * 100, "ab" * 32 + "\u2028" + "q"]:
        with pytest.raises(SecretError) as raised:
            parse_secrets(text)
        assert text.strip() not in str(raised.value)
