"""ext_authz.dpop: DPoP proof checks (RFC 9449 §4.3), thumbprints (RFC 7638), the replay caches
and the server nonce. RedisReplayCache against a real redis-server is in
tests/integration/test_dpop_replay_redis.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ext_authz import errors
from ext_authz.config.model import DEFAULT_DPOP_ALGORITHMS
from ext_authz.dpop import (
    NonceIssuer,
    Proof,
    RedisReplayCache,
    ReplayCache,
    ReplayCacheUnavailable,
    access_token_hash,
    check_proof,
    jwk_thumbprint,
    normalise_htu,
    replay_key,
    replay_ttl_seconds,
)
from tests.support.dpop import (
    DPoPKey,
    b64url,
    compact,
    foreign_jwk_proof,
    generate,
    hmac_proof,
    sign,
    unsigned_proof,
)
from tests.support.tokens import NOW

URL = "https://api.example.com/orders/42"
TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA"})
MAX_AGE = 60.0


@pytest.fixture(scope="module")
def key() -> DPoPKey:
    return DPoPKey()


@pytest.fixture(scope="module")
def rsa_key() -> DPoPKey:
    return DPoPKey("RS256")


def check(proof: str, **overrides: Any) -> Proof:
    arguments: dict[str, Any] = {
        "method": "GET",
        "url": URL,
        "access_token": TOKEN,
        "algorithms": ALGORITHMS,
        "now": NOW,
        "max_age_seconds": MAX_AGE,
    }
    return check_proof(proof, **{**arguments, **overrides})


def refused(proof: str, description: str, **overrides: Any) -> None:
    with pytest.raises(errors.InvalidDPoPProof) as caught:
        check(proof, **overrides)
    assert type(caught.value) is errors.InvalidDPoPProof
    assert caught.value.detail == description
    assert '"' not in description and "\\" not in description


# ---------------------------------------------------------------- RFC 7638 thumbprints, RFC 9449 ath

RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRX"
    "jBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8"
    "KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_x"
    "BniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_thumbprint_of_the_rfc7638_example() -> None:
    assert jwk_thumbprint(RFC7638_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("alg", ["ES256", "ES512", "EdDSA"])
def test_thumbprint_covers_the_required_members_only(alg: str) -> None:
    client = DPoPKey(alg)
    assert jwk_thumbprint(client.public_jwk) == client.thumbprint
    assert jwk_thumbprint({**client.public_jwk, "kid": "k", "use": "sig"}) == client.thumbprint


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0"},
        {"n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "e": "AQAB"},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": 5},
        {"kty": ["RSA"], "n": "AQAB", "e": "AQAB"},
    ],
)
def test_thumbprint_refuses_unsupported_or_incomplete_keys(jwk: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        jwk_thumbprint(jwk)


def test_access_token_hash_of_the_rfc9449_example() -> None:
    assert access_token_hash(TOKEN) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


# ---------------------------------------------------------------- htu comparison form


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com/orders/42", "https://api.example.com/orders/42"),
        ("HTTPS://API.Example.COM/Orders", "https://api.example.com/Orders"),
        ("https://api.example.com:443/a", "https://api.example.com/a"),
        ("http://api.example.com:80/a", "http://api.example.com/a"),
        ("http://api.example.com:443/a", "http://api.example.com:443/a"),
        ("https://api.example.com:8443/a", "https://api.example.com:8443/a"),
        ("https://api.example.com/a?b=c#d", "https://api.example.com/a"),
        ("https://api.example.com", "https://api.example.com/"),
        ("https://api.example.com?x", "https://api.example.com/"),
        ("https://api.example.com:/a", "https://api.example.com/a"),
        ("https://[::1]:8443/a", "https://[::1]:8443/a"),
        ("https://api.example.com/a%2Fb", "https://api.example.com/a%2Fb"),
    ],
)
def test_normalise_htu(url: str, expected: str) -> None:
    assert normalise_htu(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "/orders/42",
        "api.example.com/orders",
        "ftp://api.example.com/a",
        "https:///a",
        "https://api.example.com:99999/a",
        "https://api.example.com:x/a",
        "https://user@api.example.com/a",
        "https://api.example.com/a\tb",
        "https://api.example.com/a b",
        "https://api.example.com/\u00e9",
        "",
        "https://[::1/a",
    ],
)
def test_normalise_htu_refuses_what_is_not_an_absolute_http_url(url: str) -> None:
    assert normalise_htu(url) is None


# ---------------------------------------------------------------- valid proofs


@pytest.mark.parametrize(
    ("alg", "curve"),
    [
        ("ES256", ""),
        ("ES384", ""),
        ("ES512", ""),
        ("RS256", ""),
        ("PS256", ""),
        ("EdDSA", "Ed25519"),
        ("EdDSA", "Ed448"),
    ],
)
def test_a_valid_proof_for_each_key_type(alg: str, curve: str) -> None:
    client = DPoPKey(alg, private_key=generate(alg, curve=curve))
    proof = client.proof("GET", URL, TOKEN, iat=NOW, jti="jti-1")
    assert check(proof) == Proof(jkt=client.thumbprint, jti="jti-1", iat=NOW, nonce=None)


def test_the_proof_returns_its_nonce(key: DPoPKey) -> None:
    assert check(key.proof("GET", URL, TOKEN, iat=NOW, nonce="n-1")).nonce == "n-1"


def test_htu_with_a_query_and_a_fragment_matches(key: DPoPKey) -> None:
    proof = key.proof("GET", "https://API.example.com:443/orders/42?ignored=1#frag", TOKEN, iat=NOW)
    assert check(proof, url=f"{URL}?other=2").jkt == key.thumbprint


def test_iat_at_either_edge_of_the_window_is_accepted(key: DPoPKey) -> None:
    check(key.proof("GET", URL, TOKEN, iat=NOW - MAX_AGE))
    check(key.proof("GET", URL, TOKEN, iat=NOW + MAX_AGE))
    check(key.proof("GET", URL, TOKEN, iat=NOW + 0.5))


def test_typ_with_the_media_type_prefix_in_any_case(key: DPoPKey) -> None:
    check(key.proof("GET", URL, TOKEN, iat=NOW, typ="application/DPoP+JWT"))


def test_the_default_algorithms_are_all_accepted() -> None:
    for alg in DEFAULT_DPOP_ALGORITHMS:
        client = DPoPKey(alg)
        check(client.proof("GET", URL, TOKEN, iat=NOW), algorithms=frozenset(DEFAULT_DPOP_ALGORITHMS))


# ---------------------------------------------------------------- refusals, in check order


def test_encrypted_proof_is_refused() -> None:
    refused("a.b.c.d.e", "encrypted DPoP proofs (JWE) are not accepted")


def test_two_proofs_are_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW)
    refused(f"{proof},{proof}", "the DPoP proof is not a compact JWS")
    refused(f"{proof} {proof}", "the DPoP proof is not a compact JWS")


def test_an_oversized_proof_is_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims={"pad": "x" * 9000})
    refused(proof, "the DPoP proof is too large")
    assert check(proof, max_bytes=20_000).jkt == key.thumbprint


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "dpop", "dpop+jwt "])
def test_typ_other_than_dpop_jwt_is_refused(key: DPoPKey, typ: str) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW, typ=typ), "the DPoP proof typ is not dpop+jwt")


def test_missing_typ_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW, omit=("typ",)), "the DPoP proof typ is not dpop+jwt")


def test_alg_none_is_refused_even_when_configured(key: DPoPKey) -> None:
    proof = unsigned_proof(key, "GET", URL, TOKEN, iat=NOW)
    refused(proof, "the DPoP proof algorithm is not allowed", algorithms=ALGORITHMS | {"none"})


def test_hs256_is_refused_even_when_configured() -> None:
    proof = hmac_proof("GET", URL, TOKEN)
    refused(proof, "the DPoP proof algorithm is not allowed", algorithms=ALGORITHMS | {"HS256"})


def test_an_algorithm_not_configured_is_refused(rsa_key: DPoPKey) -> None:
    proof = rsa_key.proof("GET", URL, TOKEN, iat=NOW)
    refused(proof, "the DPoP proof algorithm is not allowed", algorithms=frozenset({"ES256"}))


def test_missing_alg_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW, omit=("alg",)), "the DPoP proof algorithm is not allowed")


def test_crit_is_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_header={"crit": ["exp"], "exp": 1})
    refused(proof, "the DPoP proof requires an unsupported critical header extension")


def test_b64_is_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_header={"b64": False, "crit": ["b64"]})
    refused(proof, "the DPoP proof b64 header parameter of RFC 7797 is not supported")


@pytest.mark.parametrize("jwk", [None, "a-key", ["kty", "EC"], 5])
def test_a_header_without_a_jwk_object_is_refused(key: DPoPKey, jwk: object) -> None:
    extra = {} if jwk is None else {"jwk": jwk}
    omit = ("jwk",) if jwk is None else ()
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_header=extra, omit=omit)
    refused(proof, "the DPoP proof header has no jwk object")


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_a_private_key_in_the_jwk_is_refused(alg: str) -> None:
    client = DPoPKey(alg)
    proof = client.proof("GET", URL, TOKEN, iat=NOW, extra_header={"jwk": client.private_jwk})
    refused(proof, "the DPoP proof jwk holds private key material")


def test_a_symmetric_jwk_is_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_header={"jwk": {"kty": "oct", "x": "AAAA"}})
    refused(proof, "the DPoP proof jwk is a symmetric key")


def test_an_rsa_key_of_1024_bits_is_refused() -> None:
    client = DPoPKey("RS256", rsa_bits=1024)
    refused(
        client.proof("GET", URL, TOKEN, iat=NOW), "the DPoP proof jwk is an RSA key shorter than 2048 bits"
    )


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},  # not a point on the curve
        {"kty": "EC", "crv": "secp256k1", "x": "AAAA", "y": "AAAA"},
        {"kty": "EC", "crv": "P-256", "x": 1, "y": 2},
        {"kty": "RSA", "n": "!!!!", "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA"},
        {"kty": "XYZ"},
        {},
    ],
)
def test_a_jwk_that_is_no_usable_public_key_is_refused(key: DPoPKey, jwk: dict[str, object]) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_header={"jwk": jwk})
    refused(proof, "the DPoP proof jwk is not a usable public key")


def test_es256_with_a_p384_key_is_refused() -> None:
    client = DPoPKey("ES384")
    refused(client.proof("GET", URL, TOKEN, iat=NOW, alg="ES256"), "the DPoP proof jwk does not fit its alg")


def test_rs256_with_an_ec_key_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW, alg="RS256"), "the DPoP proof jwk does not fit its alg")


def test_a_jwk_of_another_key_is_refused(key: DPoPKey) -> None:
    proof = foreign_jwk_proof(key, DPoPKey(), "GET", URL, TOKEN)
    refused(proof, "the DPoP proof signature is invalid")


def test_a_tampered_claim_breaks_the_signature(key: DPoPKey) -> None:
    header, _, signature = key.proof("GET", URL, TOKEN, iat=NOW).split(".")
    forged = key.claims("GET", URL, TOKEN, iat=NOW)
    refused(
        f"{header}.{compact({}, forged).split('.')[1]}.{signature}", "the DPoP proof signature is invalid"
    )


def test_an_empty_signature_is_refused(key: DPoPKey) -> None:
    head, payload, _ = key.proof("GET", URL, TOKEN, iat=NOW).split(".")
    refused(f"{head}.{payload}.", "the DPoP proof signature is invalid")


@pytest.mark.parametrize("jti", [None, "", 5, ["a"]])
def test_a_missing_or_empty_jti_is_refused(key: DPoPKey, jti: object) -> None:
    omit = ("jti",) if jti is None else ()
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims={} if jti is None else {"jti": jti}, omit=omit)
    refused(proof, "the DPoP proof jti is missing or not a string")


def test_an_over_long_jti_is_refused(key: DPoPKey) -> None:
    check(key.proof("GET", URL, TOKEN, iat=NOW, jti="j" * 256))
    refused(key.proof("GET", URL, TOKEN, iat=NOW, jti="j" * 257), "the DPoP proof jti is too long")


@pytest.mark.parametrize("htm", ["POST", "get", "GET ", None])
def test_a_wrong_htm_is_refused(key: DPoPKey, htm: str | None) -> None:
    omit = ("htm",) if htm is None else ()
    proof = key.proof(htm or "GET", URL, TOKEN, iat=NOW, omit=omit)
    refused(proof, "the DPoP proof htm does not match the request method")


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example.com/orders/43",
        "https://api.example.com/orders/42/",
        "https://api.example.com/Orders/42",
        "https://evil.example.com/orders/42",
        "https://api.example.com:8443/orders/42",
        "http://api.example.com/orders/42",
        "/orders/42",
        "https://user@api.example.com/orders/42",
    ],
)
def test_a_wrong_htu_is_refused(key: DPoPKey, htu: str) -> None:
    refused(key.proof("GET", htu, TOKEN, iat=NOW), "the DPoP proof htu does not match the request URL")


def test_a_request_url_that_is_not_absolute_matches_nothing(key: DPoPKey) -> None:
    refused(
        key.proof("GET", URL, TOKEN, iat=NOW), "the DPoP proof htu does not match the request URL", url="/x"
    )


@pytest.mark.parametrize("htu", [None, 5, ["https://api.example.com/orders/42"]])
def test_a_missing_htu_is_refused(key: DPoPKey, htu: object) -> None:
    omit = ("htu",) if htu is None else ()
    extra = {} if htu is None else {"htu": htu}
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims=extra, omit=omit)
    refused(proof, "the DPoP proof htu is missing or not a string")


def test_a_stale_iat_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW - MAX_AGE - 1), "the DPoP proof is too old")


def test_a_future_iat_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, TOKEN, iat=NOW + MAX_AGE + 1), "the DPoP proof iat is in the future")


@pytest.mark.parametrize("iat", [None, True, "1800000000", [NOW]])
def test_an_iat_that_is_not_a_number_is_refused(key: DPoPKey, iat: object) -> None:
    omit = ("iat",) if iat is None else ()
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims={} if iat is None else {"iat": iat}, omit=omit)
    refused(proof, "the DPoP proof iat is missing or not a number")


def test_a_missing_ath_is_refused(key: DPoPKey) -> None:
    refused(key.proof("GET", URL, None, iat=NOW), "the DPoP proof has no ath")


@pytest.mark.parametrize("ath", [access_token_hash("another-token"), "", 5, "\u00e9" * 43, TOKEN])
def test_an_ath_mismatch_is_refused(key: DPoPKey, ath: object) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims={"ath": ath})
    refused(proof, "the DPoP proof ath does not match the access token")


def test_a_non_ascii_access_token_matches_no_ath(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW)
    refused(proof, "the DPoP proof ath does not match the access token", access_token="t\u00e9")


def test_a_nonce_that_is_not_a_string_is_refused(key: DPoPKey) -> None:
    proof = key.proof("GET", URL, TOKEN, iat=NOW, extra_claims={"nonce": 5})
    refused(proof, "the DPoP proof nonce is not a string")


def test_the_signature_is_checked_before_the_claims(key: DPoPKey) -> None:
    proof = foreign_jwk_proof(key, DPoPKey(), "POST", "https://evil.example/", "other")
    refused(proof, "the DPoP proof signature is invalid")


# ---------------------------------------------------------------- garbage never escapes as another error


def _segment(value: object) -> str:
    return b64url(json.dumps(value).encode())


@pytest.mark.parametrize(
    "proof",
    [
        "",
        ".",
        "..",
        "a.b",
        "a.b.c.d",
        "!!!.!!!.!!!",
        "\u00e9.\u00e9.\u00e9",
        "\x00.\x00.\x00",
        f"{_segment([])}.{_segment({})}.",
        f"{_segment('dpop+jwt')}.{_segment({})}.",
        f"{_segment({'typ': 'dpop+jwt'})}.{_segment([1])}.",
        f"{_segment({'typ': 'dpop+jwt'})}.eyJ.AAAA",
        f"{b64url(b'{')}.{_segment({})}.",
        b64url(b'{"a":1,"a":2}') + "." + _segment({}) + ".",
        b64url(b'{"a":NaN}') + "." + _segment({}) + ".",
        f"{b64url(bytes([0xFF, 0xFE]))}.{_segment({})}.",
        f"{_segment({'typ': 'dpop+jwt', 'alg': 'ES256', 'jwk': {'kty': 'EC'}})}.{_segment({})}.A",
        f"{_segment({'typ': 'dpop+jwt', 'alg': 'ES256', 'jwk': {'kty': 'RSA', 'n': 5}})}.{_segment({})}.",
        f"{_segment({'typ': ['dpop+jwt'], 'alg': {'a': 1}})}.{_segment({})}.",
        "a" * 10_000,
    ],
)
def test_garbage_is_an_invalid_proof(proof: str) -> None:
    with pytest.raises(errors.InvalidDPoPProof):
        check(proof)


def test_mutated_proofs_are_invalid_proofs_and_nothing_else(key: DPoPKey, rsa_key: DPoPKey) -> None:
    rng = random.Random(9449)  # noqa: S311 (a reproducible fuzz, not a secret)
    alphabet = "ABCabc019-_.=+/ \u00e9{}\"'"
    for client in (key, rsa_key):
        proof = client.proof("GET", URL, TOKEN, iat=NOW)
        for _ in range(400):
            chars = list(proof)
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(chars))
                action = rng.random()
                if action < 0.6:
                    chars[position] = rng.choice(alphabet)
                elif action < 0.8:
                    del chars[position]
                else:
                    chars.insert(position, rng.choice(alphabet))
            mutated = "".join(chars)
            if mutated == proof:
                continue
            try:
                check(mutated)
            except errors.InvalidDPoPProof:
                continue


def test_structured_garbage_in_the_header_and_claims(key: DPoPKey) -> None:
    values: list[object] = [None, True, 0, -1, 1.5, 10**19, "", "x", [], {}, [None], {"a": {}}]
    names = ("typ", "alg", "jwk", "crit", "jti", "htm", "htu", "iat", "ath", "nonce")
    for name in names:
        for value in values:
            for part in ("header", "claims"):
                extra = {name: value}
                proof = key.proof(
                    "GET",
                    URL,
                    TOKEN,
                    iat=NOW,
                    extra_header=extra if part == "header" else None,
                    extra_claims=extra if part == "claims" else None,
                )
                with contextlib.suppress(errors.InvalidDPoPProof):
                    check(proof)
    # A jwk whose members are each of those values.
    for member in ("kty", "crv", "x", "y", "n", "e", "use", "key_ops", "alg", "kid"):
        for value in values:
            jwk = {**key.public_jwk, member: value}
            header = {**key.header(), "jwk": jwk}
            with contextlib.suppress(errors.InvalidDPoPProof):
                check(sign(header, key.claims("GET", URL, TOKEN, iat=NOW), key.private_key, "ES256"))


def test_descriptions_carry_no_request_or_token_content(key: DPoPKey) -> None:
    secret_token = "SECRET-TOKEN-CONTENT"
    proof = key.proof("GET", "https://secret.example/path", "other", iat=NOW, jti="SECRET-JTI")
    for overrides in ({"access_token": secret_token}, {"url": "https://secret.example/path"}, {}):
        with pytest.raises(errors.InvalidDPoPProof) as caught:
            check(proof, **overrides)
        assert "SECRET" not in str(caught.value) and "secret" not in str(caught.value)


# ---------------------------------------------------------------- replay cache


def proof_of(jti: str, jkt: str = "jkt-1") -> Proof:
    return Proof(jkt=jkt, jti=jti, iat=NOW, nonce=None)


def test_replay_key_is_a_digest_scoped_by_key() -> None:
    key = replay_key(proof_of("jti-1"))
    assert len(key) == 64 and "jti-1" not in key
    assert key == replay_key(proof_of("jti-1"))
    assert key != replay_key(proof_of("jti-1", jkt="jkt-2"))
    assert key != replay_key(proof_of("jti-2"))
    # The parts are kept apart: no concatenation gives the same key.
    assert replay_key(Proof("b,c", "d", NOW, None)) != replay_key(Proof("b", "c,d", NOW, None))


def test_replay_ttl_covers_the_rest_of_the_iat_window() -> None:
    assert (
        replay_ttl_seconds(Proof("j", "k", NOW + MAX_AGE, None), now=NOW, max_age_seconds=MAX_AGE)
        >= 2 * MAX_AGE
    )
    assert replay_ttl_seconds(Proof("j", "k", NOW - MAX_AGE, None), now=NOW, max_age_seconds=MAX_AGE) > 0


def test_first_use_then_replay() -> None:
    cache = ReplayCache()
    assert cache.first_use("a", NOW, 60)
    assert not cache.first_use("a", NOW + 1, 60)
    assert not cache.first_use("a", NOW + 59.9, 60)
    assert cache.first_use("b", NOW + 1, 60)


def test_an_entry_expires_after_its_ttl() -> None:
    cache = ReplayCache()
    assert cache.first_use("a", NOW, 60)
    assert cache.first_use("a", NOW + 60, 60)
    assert not cache.first_use("a", NOW + 61, 60)


def test_expired_entries_are_pruned() -> None:
    cache = ReplayCache()
    for index in range(100):
        assert cache.first_use(f"k{index}", NOW, 10)
    assert len(cache) == 100
    assert cache.first_use("late", NOW + 11, 10)
    assert len(cache) == 1


def test_a_full_cache_evicts_the_largest_holders_oldest() -> None:
    cache = ReplayCache(max_entries=4)
    assert cache.first_use("victim-proof", NOW, 60, holder="victim")
    for i in range(6):  # a flood of fresh proofs of one key
        assert cache.first_use(f"flood-{i}", NOW, 60, holder="attacker")
    assert len(cache) == 4
    assert not cache.first_use("victim-proof", NOW + 1, 60, holder="victim")  # still refused
    assert cache.first_use("flood-0", NOW + 1, 60, holder="attacker")  # only the flooder forgets
    assert cache.first_use("late", NOW + 61, 60, holder="victim")
    assert cache.first_use("later", NOW + 61, 60, holder="third")  # full: the expired ones go first
    assert len(cache) == 2


def test_the_replay_window_is_the_narrowest_since_a_proofs_iat() -> None:
    cache = ReplayCache()
    cache.note_window(60, NOW)
    assert cache.window_since(NOW - 50) == 60
    cache.note_window(600, NOW + 15)  # a reload widens it
    assert cache.window_since(NOW - 50) == 60  # seen before the reload: remembered for 60 s only
    assert cache.window_since(NOW + 20) == 600
    cache.note_window(30, NOW + 30)
    assert cache.window_since(NOW + 20) == 30


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ReplayCache(max_entries=0)


def test_concurrent_first_use_admits_each_key_once() -> None:
    cache = ReplayCache(max_entries=10_000)
    admitted: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for index in range(500):
            key = f"k{index}"
            if cache.first_use(key, NOW, 60):
                with lock:
                    admitted.append(key)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(admitted) == sorted(f"k{index}" for index in range(500))


class _FailingClient:
    def __init__(self, failure: Callable[[], object]) -> None:
        self._failure = failure

    def set(self, name: str, value: str, *, nx: bool, px: int) -> object:
        return self._failure()


async def test_redis_replay_cache_errors_are_unavailable() -> None:
    def fail() -> object:
        raise ConnectionError("refused")

    with pytest.raises(ReplayCacheUnavailable):
        await RedisReplayCache(_FailingClient(fail)).first_use("k", NOW, 60)


async def test_redis_replay_cache_timeout_is_unavailable() -> None:
    async def hang() -> object:
        await asyncio.sleep(10)
        return True

    with pytest.raises(ReplayCacheUnavailable):
        await RedisReplayCache(_FailingClient(hang), timeout_seconds=0.05).first_use("k", NOW, 60)


# ---------------------------------------------------------------- server nonces


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


SECRET = b"nonce-secret-0123456789abcdef"


def test_the_current_nonce_is_valid() -> None:
    clock = _Clock(NOW)
    issuer = NonceIssuer(SECRET, 30, clock)
    nonce = issuer.current()
    assert issuer.valid(nonce)
    assert nonce == issuer.current()
    assert all(c.isalnum() or c in "-_" for c in nonce)


def test_a_nonce_of_the_previous_bucket_is_valid_and_older_ones_are_not() -> None:
    clock = _Clock(NOW)
    issuer = NonceIssuer(SECRET, 30, clock)
    nonce = issuer.current()
    clock.now = NOW + 30
    assert issuer.current() != nonce
    assert issuer.valid(nonce)
    clock.now = NOW + 60
    assert not issuer.valid(nonce)
    clock.now = NOW - 30  # a nonce from the future (a replica's clock ahead) is not taken either
    assert not issuer.valid(nonce)


def test_replicas_sharing_the_secret_accept_each_others_nonces() -> None:
    clock = _Clock(NOW)
    assert NonceIssuer(SECRET, 30, clock).valid(NonceIssuer(SECRET, 30, clock).current())


def test_a_nonce_of_another_secret_is_invalid() -> None:
    clock = _Clock(NOW)
    nonce = NonceIssuer(b"another-secret-0123456789abcdef", 30, clock).current()
    assert not NonceIssuer(SECRET, 30, clock).valid(nonce)


def test_a_tampered_nonce_is_invalid() -> None:
    clock = _Clock(NOW)
    issuer = NonceIssuer(SECRET, 30, clock)
    raw = bytearray(base64.urlsafe_b64decode(issuer.current() + "=="))
    raw[-1] ^= 1
    assert not issuer.valid(b64url(bytes(raw)))
    # The previous bucket's number with the current bucket's MAC.
    raw = bytearray(base64.urlsafe_b64decode(issuer.current() + "=="))
    raw[7] ^= 1
    assert not issuer.valid(b64url(bytes(raw)))


@pytest.mark.parametrize(
    "nonce", ["", "x", "=" * 54, "A" * 54, "\u00e9" * 54, "A" * 53 + "=", "A" * 1000, None, 5, b"bytes"]
)
def test_garbage_nonces_are_invalid(nonce: Any) -> None:
    assert not NonceIssuer(SECRET, 30, _Clock(NOW)).valid(nonce)


def test_a_nonce_with_another_spelling_is_invalid() -> None:
    issuer = NonceIssuer(SECRET, 30, _Clock(NOW))
    nonce = issuer.current()
    assert not issuer.valid(nonce + "=")
    assert not issuer.valid(nonce.replace("-", "+").replace("_", "/"))


def test_nonce_issuer_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="secret"):
        NonceIssuer(b"short", 30, _Clock(NOW))
    with pytest.raises(ValueError, match="lifetime"):
        NonceIssuer(SECRET, 0, _Clock(NOW))


@pytest.mark.parametrize(
    ("htu", "request_url"),
    [
        ("https://api.example.com/%6Frders", "https://api.example.com/orders"),  # unreserved escape
        ("https://api.example.com/a/../orders", "https://api.example.com/orders"),  # Envoy's normalize_path
        ("https://api.example.com/./orders", "https://api.example.com/orders"),
        ("https://api.example.com/a%2fb", "https://api.example.com/a%2Fb"),  # escape hex case
    ],
)
def test_htu_paths_compare_after_rfc3986_normalisation(htu: str, request_url: str) -> None:
    assert normalise_htu(htu) == normalise_htu(request_url)


@pytest.mark.parametrize(
    ("htu", "request_url"),
    [
        ("https://api.example.com/a%2Fb", "https://api.example.com/a/b"),  # an encoded slash is data
        ("https://api.example.com/orders/", "https://api.example.com/orders"),
        ("https://api.example.com//orders", "https://api.example.com/orders"),  # RFC 3986 keeps "//"
    ],
)
def test_htu_paths_that_stay_different(htu: str, request_url: str) -> None:
    assert normalise_htu(htu) != normalise_htu(request_url)
