"""JWKS parsing: one odd key never takes a provider down (the rest of its set stays usable), no
key costs more than a normal one to parse, and nothing but JWKSError ever comes out of
parse_jwks, for any JSON document (hypothesis)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_authz.keys.fetch import FetchError, decode_json
from ext_authz.keys.jwks import JWKSError, KeySet, parse_jwks
from tests.support.idp import b64url, public_jwk
from tests.support.keys_fetch import IDP_KEY_SETS, idp_jwks, rsa_key
from tests.support.tokens import Keys

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def uint(value: int) -> str:
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def ec_jwk(keys: Keys) -> dict[str, Any]:
    return {k: v for k, v in keys.ec.jwk().items() if k != "kid"} | {"kid": "odd"}


def rsa_jwk(keys: Keys) -> dict[str, Any]:
    return {k: v for k, v in keys.rsa.jwk().items() if k != "kid"} | {"kid": "odd"}


def ed_jwk(keys: Keys) -> dict[str, Any]:
    return {k: v for k, v in keys.ed.jwk().items() if k != "kid"} | {"kid": "odd"}


# Each: a function of the good keys giving one unusable JWK (derived from a good one, so that
# only the named defect makes it unusable).
ODD_KEYS: dict[str, Any] = {
    "ec-unknown-curve-P-999": lambda k: ec_jwk(k) | {"crv": "P-999"},
    "ec-curve-not-a-string": lambda k: ec_jwk(k) | {"crv": 256},
    "ec-no-curve": lambda k: {m: v for m, v in ec_jwk(k).items() if m != "crv"},
    "ec-secp256k1": lambda k: ec_jwk(k) | {"crv": "secp256k1"},
    "ec-no-x": lambda k: {m: v for m, v in ec_jwk(k).items() if m != "x"},
    "ec-no-y": lambda k: {m: v for m, v in ec_jwk(k).items() if m != "y"},
    "ec-x-bad-base64": lambda k: ec_jwk(k) | {"x": "!!!not*base64!!!"},
    "ec-x-number": lambda k: ec_jwk(k) | {"x": 12345},
    "ec-x-list": lambda k: ec_jwk(k) | {"x": [ec_jwk(k)["x"]]},
    "ec-x-too-short": lambda k: ec_jwk(k) | {"x": ec_jwk(k)["x"][:20]},
    "ec-x-1MB": lambda k: ec_jwk(k) | {"x": "A" * 1_000_000},
    "ec-point-not-on-curve": lambda k: ec_jwk(k) | {"y": ec_jwk(k)["x"]},
    "ec-with-rsa-alg": lambda k: ec_jwk(k) | {"alg": "RS256"},
    "rsa-no-n": lambda k: {m: v for m, v in rsa_jwk(k).items() if m != "n"},
    "rsa-no-e": lambda k: {m: v for m, v in rsa_jwk(k).items() if m != "e"},
    "rsa-n-number": lambda k: rsa_jwk(k) | {"n": 2**2048 + 1},
    "rsa-n-null": lambda k: rsa_jwk(k) | {"n": None},
    "rsa-n-bad-base64": lambda k: rsa_jwk(k) | {"n": "+/" * 200},
    # 4k+1 base64url characters cannot be the encoding of any bytes (RFC 4648 §4).
    "rsa-n-impossible-length": lambda k: rsa_jwk(k) | {"n": rsa_jwk(k)["n"][:341]},
    "rsa-n-1MB": lambda k: rsa_jwk(k) | {"n": "_" * 1_000_000},
    "rsa-n-16385-bits": lambda k: rsa_jwk(k) | {"n": uint(2**16384 + 1)},
    "rsa-n-1024-bits": lambda k: rsa_jwk(k) | {"n": uint(2**1023 + 1)},
    "rsa-e-even": lambda k: rsa_jwk(k) | {"e": uint(65536)},
    "rsa-e-1": lambda k: rsa_jwk(k) | {"e": uint(1)},
    "rsa-e-huge": lambda k: rsa_jwk(k) | {"e": uint(2**65 + 1)},
    "rsa-e-2048-bits": lambda k: rsa_jwk(k) | {"e": uint(2**2047 + 1)},
    "rsa-e-empty": lambda k: rsa_jwk(k) | {"e": ""},
    "rsa-private-d": lambda k: rsa_jwk(k) | {"d": "AQAB"},
    "okp-x25519": lambda k: ed_jwk(k) | {"crv": "X25519"},
    "okp-unknown-curve": lambda k: ed_jwk(k) | {"crv": "P-999"},
    "okp-no-x": lambda k: {m: v for m, v in ed_jwk(k).items() if m != "x"},
    "okp-x-wrong-length": lambda k: ed_jwk(k) | {"x": ed_jwk(k)["x"][:-4]},
    "kty-oct": lambda k: {"kty": "oct", "k": "c2VjcmV0", "kid": "odd"},
    "kty-unknown": lambda k: rsa_jwk(k) | {"kty": "RSA-PSS"},
    "kty-list": lambda k: rsa_jwk(k) | {"kty": ["RSA"]},
    "kty-object": lambda k: rsa_jwk(k) | {"kty": {"RSA": True}},
    "kty-missing": lambda k: {m: v for m, v in rsa_jwk(k).items() if m != "kty"},
    "kid-number": lambda k: rsa_jwk(k) | {"kid": 7},
    "kid-list": lambda k: rsa_jwk(k) | {"kid": ["odd"]},
    "alg-list": lambda k: rsa_jwk(k) | {"alg": ["RS256"]},
    "alg-object": lambda k: rsa_jwk(k) | {"alg": {"RS256": 1}},
    "alg-number": lambda k: rsa_jwk(k) | {"alg": 256},
    "alg-none": lambda k: rsa_jwk(k) | {"alg": "none"},
    "alg-HS256": lambda k: rsa_jwk(k) | {"alg": "HS256"},
    "alg-RSA-OAEP": lambda k: rsa_jwk(k) | {"alg": "RSA-OAEP"},
    "use-enc": lambda k: rsa_jwk(k) | {"use": "enc"},
    "use-list": lambda k: rsa_jwk(k) | {"use": ["sig"]},
    "key-ops-without-verify": lambda k: (
        {m: v for m, v in rsa_jwk(k).items() if m != "use"} | {"key_ops": ["encrypt", "wrapKey"]}
    ),
    "key-ops-a-string": lambda k: {m: v for m, v in rsa_jwk(k).items() if m != "use"} | {"key_ops": "verify"},
    "not-an-object-list": lambda k: [rsa_jwk(k)],
    "not-an-object-string": lambda k: "RSA",
    "not-an-object-null": lambda k: None,
}


def good_fingerprints(keys: Keys) -> list[bytes]:
    return [k.fingerprint for k in parse_jwks(keys.jwks()).keys]


@pytest.mark.parametrize("odd", list(ODD_KEYS))
def test_one_odd_key_is_skipped_and_the_others_kept(keys: Keys, odd: str) -> None:
    odd_key = ODD_KEYS[odd](keys)
    assert len(parse_jwks({"keys": [odd_key]})) == 0
    good = keys.jwks()["keys"]
    mixed = parse_jwks({"keys": [good[0], odd_key, *good[1:]]})
    assert [k.fingerprint for k in mixed.keys] == good_fingerprints(keys)
    assert "odd" not in [k.kid for k in mixed.keys]


@pytest.mark.parametrize(
    "odd", ["rsa-n-1MB", "rsa-n-16385-bits", "rsa-e-2048-bits", "ec-x-1MB", "rsa-n-bad-base64"]
)
def test_an_absurd_key_costs_no_more_than_a_normal_one(keys: Keys, odd: str) -> None:
    document = {"keys": [ODD_KEYS[odd](keys)] * 20}  # 20 MB of modulus, say
    started = time.process_time()
    assert len(parse_jwks(document)) == 0
    assert time.process_time() - started < 0.2


def test_the_same_key_twice_is_one_key_with_both_entries_algorithms(keys: Keys) -> None:
    rs256 = keys.rsa.jwk()
    ps256 = rs256 | {"alg": "PS256"}
    key_set = parse_jwks({"keys": [rs256, keys.ec.jwk(), ps256, rs256]})
    assert [k.kid for k in key_set.keys] == ["rsa-1", "ec-1"]
    assert key_set.keys[0].algorithms == {"RS256", "PS256"}
    assert len(key_set.candidates("rsa-1", "PS256")) == 1
    # Different key material under one kid stays two keys: a token naming that kid is ambiguous.
    impostor = keys.other_rsa.jwk()
    assert len(parse_jwks({"keys": [rs256, impostor]}).candidates("rsa-1", "RS256")) == 2


def test_a_jwk_with_a_repeated_member_is_skipped(keys: Keys) -> None:
    rsa_text = json.dumps(keys.rsa.jwk())
    other_n = keys.other_rsa.jwk()["n"]
    repeated = rsa_text[:-1] + f', "n": "{other_n}"}}'  # which n is the key?
    document = decode_json(f'{{"keys": [{repeated}, {json.dumps(keys.ec.jwk())}]}}'.encode())
    assert [k.kid for k in parse_jwks(document).keys] == ["ec-1"]
    # The decision survives the shared cache's JSON round trip.
    assert [k.kid for k in parse_jwks(json.loads(json.dumps(document))).keys] == ["ec-1"]
    with pytest.raises(JWKSError):
        parse_jwks(decode_json(b'{"keys": [], "keys": []}'))


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"\xff\xfe{", b'{"keys": ['],
    ids=["deep-array", "deep-object", "bad-utf16", "truncated"],
)
def test_json_too_deep_or_not_json_is_a_fetch_error(body: bytes) -> None:
    with pytest.raises(FetchError) as caught:
        decode_json(body)
    assert caught.value.outcome == "invalid"


@pytest.mark.parametrize("body", [b"1e999999", b"NaN", b'"keys"', b'{"keys": {}}', b"[[1, 2]]"])
def test_json_that_is_not_a_jwks_is_a_jwks_error(body: bytes) -> None:
    with pytest.raises(JWKSError):
        parse_jwks(decode_json(body))


@pytest.mark.parametrize("idp", list(IDP_KEY_SETS))
def test_real_idp_key_sets_give_their_signature_keys(idp: str) -> None:
    expected = idp_jwks(idp)
    key_set = parse_jwks(json.loads(json.dumps(expected.document)))
    assert sorted(k.kid or "" for k in key_set.keys) == sorted(expected.signing)
    for key in key_set.keys:
        assert key.kid is not None
        private = expected.signing[key.kid]
        assert key.key.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]
        assert "RS256" in key.algorithms
    for kid in expected.skipped:
        assert not key_set.candidates(kid, "RS256")


# ---- properties ----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# Members of real keys, so that examples also reach the key constructors with valid parts.
_REAL = [
    public_jwk(rsa_key("hypothesis").public_key(), kid="r", alg="RS256"),
    public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), kid="e", alg="ES256"),
    public_jwk(ed25519.Ed25519PrivateKey.generate().public_key(), kid="o", alg="EdDSA"),
]
member_values = (
    json_values
    | st.binary(min_size=0, max_size=300).map(b64url)  # base64url of random bytes, any length
    | st.sampled_from(["AQAB", "AQ", "", "=", "A", "AAAA====", "_-_-", "P-256", "Ed25519"])
    | st.sampled_from([jwk[m] for jwk in _REAL for m in ("n", "e", "x", "y") if m in jwk])
)
jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "kty": st.sampled_from(["RSA", "EC", "OKP", "oct", "RSA-PSS", ""]) | json_values,
        "crv": st.sampled_from(["P-256", "P-384", "P-521", "Ed25519", "Ed448", "X25519", "P-999"])
        | json_values,
        "n": member_values,
        "e": member_values,
        "x": member_values,
        "y": member_values,
        "d": member_values,
        "kid": st.text(max_size=10) | json_values,
        "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "PS512", "HS256", "none", "RSA-OAEP"])
        | json_values,
        "use": st.sampled_from(["sig", "enc"]) | json_values,
        "key_ops": st.lists(st.sampled_from(["verify", "sign", "encrypt"])) | json_values,
        "x5c": json_values,
    },
).flatmap(
    lambda jwk: st.dictionaries(st.text(max_size=6), json_values, max_size=3).map(lambda extra: extra | jwk)
)


def assert_key_set_or_jwks_error(document: object) -> KeySet | None:
    try:
        result = parse_jwks(document)
    except JWKSError:
        return None
    assert isinstance(result, KeySet)
    return result


@PROPERTY
@given(json_values)
def test_any_json_document_gives_a_key_set_or_jwks_error(document: object) -> None:
    assert_key_set_or_jwks_error(document)


@PROPERTY
@given(
    st.lists(json_values | jwk_like, max_size=6),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)
def test_any_keys_array_gives_a_key_set(keys_array: list[object], extra: dict[str, object]) -> None:
    result = assert_key_set_or_jwks_error(extra | {"keys": keys_array})
    assert result is not None  # an object with a keys array is a JWKS, whatever is inside


@PROPERTY
@given(st.lists(jwk_like, max_size=5), st.integers(min_value=0, max_value=5))
def test_odd_keys_never_hide_a_good_key(keys: Keys, odd: list[object], position: int) -> None:
    good = keys.rsa.jwk()
    members = [*odd[:position], good, *odd[position:]]
    result = parse_jwks({"keys": members})
    assert keys.rsa.kid in [k.kid for k in result.keys]
