"""The attack corpus (issue 5): known JWT and request attacks, each through the whole Check path.

Every case builds the CheckRequest protobuf Envoy would send, runs it through
``AuthorizationServicer(pipeline).Check`` and asserts a clean denial: the HTTP status, the RFC 6750
error code in ``WWW-Authenticate`` (none when the request carried no credentials, §3.1), the
stable denial code in ``CheckResponse.status.message``, a JSON body, and neither the token nor its
signature echoed anywhere. Never an exception (the servicer would answer 500), never OK.

Claim-level cases are signed with the issuer's real key on purpose: a forged signature would be
rejected before any claim is read, so only a genuine signature tests the claim checks themselves.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ext_authz import errors, jws
from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2
from ext_authz.compiled import compile
from ext_authz.identity import parse_token
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from ext_authz.transport.servicer import AuthorizationServicer
from tests.support.attacks import (
    ABSENT,
    OWNED,
    OWNED_SPELLINGS,
    P256_ORDER,
    CheckRequest,
    Forge,
    assert_denied,
    assert_well_formed,
    bearer,
    build_servicer,
    challenge_params,
    check,
    check_request,
    jwe_token,
    nested_token,
    response_headers,
    unencoded_payload_token,
)
from tests.support.idp import SigningKey, b64url_decode
from tests.support.tokens import ISSUER, NOW, Keys, claims, clock, make_settings


@pytest.fixture
def servicer(keys: Keys) -> AuthorizationServicer:
    return build_servicer(keys)


@pytest.fixture(scope="session")
def forge(keys: Keys) -> Forge:
    return Forge(keys)


# ---- the corpus ----

Make = Callable[[Forge], "str | CheckRequest"]
INVALID = "invalid_token"
INVALID_REQUEST = "invalid_request"


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    make: Make  # a token (sent as "Authorization: Bearer <token>") or a whole CheckRequest
    status: int
    error: str | None  # the RFC 6750 error code in WWW-Authenticate (None: no error attribute)
    code: str | None  # the stable denial code (None: any, when the reason may legitimately vary)


def _case(id: str, make: Make, code: str | None, status: int = 401, error: str | None = INVALID) -> Case:
    return Case(id, make, status, error, code)


def _claims_json(**replacements: str) -> str:
    """The default claims as JSON text, with members replaced by raw JSON text (e.g. 1e400)."""
    text = json.dumps(claims())
    for name, raw in replacements.items():
        if name in claims():
            text = re.sub(rf'"{name}": [^,}}]+', f'"{name}": {raw}'.replace("\\", "\\\\"), text)
        else:
            text = text[:-1] + f', "{name}": {raw}}}'
    return text


def _header_json(**replacements: str) -> str:
    return (
        json.dumps({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"})[:-1]
        + "".join(f', "{k}": {v}' for k, v in replacements.items())
        + "}"
    )


def _pad_to(f: Forge, size: int) -> str:
    token = f.token(pad="")
    return f.token(pad="x" * (size - len(token)))


def _none_with_real_signature(f: Forge) -> str:
    """alg none, yet carrying the issuer's genuine RS256 signature of exactly these bytes."""
    header = json.dumps({"alg": "none", "kid": "rsa-1"}).encode()
    return jws.sign(header, json.dumps(f.claims()).encode(), f.keys.rsa.private_key, "RS256")


def _unsigned(alg: str, signature: bytes) -> Make:
    return lambda f: f.unsigned({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, signature)


def _confusion(alg: str) -> Make:
    return lambda f: f.hmac(alg, f.public_pem(f.keys.rsa))


ALG_CASES = [
    _case(f"alg-{alg}-{name}", _unsigned(alg, signature), "algorithm_not_allowed")
    for alg in ("none", "None", "NONE", "nOnE")
    for name, signature in (("no-signature", b""), ("with-signature", b"\x00" * 256))
] + [
    _case(
        "alg-none-with-real-rs256-signature", lambda f: _none_with_real_signature(f), "algorithm_not_allowed"
    ),
    _case("alg-missing", lambda f: f.unsigned({"typ": "JWT", "kid": "rsa-1"}, b"x"), "algorithm_not_allowed"),
    _case("alg-empty", lambda f: f.token(header={"alg": ""}), "algorithm_not_allowed"),
    _case(
        "alg-lower-case",
        lambda f: f.raw(_header_json().replace("RS256", "rs256"), json.dumps(claims())),
        "algorithm_not_allowed",
    ),
    _case(
        "alg-trailing-space",
        lambda f: f.raw(_header_json().replace("RS256", "RS256 "), json.dumps(claims())),
        "algorithm_not_allowed",
    ),
    _case(
        "alg-not-a-string",
        lambda f: f.raw(_header_json().replace('"RS256"', '["RS256"]'), json.dumps(claims())),
        "algorithm_not_allowed",
    ),
    _case(
        "alg-null",
        lambda f: f.raw(_header_json().replace('"RS256"', "null"), json.dumps(claims())),
        "algorithm_not_allowed",
    ),
]

CONFUSION_CASES = [
    _case(f"{alg}-keyed-with-rsa-public-pem", _confusion(alg), "algorithm_not_allowed")
    for alg in ("HS256", "HS384", "HS512")
] + [
    _case(
        "HS256-keyed-with-pem-without-newline",
        lambda f: f.hmac("HS256", f.public_pem(f.keys.rsa).strip()),
        "algorithm_not_allowed",
    ),
    _case(
        "HS256-keyed-with-rsa-public-der",
        lambda f: f.hmac("HS256", f.public_der(f.keys.rsa)),
        "algorithm_not_allowed",
    ),
    _case(
        "HS256-keyed-with-jwk-json",
        lambda f: f.hmac("HS256", json.dumps(f.keys.rsa.jwk()).encode()),
        "algorithm_not_allowed",
    ),
    _case(
        "HS256-keyed-with-ec-public-pem",
        lambda f: f.hmac("HS256", f.public_pem(f.keys.ec), f.keys.ec),
        "algorithm_not_allowed",
    ),
]

EMBEDDED_KEY_CASES = [
    _case(
        "jku-attacker-url",
        lambda f: f.attacker_signed(jku="https://attacker.example/jwks.json"),
        "bad_signature",
    ),
    _case(
        "x5u-attacker-url",
        lambda f: f.attacker_signed(x5u="https://attacker.example/cert.pem"),
        "bad_signature",
    ),
    _case("jwk-embedded-attacker-key", lambda f: f.attacker_signed(jwk=f.attacker_jwk()), "bad_signature"),
    _case(
        "jwk-embedded-no-kid", lambda f: f.attacker_signed(jwk=f.attacker_jwk(), kid=ABSENT), "bad_signature"
    ),
    _case("x5c-attacker-certificate", lambda f: f.attacker_signed(x5c=f.x5c()), "bad_signature"),
    _case(
        "jku-with-attacker-kid",
        lambda f: f.attacker_signed(jku="https://attacker.example/jwks.json", kid="attacker-1"),
        "unknown_key",
    ),
    _case(
        "jwk-with-attacker-kid",
        lambda f: f.attacker_signed(jwk={**f.attacker_jwk(), "kid": "attacker-1"}, kid="attacker-1"),
        "unknown_key",
    ),
]

KID_CASES = [
    _case(
        "kid-path-traversal", lambda f: f.token(header={"kid": "../../../../../../dev/null"}), "unknown_key"
    ),
    _case(
        "kid-path-traversal-attacker-signed",
        lambda f: f.token(f.attacker, {"kid": "../../../../../../dev/null"}),
        "unknown_key",
    ),
    _case(
        "kid-sql-injection",
        lambda f: f.token(f.attacker, {"kid": "x' UNION SELECT 'secret' --"}),
        "unknown_key",
    ),
    _case("kid-sql-tautology", lambda f: f.token(header={"kid": "' OR '1'='1"}), "unknown_key"),
    _case("kid-nul", lambda f: f.token(header={"kid": "rsa-1\x00"}), "unknown_key"),
    _case(
        "kid-nul-traversal", lambda f: f.token(header={"kid": "rsa-1\x00/../../etc/passwd"}), "unknown_key"
    ),
    _case("kid-10kb", lambda f: f.token(header={"kid": "k" * 10_240}), "unknown_key"),
    _case("kid-empty", lambda f: f.token(header={"kid": ""}), "unknown_key"),
    _case("kid-number", lambda f: f.token(header={"kid": 1}), "malformed_token"),
    _case("kid-array", lambda f: f.token(header={"kid": ["rsa-1"]}), "malformed_token"),
    _case("kid-object", lambda f: f.token(header={"kid": {"$ne": None}}), "malformed_token"),
    _case("kid-boolean", lambda f: f.token(header={"kid": True}), "malformed_token"),
    _case("kid-null-attacker-signed", lambda f: f.token(f.attacker, {"kid": None}), "bad_signature"),
]

HEADER_CASES = [
    _case(
        "crit-exp",
        lambda f: f.token(header={"crit": ["exp"], "exp": int(NOW) + 60}),
        "critical_header_unsupported",
    ),
    _case("crit-empty-list", lambda f: f.token(header={"crit": []}), "critical_header_unsupported"),
    _case("crit-not-a-list", lambda f: f.token(header={"crit": "b64"}), "critical_header_unsupported"),
    _case(
        "crit-unknown-extension",
        lambda f: f.token(header={"crit": ["http://attacker.example/x"], "http://attacker.example/x": 1}),
        "critical_header_unsupported",
    ),
    _case(
        "b64-false-with-crit",
        lambda f: f.token(header={"b64": False, "crit": ["b64"]}),
        "b64_header_unsupported",
    ),
    # RFC 7797 is not implemented: `b64` is refused whatever its value, crit or not, even on a
    # token validly signed over the encoded payload (nothing else would deny these).
    _case("b64-false-without-crit", lambda f: f.token(header={"b64": False}), "b64_header_unsupported"),
    _case("b64-true-without-crit", lambda f: f.token(header={"b64": True}), "b64_header_unsupported"),
    _case(
        "b64-true-with-crit",
        lambda f: f.token(header={"b64": True, "crit": ["b64"]}),
        "b64_header_unsupported",
    ),
    _case("b64-null", lambda f: f.token(header={"b64": None}), "b64_header_unsupported"),
    _case(
        # RFC 7797 unencoded payload: the middle segment is the raw JSON, not base64url.
        "b64-false-unencoded-payload",
        lambda f: unencoded_payload_token(f, crit=True),
        "malformed_token",
    ),
    _case(
        # Signed over the unencoded payload but sent encoded, and no crit: the signature cannot match.
        "b64-false-signed-unencoded-sent-encoded",
        lambda f: unencoded_payload_token(f, crit=False),
        "b64_header_unsupported",
    ),
    _case("jwe-5-parts", lambda f: jwe_token(), "malformed_token"),
    _case("jwe-5-parts-dir", lambda f: jwe_token("dir"), "malformed_token"),
    _case("nested-jwt-cty-signed-by-issuer", lambda f: nested_token(f, f.keys.rsa), "malformed_token"),
    _case("nested-jwt-in-unsigned-envelope", lambda f: nested_token(f, None), "malformed_token"),
    _case("nested-jwt-in-attacker-envelope", lambda f: nested_token(f, f.attacker), "malformed_token"),
    _case("typ-not-jwt", lambda f: f.token(header={"typ": "JOSE+JSON"}), "token_type_not_accepted"),
    _case("typ-not-a-string", lambda f: f.token(header={"typ": 1}), "token_type_not_accepted"),
    _case("header-not-an-object", lambda f: f.raw('["RS256"]', json.dumps(claims())), "malformed_token"),
    _case("payload-not-an-object", lambda f: f.raw(_header_json(), '"claims"'), "malformed_token"),
    _case("payload-nan", lambda f: f.raw(_header_json(), _claims_json(exp="NaN")), "malformed_token"),
    _case(
        "payload-infinity", lambda f: f.raw(_header_json(), _claims_json(exp="Infinity")), "malformed_token"
    ),
    _case("payload-invalid-utf8", lambda f: _raw_segments(f, b'{"sub": "\xff"}'), "malformed_token"),
]

DUPLICATE_CASES = [
    _case(
        "duplicate-header-alg",
        lambda f: f.raw('{"alg": "RS256", "alg": "none", "kid": "rsa-1"}', json.dumps(claims())),
        "malformed_token",
    ),
    _case(
        "duplicate-header-kid",
        lambda f: f.raw('{"alg": "RS256", "kid": "other", "kid": "rsa-1"}', json.dumps(claims())),
        "malformed_token",
    ),
    _case(
        "duplicate-payload-sub",
        lambda f: f.raw(_header_json(), _claims_json()[:-1] + ', "sub": "admin"}'),
        "malformed_token",
    ),
    _case(
        "duplicate-payload-iss",
        lambda f: f.raw(_header_json(), '{"iss": "https://attacker.example/", ' + _claims_json()[1:]),
        "malformed_token",
    ),
    _case(
        "duplicate-payload-exp",
        lambda f: f.raw(_header_json(), _claims_json()[:-1] + f', "exp": {int(NOW) - 3600}}}'),
        "malformed_token",
    ),
    _case(
        "duplicate-payload-aud",
        lambda f: f.raw(_header_json(), _claims_json()[:-1] + ', "aud": "other"}'),
        "malformed_token",
    ),
    _case(
        "duplicate-payload-escaped-name",
        lambda f: f.raw(_header_json(), _claims_json()[:-1] + ', "s\\u0075b": "admin"}'),
        "malformed_token",
    ),
    _case(
        "duplicate-nested-member",
        lambda f: f.raw(_header_json(), _claims_json(realm='{"roles": ["a"], "roles": ["admin"]}')),
        "malformed_token",
    ),
]

SIGNATURE_CASES = [
    _case("ecdsa-r0-s0", lambda f: f.ec_signature(raw=b"\x00" * 64), "bad_signature"),
    _case("ecdsa-r0", lambda f: f.ec_signature(r=0), "bad_signature"),
    _case("ecdsa-s0", lambda f: f.ec_signature(s=0), "bad_signature"),
    _case("ecdsa-r-s-equal-order", lambda f: f.ec_signature(P256_ORDER, P256_ORDER), "bad_signature"),
    _case("ecdsa-r-plus-order", lambda f: f.ec_signature(raw=b"\xff" * 64), "bad_signature"),
    _case("ecdsa-63-bytes", lambda f: f.ec_signature(raw=b"\x01" * 63), "bad_signature"),
    _case("ecdsa-65-bytes", lambda f: f.ec_signature(raw=b"\x01" * 65), "bad_signature"),
    _case(
        "ecdsa-truncated-real",
        lambda f: f.with_signature(f.token(f.keys.ec), b64url_decode(f.token(f.keys.ec).split(".")[2])[:-1]),
        "bad_signature",
    ),
    _case("ecdsa-der-instead-of-raw", lambda f: f.ec_der_signature(), "bad_signature"),
    _case("ecdsa-empty", lambda f: f.ec_signature(raw=b""), "bad_signature"),
    _case("ecdsa-es512-length", lambda f: f.ec_signature(raw=b"\x01" * 132), "bad_signature"),
    _case("rsa-empty-signature", lambda f: f.with_signature(f.token(), b""), "bad_signature"),
    _case("rsa-zero-signature", lambda f: f.with_signature(f.token(), b"\x00" * 256), "bad_signature"),
    _case(
        "rsa-one-byte-short",
        lambda f: f.with_signature(f.token(), b64url_decode(f.token().split(".")[2])[1:]),
        "bad_signature",
    ),
    _case(
        "rsa-signature-of-other-token",
        lambda f: f.with_signature(f.token(sub="mallory"), b64url_decode(f.token().split(".")[2])),
        "bad_signature",
    ),
    _case("eddsa-63-bytes", lambda f: f.with_signature(f.token(f.keys.ed), b"\x01" * 63), "bad_signature"),
    _case("eddsa-zero", lambda f: f.with_signature(f.token(f.keys.ed), b"\x00" * 64), "bad_signature"),
]

KEY_MISMATCH_CASES = [
    _case("es256-claiming-rsa-kid", lambda f: f.token(f.keys.ec, {"kid": "rsa-1"}), "unknown_key"),
    _case("rs256-claiming-ec-kid", lambda f: f.token(f.keys.rsa, {"kid": "ec-1"}), "unknown_key"),
    _case("eddsa-claiming-ec-kid", lambda f: f.token(f.keys.ed, {"kid": "ec-1"}), "unknown_key"),
    _case("es384-on-p256-key", lambda f: f.token(f.attacker_p384), "unknown_key"),
    _case("es512-on-p256-key", lambda f: f.token(f.keys.ec, {"alg": "ES512"}), "unknown_key"),
    _case(
        "ps256-on-rs256-only-key",
        lambda f: f.token(SigningKey("rsa-1", "PS256", f.keys.rsa.private_key)),
        "unknown_key",
    ),
    _case("rs256-on-eddsa-key", lambda f: f.token(f.keys.rsa, {"kid": "ed-1"}), "unknown_key"),
    _case(
        "es256-no-kid-signed-by-attacker",
        lambda f: f.token(SigningKey("x", "ES256", ec.generate_private_key(ec.SECP256R1())), {"kid": ABSENT}),
        "bad_signature",
    ),
]


def _claim(name: str, label: str, raw: str, code: str | None) -> Case:
    """`name` set to the raw JSON text `raw` in an otherwise valid token signed by the issuer."""
    return _case(f"{name}-{label}", lambda f: f.raw(_header_json(), _claims_json(**{name: raw})), code)


_PAST = str(int(NOW) - 3600)
_FUTURE = str(int(NOW) + 3600)
CLAIM_TYPE_CASES = [
    _claim("exp", "string", f'"{int(NOW) + 300}"', "invalid_claim"),
    _claim("exp", "empty-string", '""', "invalid_claim"),
    _claim("exp", "true", "true", "invalid_claim"),
    _claim("exp", "false", "false", "invalid_claim"),
    _claim("exp", "null", "null", "invalid_claim"),
    _claim("exp", "array", f"[{int(NOW) + 300}]", "invalid_claim"),
    _claim("exp", "object", f'{{"$date": {int(NOW) + 300}}}', "invalid_claim"),
    _claim("exp", "float-in-the-past", f"{int(NOW) - 3600}.5", "token_expired"),
    _claim(
        "exp", "at-exp-plus-skew", f"{int(NOW) - 60}", "token_expired"
    ),  # exactly exp + skew: RFC 7519 §4.1.4 "on or after"
    _claim("exp", "negative", "-1", "invalid_claim"),  # NumericDates are [0, 2**64), as jwt_authn
    _claim("exp", "minus-1e400", "-1e400", "malformed_token"),  # not finite
    _claim("exp", "zero", "0", "token_expired"),
    _claim("exp", "two-to-the-64", str(2**64), "invalid_claim"),  # 20 digits: parsed, out of range
    _claim("nbf", "negative", "-1", "invalid_claim"),
    _claim("iat", "negative", "-1", "invalid_claim"),
    _claim("exp", "5001-digits", "1" + "0" * 5000, "malformed_token"),  # over Python's 4300-digit int limit
    _claim("nbf", "string", f'"{_PAST}"', "invalid_claim"),
    _claim("nbf", "true", "true", "invalid_claim"),
    _claim("nbf", "array", "[]", "invalid_claim"),
    _claim("nbf", "float-past-skew", f"{int(NOW) + 61}.5", "token_not_yet_valid"),
    _claim("nbf", "huge", "1" + "0" * 30, "malformed_token"),  # over 20 digits
    _claim("nbf", "1e400", "1e400", "malformed_token"),
    _claim("iat", "string", f'"{_PAST}"', "invalid_claim"),
    _claim("iat", "false", "false", "invalid_claim"),
    _claim("iat", "object", "{}", "invalid_claim"),
    _claim("iat", "float-in-the-future", f"{_FUTURE}.5", "token_issued_in_future"),
    _claim("iat", "huge", "1" + "0" * 30, "malformed_token"),
    _claim("iat", "1e400", "1e400", "malformed_token"),
    _claim("aud", "number", "123", "invalid_claim"),
    _claim("aud", "boolean", "true", "invalid_claim"),
    _claim("aud", "object", '{"api": true}', "invalid_claim"),
    _claim("aud", "array-with-number", '["api", 1]', "invalid_claim"),
    _claim("aud", "empty-array", "[]", "invalid_claim"),
    _claim("aud", "nested-array", '[["api"]]', "invalid_claim"),
    _claim("aud", "null", "null", "audience_mismatch"),
    _claim("aud", "other-case", '"API"', "audience_mismatch"),
    _claim("aud", "trailing-space", '"api "', "audience_mismatch"),
    _claim("aud", "other-audiences", '["other", "api2"]', "audience_mismatch"),
    _claim("iss", "number", "123", "unknown_issuer"),
    _claim("iss", "array", json.dumps([ISSUER]), "unknown_issuer"),
    _claim("iss", "object", json.dumps({"iss": ISSUER}), "unknown_issuer"),
    _claim("iss", "null", "null", "unknown_issuer"),
    _claim("iss", "boolean", "true", "unknown_issuer"),
    _claim("iss", "no-trailing-slash", json.dumps(ISSUER.rstrip("/")), "unknown_issuer"),
    _claim("iss", "upper-case", json.dumps(ISSUER.upper()), "unknown_issuer"),
    _claim("iss", "trailing-nul", json.dumps(ISSUER + "\x00"), "unknown_issuer"),
]

# Numbers beyond the double range become +-inf in Python's json; the parser already refuses the
# `Infinity` literal ("NaN / Infinity are not JSON"), so a NumericDate of 1e400 must be refused too.
NON_FINITE_CASES = [
    _case("exp-1e400-never-expires", lambda f: f.raw(_header_json(), _claims_json(exp="1e400")), None),
    _case("nbf-minus-1e400", lambda f: f.raw(_header_json(), _claims_json(nbf="-1e400")), None),
    _case("iat-minus-1e400", lambda f: f.raw(_header_json(), _claims_json(iat="-1e400")), None),
]

SIZE_CASES = [
    _case("100kb-garbage-rejected-before-parsing", lambda f: "!" * 100_000, "token_too_large"),
    _case("100kb-signed-token", lambda f: _pad_to(f, 100_000), "token_too_large"),
    _case("one-byte-over-the-cap", lambda f: "a" * (16 * 1024 + 1), "token_too_large"),
    _case("at-the-cap-is-parsed", lambda f: "a" * (16 * 1024), "malformed_token"),
    _case(
        "deeply-nested-payload-under-the-cap",
        lambda f: f.raw(_header_json(), "[" * 10_000),
        "malformed_token",
    ),
    _case("deeply-nested-header", lambda f: f.raw("[" * 3000, json.dumps(claims())), "malformed_token"),
]

TEXT_CASES = [
    _case("non-ascii-in-payload-segment", lambda f: _replace_at(f.token(), 1, 5, "é"), "malformed_token"),
    _case("fullwidth-digit", lambda f: _replace_at(f.token(), 1, 5, "\uff11"), "malformed_token"),
    _case("space-inside", lambda f: _replace_at(f.token(), 1, 5, " "), "malformed_token"),
    _case("tab-inside", lambda f: _replace_at(f.token(), 1, 5, "\t"), "malformed_token"),
    _case("nbsp-inside", lambda f: _replace_at(f.token(), 1, 5, "\u00a0"), "malformed_token"),
    _case("zero-width-space-appended", lambda f: f.token() + "\u200b", "malformed_token"),
    _case("nul-inside", lambda f: _replace_at(f.token(), 1, 5, "\x00"), "malformed_token"),
    _case("padding-on-signature", lambda f: f.token() + "==", "malformed_token"),
    _case(
        "standard-base64-alphabet",
        lambda f: f.token().replace("-", "+").replace("_", "/") + "+/",
        "malformed_token",
    ),
    _case("two-segments", lambda f: f.token().rsplit(".", 1)[0], "malformed_token"),
    _case("four-segments", lambda f: f.token() + ".e30", "malformed_token"),
    _case("empty-segments", lambda f: "..", "malformed_token"),
    _case("one-word", lambda f: "garbage", "malformed_token"),
    _case("segment-length-1-mod-4", lambda f: _one_mod_four(f.token()), "malformed_token"),
    # A line break is legal in neither a header value nor base64url (see test_parse_token_*).
    _case("newline-inside", lambda f: _replace_at(f.token(), 0, -1, "\n"), "malformed_token"),
]


def _replace_at(token: str, segment: int, offset: int, text: str) -> str:
    """`text` put into a segment: at `offset` (replacing a character), or appended for -1."""
    parts = token.split(".")
    part = parts[segment]
    parts[segment] = part + text if offset == -1 else part[:offset] + text + part[offset + 1 :]
    return ".".join(parts)


def _one_mod_four(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature + 'A' * ((1 - len(signature)) % 4)}"


def _raw_segments(f: Forge, payload: bytes) -> str:
    return jws.sign(json.dumps(f.header(f.keys.rsa)).encode(), payload, f.keys.rsa.private_key, "RS256")


REQUEST_CASES = [
    _case(
        "bearer-without-token",
        lambda f: check_request({"authorization": "Bearer"}),
        "empty_token",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "bearer-space-only",
        lambda f: check_request({"authorization": "Bearer    "}),
        "empty_token",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "bearer-lower-case-empty",
        lambda f: check_request({"authorization": "bearer "}),
        "empty_token",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "bearer-empty-then-comma",
        lambda f: check_request({"authorization": "Bearer ,"}),
        "empty_token",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "empty-query-parameter",
        lambda f: check_request(path="/orders?access_token="),
        "empty_token",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "two-authorization-headers-joined",
        lambda f: check_request({"authorization": f"Bearer {f.token()}, Bearer {f.token(sub='bob')}"}),
        "multiple_tokens",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "two-authorization-headers-raw",
        lambda f: check_request(
            raw=[
                ("authorization", f"Bearer {f.token()}".encode()),
                ("Authorization", f"Bearer {f.token(sub='bob')}".encode()),
            ]
        ),
        "multiple_tokens",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "valid-token-and-garbage-joined",
        lambda f: check_request({"authorization": f"Bearer {f.token()},Bearer garbage"}),
        "multiple_tokens",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "header-and-query-parameter-differ",
        lambda f: check_request(
            {"authorization": f"Bearer {f.token()}"}, path=f"/orders?access_token={f.token(sub='bob')}"
        ),
        "multiple_tokens",
        400,
        INVALID_REQUEST,
    ),
    _case(
        # RFC 6750 §2: one method per request, even for the same token.
        "header-and-query-parameter-same-token",
        lambda f: check_request(
            {"authorization": f"Bearer {(t := f.token())}"}, path=f"/orders?access_token={t}"
        ),
        "multiple_token_methods",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "two-query-parameters-differ",
        lambda f: check_request(path=f"/orders?access_token={f.token()}&access_token={f.token(sub='bob')}"),
        "multiple_tokens",
        400,
        INVALID_REQUEST,
    ),
    _case(
        "basic-scheme-only",
        lambda f: check_request({"authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}),
        "missing_token",
        401,
        None,
    ),
    _case(
        "bearer-without-space",
        lambda f: check_request({"authorization": f"Bearer{f.token()}"}),
        "missing_token",
        401,
        None,
    ),
    _case("empty-authorization", lambda f: check_request({"authorization": ""}), "missing_token", 401, None),
    _case("no-credentials", lambda f: check_request({}), "missing_token", 401, None),
    _case(
        "token-with-two-words",
        lambda f: check_request({"authorization": f"Bearer {f.token()} extra"}),
        "malformed_token",
    ),
]

CORPUS = (
    ALG_CASES
    + CONFUSION_CASES
    + EMBEDDED_KEY_CASES
    + KID_CASES
    + HEADER_CASES
    + DUPLICATE_CASES
    + SIGNATURE_CASES
    + KEY_MISMATCH_CASES
    + CLAIM_TYPE_CASES
    + SIZE_CASES
    + TEXT_CASES
    + REQUEST_CASES
)


def _secrets(made: str | CheckRequest) -> list[str]:
    if not isinstance(made, str):
        values = [*made.attributes.request.http.headers.values(), made.attributes.request.http.path]
        values += [
            e.raw_value.decode("utf-8", "replace") for e in made.attributes.request.http.header_map.headers
        ]
        tokens = [t for v in values for t in re.findall(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_.-]+", v)]
        return tokens + [t.rsplit(".", 1)[-1] for t in tokens if len(t.rsplit(".", 1)[-1]) >= 16]
    signature = made.rsplit(".", 1)[-1]
    return [made] + ([signature] if len(signature) >= 16 else [])


def _request(made: str | CheckRequest) -> CheckRequest:
    return bearer(made) if isinstance(made, str) else made


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
async def test_attack_is_denied_cleanly(servicer: AuthorizationServicer, forge: Forge, case: Case) -> None:
    made = case.make(forge)
    response = await check(servicer, _request(made))
    assert_denied(response, case.status, case.error, case.code, _secrets(made))


@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=[c.id for c in NON_FINITE_CASES])
async def test_non_finite_numeric_dates_are_invalid(
    servicer: AuthorizationServicer, forge: Forge, case: Case
) -> None:
    response = await check(servicer, _request(case.make(forge)))
    assert_denied(response, 401, INVALID, None)


# Genuinely signed claims the answer cannot carry as they are: protobuf strings must be valid
# UTF-8 (a JSON "\\ud800" escape decodes to a lone surrogate) and Struct numbers are doubles.
UNENCODABLE_CLAIMS = [
    ("lone-surrogate-in-an-identity-claim", '"email": "\\ud800"'),
    ("lone-surrogate-in-another-claim", '"name": "x\\udfff"'),
    ("lone-surrogate-in-a-claim-name", '"\\udc00": 1'),
    ("integer-beyond-double-range", '"big": 1' + "0" * 400),
]


@pytest.mark.parametrize(("name", "member"), UNENCODABLE_CLAIMS, ids=[n for n, _ in UNENCODABLE_CLAIMS])
async def test_unencodable_claims_still_get_an_answer(
    servicer: AuthorizationServicer, forge: Forge, name: str, member: str
) -> None:
    payload = json.dumps(claims())[:-1] + ", " + member + "}"
    response = await check(servicer, bearer(forge.raw(_header_json(), payload)))
    assert_well_formed(response)


@pytest.mark.parametrize("segment", [0, 1, 2], ids=["header", "payload", "signature"])
def test_parse_token_rejects_a_segment_with_a_line_break(forge: Forge, segment: int) -> None:
    """`$` in the segment pattern matches before a final newline, and base64 decoding drops it;
    the padding arithmetic (which counts it) is what rejects these: keep it that way."""
    parts = forge.token().split(".")
    parts[segment] += "\n"  # e.g. f"{head}\n.{payload}.{signature}"
    with pytest.raises(errors.MalformedToken):
        parse_token(".".join(parts), 16 * 1024)


# Tokens that look odd but are genuinely signed by the issuer and valid: accepting them is right.
AUTHENTIC_ODDITIES = [
    (
        "exp-float-in-the-future",
        lambda f: f.token(exp=NOW + 300.5),
    ),  # RFC 7519 §2: NumericDate may be non-integer
    ("exp-within-skew", lambda f: f.token(exp=int(NOW) - 59)),
    ("nbf-within-skew", lambda f: f.token(nbf=int(NOW) + 60)),
    ("kid-null-is-no-kid", lambda f: f.token(header={"kid": None})),  # one RSA key fits: no ambiguity
    ("no-kid-one-key-fits", lambda f: f.token(header={"kid": ABSENT})),
    ("cty-jwt-with-claims-payload", lambda f: f.token(header={"cty": "JWT"})),  # cty is informational
    ("jku-ignored-on-issuer-signed-token", lambda f: f.token(header={"jku": "https://attacker.example/"})),
    ("aud-array-containing-api", lambda f: f.token(aud=["other", "api"])),
    ("typ-case-insensitive", lambda f: f.token(header={"typ": "application/JWT"})),
    (
        "same-token-twice-joined",
        lambda f: check_request({"authorization": f"Bearer {(t := f.token())}, Bearer {t}"}),
    ),
    (
        "same-token-twice-in-the-query",
        lambda f: check_request(path=f"/o?access_token={(t := f.token())}&access_token={t}"),
    ),
    ("scheme-case-insensitive", lambda f: check_request({"authorization": f"bEaReR {f.token()}"})),
    (
        "other-scheme-beside-bearer",
        lambda f: check_request({"authorization": f"Basic eDp5, Bearer {f.token()}"}),
    ),
]


@pytest.mark.parametrize(("name", "make"), AUTHENTIC_ODDITIES, ids=[n for n, _ in AUTHENTIC_ODDITIES])
async def test_authentic_oddities_are_allowed(
    servicer: AuthorizationServicer, forge: Forge, name: str, make: Make
) -> None:
    response = await check(servicer, _request(make(forge)))
    assert_well_formed(response)
    assert response.status.code == 0, (name, response.status.message)


async def test_oversized_token_is_rejected_before_any_parsing(
    servicer: AuthorizationServicer, forge: Forge
) -> None:
    """Garbage that could not even be split into segments is `token_too_large`, not `malformed`,
    and costs about what a small malformed token costs (generous bound: machines are noisy)."""
    huge = bearer("{" * 100_000)
    small = bearer("garbage")
    for request, code in ((huge, "token_too_large"), (small, "malformed_token")):
        assert_denied(await check(servicer, request), 401, INVALID, code)

    async def per_call(request: CheckRequest) -> float:
        started = time.perf_counter()
        for _ in range(50):
            await check(servicer, request)
        return (time.perf_counter() - started) / 50

    huge_cost, small_cost = await per_call(huge), await per_call(small)
    assert huge_cost < 0.005, f"{huge_cost * 1e3:.2f} ms per 100 KB token"
    assert huge_cost < small_cost * 20 + 0.001, (huge_cost, small_cost)


# ---- header safety ----

UNSAFE_VALUES = [
    ("cr", "a\rb"),
    ("lf", "a\nb"),
    ("crlf-header-injection", "x\r\nx-admin: true"),
    ("nul", "a\x00b"),
    ("bell", "\x07ring"),
    ("escape-sequence", "\x1b[31mred"),
    ("del", "a\x7fb"),
    ("tab", "a\tb"),
    ("vertical-tab", "a\x0bb"),
    ("leading-space", " padded"),
    ("trailing-space", "padded "),
    ("over-cap", "x" * 8193),
    ("over-cap-multibyte", "é" * 4097),  # 8194 bytes in 4097 characters: the cap is in bytes
    ("array-with-crlf-member", ["ok", "bad\r\nx-admin: true"]),
    # Joined with ",", these would read as other elements (["x,admin"] as "x" and "admin").
    ("array-element-with-comma", ["reader", "x,admin"]),
    ("array-element-with-blank-edge", ["reader", " admin"]),
    ("array-with-nested-array", ["reader", ["admin"]]),
    ("array-with-object", ["reader", {"role": "admin"}]),
]
# Legal field values (RFC 9110 §5.5: obs-text bytes are allowed; Envoy rejects only NUL, CR, LF).
SAFE_VALUES = [
    ("ascii", "plain value", "plain value"),
    ("non-ascii", "José Dąbrowska", "José Dąbrowska"),
    ("emoji", "team 🚀", "team 🚀"),
    ("line-separator", "a\u2028b", "a\u2028b"),
    ("at-cap", "x" * 8192, "x" * 8192),
    ("object-with-newline-is-json-escaped", {"k": "a\nb"}, '{"k":"a\\nb"}'),
    ("number", 3.5, "3.5"),
    ("boolean", True, "true"),
]


@pytest.mark.parametrize(("name", "value"), UNSAFE_VALUES, ids=[n for n, _ in UNSAFE_VALUES])
async def test_unsafe_claim_value_is_never_emitted(
    servicer: AuthorizationServicer, forge: Forge, name: str, value: object
) -> None:
    response = await check(servicer, bearer(forge.token(note=value), **{"x-note": "forged"}))
    assert_well_formed(response)
    assert response.status.code == 0, "the decision stands"
    ok = response.ok_response
    emitted = response_headers(ok.headers)
    assert "x-note" not in emitted
    assert emitted["x-user-id"] == "alice"
    assert "x-note" in ok.headers_to_remove  # the client's copy goes, since ours is left out


@pytest.mark.parametrize(("name", "value", "text"), SAFE_VALUES, ids=[n for n, _, _ in SAFE_VALUES])
async def test_legal_claim_value_is_emitted_verbatim(
    servicer: AuthorizationServicer, forge: Forge, name: str, value: object, text: str
) -> None:
    response = await check(servicer, bearer(forge.token(note=value), **{"x-note": "forged"}))
    assert_well_formed(response)
    emitted = response_headers(response.ok_response.headers)
    assert emitted["x-note"] == text
    assert "x-note" not in response.ok_response.headers_to_remove  # removal runs after the set


@pytest.mark.parametrize(
    ("value", "emitted"),
    [("y" * 64, True), ("y" * 65, False), ("é" * 33, False)],
    ids=["64", "65", "66-utf8"],
)
async def test_configured_header_value_cap(keys: Keys, forge: Forge, value: str, emitted: bool) -> None:
    servicer = build_servicer(keys, max_header_value_bytes=64)
    response = await check(servicer, bearer(forge.token(note=value)))
    assert response.status.code == 0
    assert ("x-note" in response_headers(response.ok_response.headers)) is emitted, len(value)


async def test_payload_header_respects_the_cap(servicer: AuthorizationServicer, forge: Forge) -> None:
    response = await check(servicer, bearer(forge.token(note="n" * 7000)))
    assert response.status.code == 0
    emitted = response_headers(response.ok_response.headers)
    assert len(emitted["x-note"]) == 7000  # under the cap: emitted
    assert len(emitted.get("x-jwt-payload", "")) <= 8192, "an identity header over the cap was emitted"


# Every way a client can send an identity header: Envoy's map has lower-case names and joins
# repeats with ","; the raw header map keeps the client's case and each line.
FORGED_SPELLINGS: list[tuple[str, Callable[[str, dict[str, str]], CheckRequest]]] = [
    ("map", lambda path, extra: check_request({**extra, **dict.fromkeys(OWNED, "forged")}, path=path)),
    (
        "map-joined",
        lambda path, extra: check_request({**extra, **dict.fromkeys(OWNED, "forged,again")}, path=path),
    ),
    (
        "raw-mixed-case-and-repeated",
        lambda path, extra: check_request(
            path=path,
            raw=[(k, v.encode()) for k, v in extra.items()]
            + [(name.upper(), b"forged") for name in OWNED]
            + [(name.title(), b"again") for name in OWNED]
            + [(name, b"third") for name in OWNED],
        ),
    ),
    (
        "underscored",
        lambda path, extra: check_request(
            {**extra, **{n.replace("-", "_"): "forged" for n in OWNED}, "x-user_id": "forged"}, path=path
        ),
    ),
    # Envoy's allowed_headers (or another filter) may hide the forged copies from ext-authz.
    ("hidden", lambda path, extra: check_request(extra, path=path)),
]
ROUTE_KINDS: list[tuple[str, str, Callable[[Forge], dict[str, str]], set[str]]] = [
    # (route kind, path, credentials, the owned headers this decision sets)
    (
        "protected-valid-token",
        "/orders",
        lambda f: {"authorization": f"Bearer {f.token()}"},
        {"x-user-id", "x-jwt-payload"},
    ),
    (
        "protected-token-with-claims",
        "/orders",
        lambda f: {"authorization": f"Bearer {f.token(email='a@x', note='n', roles=['r'])}"},
        {"x-user-id", "x-user-email", "x-note", "x-roles", "x-jwt-payload"},
    ),
    (
        "rule-header-route",
        "/tenant/x",
        lambda f: {"authorization": f"Bearer {f.token(tenant='t1')}"},
        {"x-user-id", "x-jwt-payload", "x-tenant"},
    ),
    ("anonymous-no-token", "/public/x", lambda f: {}, set()),
    ("anonymous-invalid-token", "/public/x", lambda f: {"authorization": f"Bearer {f.token(exp=1)}"}, set()),
    (
        "anonymous-valid-token",
        "/public/x",
        lambda f: {"authorization": f"Bearer {f.token()}"},
        {"x-user-id", "x-jwt-payload"},
    ),
    ("dry-run-would-deny", "/dry/x", lambda f: {}, set()),
    (
        "dry-run-insufficient-scope",
        "/dry/x",
        lambda f: {"authorization": f"Bearer {f.token()}"},
        {"x-user-id", "x-jwt-payload"},
    ),
]


@pytest.mark.parametrize(("spelling", "build"), FORGED_SPELLINGS, ids=[s for s, _ in FORGED_SPELLINGS])
@pytest.mark.parametrize(
    ("kind", "path", "credentials", "sets"), ROUTE_KINDS, ids=[k for k, *_ in ROUTE_KINDS]
)
async def test_forged_identity_headers_never_survive(
    servicer: AuthorizationServicer,
    forge: Forge,
    spelling: str,
    build: Callable[[str, dict[str, str]], CheckRequest],
    kind: str,
    path: str,
    credentials: Callable[[Forge], dict[str, str]],
    sets: set[str],
) -> None:
    response = await check(servicer, build(path, credentials(forge)))
    assert_well_formed(response)
    assert response.status.code == 0, response.status.message
    ok = response.ok_response
    emitted = response_headers(ok.headers)
    assert set(emitted) & set(OWNED) == sets
    assert all("forged" not in v and "again" not in v and "third" not in v for v in emitted.values())
    # Envoy removes after it sets: a name we set must not be removed; every other owned one must,
    # and every underscore spelling of each, whether the request shows them or not.
    assert set(ok.headers_to_remove) == OWNED_SPELLINGS - sets


async def test_denied_request_is_not_forwarded_at_all(servicer: AuthorizationServicer) -> None:
    response = await check(servicer, check_request(dict.fromkeys(OWNED, "forged")))
    assert_denied(response, 401, None, "missing_token")
    assert not response.HasField("ok_response")


# ---- odd requests ----


def _bare(attributes: attribute_context_pb2.AttributeContext | None) -> CheckRequest:
    return CheckRequest() if attributes is None else CheckRequest(attributes=attributes)


ODD_REQUESTS: list[tuple[str, Callable[[Forge], CheckRequest], int, str]] = [
    # Envoy's network (L4) ext_authz filter sends no HTTP attributes at all.
    ("empty-check-request", lambda f: _bare(None), 403, "no_matching_rule"),
    (
        "no-request-attributes",
        lambda f: _bare(attribute_context_pb2.AttributeContext(context_extensions={"a": "b"})),
        403,
        "no_matching_rule",
    ),
    (
        "no-http-attributes",
        lambda f: _bare(
            attribute_context_pb2.AttributeContext(request=attribute_context_pb2.AttributeContext.Request())
        ),
        403,
        "no_matching_rule",
    ),
    ("empty-headers", lambda f: check_request({}), 401, "missing_token"),
    ("empty-raw-header-map", lambda f: check_request(raw=[]), 401, "missing_token"),
    (
        "pseudo-headers-only",
        lambda f: check_request(
            {":path": "/orders", ":method": "GET", ":authority": "h"}, path="", method="", host=""
        ),
        401,
        "missing_token",
    ),
    (
        "1000-headers",
        lambda f: check_request({f"x-h{i}": "v" * 10 for i in range(1000)}),
        401,
        "missing_token",
    ),
    (
        "1000-raw-headers",
        lambda f: check_request(raw=[(f"X-H{i % 10}", b"v" * 10) for i in range(1000)]),
        401,
        "missing_token",
    ),
    (
        "1000-authorization-lines-same-token",
        lambda f: check_request(
            raw=[("authorization", f"Bearer {(t := f.token())}".encode())] * 1000 + [("x", t.encode())]
        ),
        0,
        "",
    ),
    (
        "1000-authorization-lines-differ",
        lambda f: check_request(raw=[("authorization", f"Bearer t{i}".encode()) for i in range(1000)]),
        400,
        "multiple_tokens",
    ),
    ("1mb-header-value", lambda f: check_request({"x-junk": "j" * 1_000_000}), 401, "missing_token"),
    (
        "1mb-authorization",
        lambda f: check_request({"authorization": "Bearer " + "a" * 1_000_000}),
        401,
        "token_too_large",
    ),
    (
        "1mb-authorization-of-commas",
        lambda f: check_request({"authorization": "," * 1_000_000}),
        401,
        "missing_token",
    ),
    ("1mb-cookie", lambda f: check_request({"cookie": "a=b; " * 200_000}), 401, "missing_token"),
    ("1mb-path", lambda f: check_request(path="/" + "a/" * 500_000), 401, "missing_token"),
    ("1mb-dot-segments", lambda f: check_request(path="/" + "../" * 330_000), 401, "missing_token"),
    ("1mb-query", lambda f: check_request(path="/orders?" + "a=b&" * 250_000), 401, "missing_token"),
    (
        "raw-invalid-utf8-authorization",
        lambda f: check_request(raw=[("authorization", b"Bearer \xff\xfe.\xc0\xaf.x")]),
        401,
        "malformed_token",
    ),
    (
        "raw-empty-key",
        lambda f: check_request(raw=[("", b"v"), ("authorization", b"")]),
        401,
        "missing_token",
    ),
    (
        "nul-in-values",
        lambda f: check_request({"authorization": "Bearer \x00", "x-a": "\x00"}),
        401,
        "malformed_token",
    ),
    ("path-without-slash", lambda f: check_request(path="*"), 403, "no_matching_rule"),
    (
        "absolute-uri-path",
        lambda f: check_request(path="http://evil.example/orders"),
        403,
        "no_matching_rule",
    ),
    (
        "invalid-percent-escapes",
        lambda f: check_request(path="/orders/%zz%f%%c0%af%ff"),
        401,
        "missing_token",
    ),
    ("odd-method", lambda f: check_request(method="\x00" * 100), 401, "missing_token"),
    ("odd-host", lambda f: check_request(host="[" * 1000 + ":99999999999"), 400, "invalid_host"),
]


@pytest.mark.parametrize(("name", "make", "status", "code"), ODD_REQUESTS, ids=[n for n, *_ in ODD_REQUESTS])
async def test_odd_request_gets_a_clean_answer(
    servicer: AuthorizationServicer,
    forge: Forge,
    name: str,
    make: Callable[[Forge], CheckRequest],
    status: int,
    code: str,
) -> None:
    response = await check(servicer, make(forge))
    assert_well_formed(response)
    if status == 0:
        assert response.status.code == 0, response.status.message
    else:
        assert (response.denied_response.status.code, response.status.message) == (status, code)


# ---- paths a backend could read differently, and hosts spelled differently (Pipeline.decide) ----

# A token rule guards /admin/*; /public/* is anonymous and /* needs any token: weaker rules a
# path could be judged by while the backend serves /admin/x.
PATH_RULES: list[Any] = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
    {"name": "users", "match": {"paths": ["/users/{id}", "/users/{id}/*"]}, "require": {}},
    {
        "name": "api",
        "match": {"paths": ["/api/*"]},
        "require": {"expression": "!request.path.startsWith('/api/admin')"},
    },
    {"name": "any", "match": {"paths": ["/*"]}, "require": {}},
]
AMBIGUOUS_PATHS = [
    "/public/..;/admin/x",  # Tomcat/Jetty: ";" params stripped, then ".." resolved
    "/public/..;x=1/admin/x",
    "/admin;x=1/users",  # RFC 3986 reading is /* (any token); Tomcat serves /admin/users
    "/public/..%2fadmin/x",  # backends that decode %2F
    "/public/..%2Fadmin/x",
    "/public/%2e%2e%2fadmin/x",
    "/public/%2E%2E%2Fadmin/x",
    "/public/..%5cadmin/x",  # %5C: "\" decoded, then a separator
    "/public/..%5Cadmin/x",
    "/public/..\\admin\\x",  # "\" as a separator (IIS, Windows)
    "/public/%252e%252e/admin/x",  # decoded twice
    "/public/%252e%252e%252fadmin/x",
    "/public/..%252fadmin/x",
    "/public/%25252e%25252e/admin/x",  # decoded three times
    "/public/.%2e;/admin/x",
    "/public/x%2f..%2f..%2fadmin/x",
    "/public;/../admin/x",
    "/admin//../public/x",  # RFC 3986 to the letter keeps "//": /admin/public/x (Java URI, WHATWG)
    "/admin/x%00/../../public/y",  # C servers stop at %00: /admin/x
]


def path_pipeline(resolver: StaticKeys, **top: Any) -> Pipeline:
    return Pipeline(compile(make_settings(rules=PATH_RULES, **top)), resolver, clock=clock)


def get(path: str, token: str | None = None, host: str = "api.example.com") -> Request:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return Request("GET", path, host=host, headers=headers)


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS)
async def test_a_path_read_differently_is_never_judged_by_a_weaker_rule(
    resolver: StaticKeys, forge: Forge, path: str
) -> None:
    p = path_pipeline(resolver)
    for token in (None, forge.token(), forge.token(scope="admin")):
        decision = await p.decide(get(path, token))
        assert isinstance(decision, Deny), (path, decision)
        assert (decision.status, decision.code) == (400, "ambiguous_path"), decision
        assert json.loads(decision.body) == {
            "error": "invalid_request",
            "error_description": "the request path can be read as different resources",
        }
        assert challenge_params(dict(decision.headers)["www-authenticate"])["error"] == "invalid_request"


async def test_requirements_must_hold_under_every_reading(resolver: StaticKeys, forge: Forge) -> None:
    p = path_pipeline(resolver)
    # Every reading picks rule "api"; under the Tomcat one CEL sees /api/admin.
    decision = await p.decide(get("/api/x/..;/admin", forge.token()))
    assert isinstance(decision, Deny) and (decision.status, decision.code) == (403, "requirement_not_met")
    assert isinstance(await p.decide(get("/api/x;v=1/list", forge.token())), Allow)


LEGIT_PATHS: list[tuple[str, bool, str]] = [
    # (path, with a token, the rule that allows it)
    ("/public/page;jsessionid=0123ABCD", False, "public"),
    ("/public/a;v=1/b;jsessionid=0123", False, "public"),
    ("/public/a%2Fb.txt", False, "public"),
    ("/public/a%5cb", False, "public"),
    ("/public/100%25", False, "public"),
    ("/admin/x;jsessionid=0123", True, "admin"),
    ("/users/alice/docs;jsessionid=1", True, "users"),  # same rule, same {id}
    ("/files/a%2Fb%2Fc", True, "any"),
]


@pytest.mark.parametrize(("path", "with_token", "rule"), LEGIT_PATHS)
async def test_paths_whose_readings_agree_still_work(
    resolver: StaticKeys, forge: Forge, path: str, with_token: bool, rule: str
) -> None:
    decision = await path_pipeline(resolver).decide(
        get(path, forge.token(scope="admin") if with_token else None)
    )
    assert isinstance(decision, Allow), decision
    assert decision.rule == rule


async def test_template_parameters_must_agree(resolver: StaticKeys, forge: Forge) -> None:
    # {id} is "alice;v=1" under RFC 3986 and "alice" under Tomcat: not the same request.
    decision = await path_pipeline(resolver).decide(get("/users/alice;v=1", forge.token()))
    assert isinstance(decision, Deny) and decision.code == "ambiguous_path"


async def test_rfc3986_path_readings_is_the_explicit_relaxed_mode(resolver: StaticKeys) -> None:
    relaxed = path_pipeline(resolver, path_readings="rfc3986")
    decision = await relaxed.decide(get("/public/..;/admin/x"))
    assert isinstance(decision, Allow) and decision.rule == "public"


async def test_an_ambiguous_path_in_dry_run(resolver: StaticKeys) -> None:
    dry = path_pipeline(resolver, mode="dry_run")
    decision = await dry.decide(get("/public/..;/admin/x"))
    assert isinstance(decision, Allow)
    assert decision.metadata["dry_run_denial"] == {"status": 400, "code": "ambiguous_path"}
    # One rule enforced: an ambiguous path may be that rule's, so it is refused.
    rules = [dict(PATH_RULES[1], mode="enforce"), *PATH_RULES[2:]]
    mixed = Pipeline(compile(make_settings(rules=rules, mode="dry_run")), resolver, clock=clock)
    decision = await mixed.decide(get("/public/..;/admin/x"))
    assert isinstance(decision, Deny) and decision.code == "ambiguous_path"


HOST_RULES: list[Any] = [
    {"name": "admin-host", "match": {"hosts": ["admin.example.com"]}, "require": {"scopes": ["admin"]}},
    {"name": "v4-host", "match": {"hosts": ["10.0.0.1"]}, "require": {"scopes": ["admin"]}},
    {"name": "open", "allow": "anonymous"},
]
# IPv6 literals in `hosts:` are new (the config refused them before).
V6_RULES: list[Any] = [
    {"name": "v6-host", "match": {"hosts": ["[2001:DB8:0::1]"]}, "require": {"scopes": ["admin"]}},
    {"name": "open", "allow": "anonymous"},
]
# Each is the guarded host to some backend or resolver: the guarded rule, or 400.
HOST_SPELLINGS: list[tuple[str, str | None]] = [
    ("admin.example.com", "admin-host"),
    ("admin.example.com:443", "admin-host"),
    ("admin.example.com:", "admin-host"),  # RFC 3986 §3.2.3: empty port
    ("ADMIN.EXAMPLE.COM", "admin-host"),
    ("Admin.Example.Com.:8443", "admin-host"),
    ("admin.example.com.", "admin-host"),
    ("admin.example.com.:", "admin-host"),
    ("admin.example.com:0", "admin-host"),
    ("admin.example.com:65535", "admin-host"),
    ("admin.example.com:443:443", None),
    ("admin.example.com::443", None),
    ("admin.example.com:65536", None),
    ("admin.example.com:44x", None),
    ("admin.example.com:+443", None),
    ("admin.example.com:\u0664\u0664\u0663", None),  # Arabic-Indic digits
    ("admin.example.com..", None),
    ("admin..example.com", None),
    (".admin.example.com", None),
    ("user@admin.example.com", None),
    ("admin.example.com@evil.example", None),
    (" admin.example.com", None),
    ("admin.example.com ", None),
    ("admin.example.com\t", None),
    ("admin%2eexample.com", None),
    ("admin.example.com/", None),
    ("admin.example.com\\", None),
    (":443", None),
    (".", None),
    ("", None),  # no host at all: it may be the guarded one
    ("[2001:db8::1]", "v6-host"),
    ("[2001:DB8::1]:443", "v6-host"),
    ("[2001:db8:0:0:0:0:0:1]", "v6-host"),
    ("[2001:0db8::0001]:", "v6-host"),
    ("[2001:db8::1]:443:1", None),
    ("[2001:db8::1]x", None),
    ("[2001:db8::1%25eth0]", None),
    ("[2001:db8::1", None),
    ("2001:db8::1", None),
    ("[v1.x]", None),
    ("10.0.0.1", "v4-host"),
    ("10.0.0.1:80", "v4-host"),
    ("010.0.0.1", None),
    ("10.1", None),
    ("0x0a.0.0.1", None),
    ("167772161", None),
    ("10.0.0.1.", "v4-host"),
]


@pytest.mark.parametrize(("host", "rule"), HOST_SPELLINGS)
async def test_a_hosts_rule_cannot_be_skipped_by_spelling(
    resolver: StaticKeys, forge: Forge, host: str, rule: str | None
) -> None:
    rules = V6_RULES if rule == "v6-host" or host.startswith("[") or host.startswith("2001") else HOST_RULES
    p = Pipeline(compile(make_settings(rules=rules)), resolver, clock=clock)
    anonymous = await p.decide(get("/x", host=host))
    assert isinstance(anonymous, Deny), anonymous
    if rule is None:
        assert (anonymous.status, anonymous.code) == (400, "invalid_host")
        assert json.loads(anonymous.body)["error"] == "invalid_request"
    else:
        assert (anonymous.status, anonymous.code, anonymous.rule) == (401, "missing_token", rule)
        allowed = await p.decide(get("/x", forge.token(scope="admin"), host=host))
        assert isinstance(allowed, Allow) and allowed.rule == rule


@pytest.mark.parametrize("host", ["api.example.com", "API.example.com.:8443", "localhost", "[::1]:80"])
async def test_other_hosts_reach_the_open_rule(resolver: StaticKeys, host: str) -> None:
    decision = await Pipeline(compile(make_settings(rules=HOST_RULES)), resolver, clock=clock).decide(
        get("/x", host=host)
    )
    assert isinstance(decision, Allow) and decision.rule == "open"


@pytest.mark.parametrize(
    ("rules", "status"),
    [
        ([{"allow": "anonymous"}], 0),
        ([{"match": {"hosts": ["*.example.com"]}, "require": {}}, {"allow": "anonymous"}], 400),
        ([{"require": {"expression": "request.host != 'admin.example.com'"}}], 400),
        ([{"require": {"any_of": [{"not": {"expression": "request.host == 'a'"}}]}}], 400),
    ],
)
async def test_a_request_without_host_where_rules_read_the_host(
    resolver: StaticKeys, forge: Forge, rules: list[Any], status: int
) -> None:
    decision = await Pipeline(compile(make_settings(rules=rules)), resolver, clock=clock).decide(
        get("/x", forge.token(), host="")
    )
    if status == 0:
        assert isinstance(decision, Allow)
    else:
        assert isinstance(decision, Deny) and (decision.status, decision.code) == (400, "invalid_host")
