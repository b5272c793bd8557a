"""Stage 2: verification of tokens with plain values, static keys and a fixed clock."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ext_authz import errors
from ext_authz.config.model import Settings
from ext_authz.identity import Verifier, parse_token
from ext_authz.jws import b64url
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Credential
from ext_authz.sources import HeaderToken, ParamToken, TokenSource
from tests.support.idp import hmac_token, tamper_signature, unsigned_token
from tests.support.tokens import ISSUER, NOW, Keys, Mint, claims, clock, make_settings, sign_raw

AUTHORIZATION = HeaderToken("authorization", "Bearer ")


def credential(token: str, location: TokenSource = AUTHORIZATION) -> Credential:
    return Credential(token, (location,))


def verifier(resolver: StaticKeys, s: Settings | None = None) -> Verifier:
    s = s or make_settings()
    return Verifier(s.providers, resolver, max_token_bytes=s.max_token_bytes, clock=clock)


async def verify(resolver: StaticKeys, token: str, s: Settings | None = None) -> object:
    return await verifier(resolver, s).verify(credential(token))


async def rejected(resolver: StaticKeys, token: str, s: Settings | None = None) -> errors.AuthError:
    with pytest.raises(errors.AuthError) as caught:
        await verify(resolver, token, s)
    return caught.value


def segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


@pytest.mark.parametrize("family", ["rsa", "ec", "ed"])
async def test_valid_tokens_of_each_family(resolver: StaticKeys, keys: Keys, mint: Mint, family: str) -> None:
    key = getattr(keys, family)
    principal = await verifier(resolver).verify(credential(mint(key, email="a@example.com")))
    assert principal.provider == "idp"
    assert principal.subject == "alice"
    assert principal.claims["email"] == "a@example.com"


async def test_payload_segment_is_the_signed_one(resolver: StaticKeys, mint: Mint) -> None:
    token = mint()
    principal = await verifier(resolver).verify(credential(token))
    assert principal.payload_segment == token.split(".")[1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": int(NOW) - 61}, errors.TokenExpired),
        ({"exp": int(NOW) - 60}, errors.TokenExpired),
        ({"nbf": int(NOW) + 61}, errors.TokenNotYetValid),
        ({"iat": int(NOW) + 61}, errors.TokenIssuedInFuture),
        ({"exp": None}, errors.InvalidClaim),
        ({"exp": "1900000000"}, errors.InvalidClaim),
        ({"exp": True}, errors.InvalidClaim),
        ({"nbf": "0"}, errors.InvalidClaim),
        ({"aud": "other"}, errors.AudienceMismatch),
        ({"aud": ["other", "x"]}, errors.AudienceMismatch),
        ({"aud": None}, errors.AudienceMismatch),
        ({"aud": 5}, errors.InvalidClaim),
        ({"aud": []}, errors.InvalidClaim),
        ({"iss": "https://evil.example.com/"}, errors.UnknownIssuer),
        ({"iss": ISSUER.rstrip("/")}, errors.UnknownIssuer),
        ({"iss": ["x"]}, errors.UnknownIssuer),
        ({"iss": None}, errors.UnknownIssuer),
    ],
)
async def test_claim_checks(
    resolver: StaticKeys, mint: Mint, overrides: dict[str, Any], expected: type
) -> None:
    assert type(await rejected(resolver, mint(**overrides))) is expected


async def test_clock_skew_edges(resolver: StaticKeys, mint: Mint) -> None:
    v = verifier(resolver)
    for good in (
        {"exp": int(NOW) - 59},
        {"nbf": int(NOW) + 60},
        {"iat": int(NOW) + 60},
        {"aud": ["x", "api"]},
    ):
        await v.verify(credential(mint(**good)))


async def test_expired_says_so(resolver: StaticKeys, mint: Mint) -> None:
    error = await rejected(resolver, mint(exp=int(NOW) - 3600))
    assert "expired" in error.detail and error.status == 401 and error.rfc6750_error == "invalid_token"


async def test_signature_checked_before_claims(resolver: StaticKeys, keys: Keys, mint: Mint) -> None:
    # Signed by an unpublished key under a published kid, and expired: it reads as a bad signature.
    assert type(await rejected(resolver, mint(keys.other_rsa, exp=int(NOW) - 3600))) is errors.BadSignature
    assert type(await rejected(resolver, tamper_signature(mint()))) is errors.BadSignature


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none(resolver: StaticKeys, keys: Keys, alg: str) -> None:
    token = unsigned_token(claims(), headers={"alg": alg, "kid": keys.rsa.kid})
    assert type(await rejected(resolver, token)) is errors.UnsupportedAlgorithm
    assert type(await rejected(resolver, token + "c2ln")) is errors.UnsupportedAlgorithm


async def test_hmac_confusion(resolver: StaticKeys, keys: Keys) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = keys.rsa.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = hmac_token({"alg": "HS256", "typ": "JWT", "kid": keys.rsa.kid}, claims(), pem)
    assert type(await rejected(resolver, token)) is errors.UnsupportedAlgorithm


async def test_alg_must_fit_key_type(resolver: StaticKeys, keys: Keys, mint: Mint) -> None:
    _, payload, sig = mint().split(".")
    # An RS256 signature presented as PS256: the RSA key's JWK says alg RS256, so no key fits...
    as_pss = segment({"alg": "PS256", "kid": keys.rsa.kid})
    assert type(await rejected(resolver, f"{as_pss}.{payload}.{sig}")) is errors.UnknownKey
    # ...and where the JWK has no alg, the key fits but the signature does not verify.
    from ext_authz.keys.jwks import parse_jwks

    unrestricted = {k: v for k, v in keys.rsa.jwk().items() if k != "alg"}
    any_rsa = StaticKeys({"idp": parse_jwks({"keys": [unrestricted]})})
    assert type(await rejected(any_rsa, f"{as_pss}.{payload}.{sig}")) is errors.BadSignature
    # Presented as ES256 under the RSA kid: no EC key has that kid.
    as_ec = segment({"alg": "ES256", "kid": keys.rsa.kid})
    assert type(await rejected(resolver, f"{as_ec}.{payload}.{sig}")) is errors.UnknownKey
    s = make_settings(provider={"algorithms": ["RS256"]})
    assert type(await rejected(resolver, mint(keys.ec), s)) is errors.UnsupportedAlgorithm


@pytest.mark.parametrize("field", ["jku", "x5u", "jwk", "x5c"])
async def test_keys_never_taken_from_the_token(
    resolver: StaticKeys, keys: Keys, mint: Mint, field: str
) -> None:
    attacker = keys.other_rsa
    value: object = attacker.jwk() if field == "jwk" else "https://evil.example.com/k"
    if field == "x5c":
        value = ["MIIB"]
    token = mint(attacker, headers={field: value})
    assert type(await rejected(resolver, token)) is errors.BadSignature


async def test_kid_rules(resolver: StaticKeys, keys: Keys, mint: Mint) -> None:
    assert type(await rejected(resolver, mint(headers={"kid": "unknown"}))) is errors.UnknownKey
    assert type(await rejected(resolver, mint(headers={"kid": 5}))) is errors.MalformedToken
    # No kid: accepted only when exactly one key fits the alg (one RSA key here)...
    import jwt

    no_kid = jwt.encode(claims(), keys.rsa.private_key, algorithm="RS256")
    await verify(resolver, no_kid)
    # ...and refused when two do.
    from ext_authz.keys.jwks import parse_jwks

    second = keys.other_rsa.jwk() | {"kid": "rsa-2"}
    two = StaticKeys({"idp": parse_jwks({"keys": [keys.rsa.jwk(), second]})})
    assert type(await rejected(two, no_kid)) is errors.UnknownKey


@pytest.mark.parametrize(
    ("typ", "settings_overrides", "ok"),
    [
        ("JWT", {}, True),
        ("jwt", {}, True),
        ("at+jwt", {}, True),
        ("application/at+JWT", {}, True),
        (None, {}, True),
        (None, {"require_typ": True}, False),
        ("JOSE", {}, False),
        ("secevent+jwt", {}, False),
        ("secevent+jwt", {"token_types": ["secevent+jwt"]}, True),
        (5, {}, False),
    ],
)
async def test_typ(
    resolver: StaticKeys, keys: Keys, typ: object, settings_overrides: dict[str, Any], ok: bool
) -> None:
    header: dict[str, Any] = {"alg": "RS256", "kid": keys.rsa.kid}
    if typ is not None:
        header["typ"] = typ
    token = sign_raw(header, claims(), keys.rsa)
    s = make_settings(provider=settings_overrides)
    if ok:
        await verify(resolver, token, s)
    else:
        assert type(await rejected(resolver, token, s)) is errors.TokenTypeNotAccepted


async def test_crit_is_rejected(resolver: StaticKeys, keys: Keys) -> None:
    token = sign_raw({"alg": "RS256", "kid": keys.rsa.kid, "crit": ["exp"], "exp": 1}, claims(), keys.rsa)
    assert type(await rejected(resolver, token)) is errors.UnsupportedCritical


@pytest.mark.parametrize(
    "extra", [{"b64": True}, {"b64": False}, {"b64": True, "crit": ["b64"]}, {"b64": False, "crit": ["b64"]}]
)
async def test_b64_is_rejected_with_or_without_crit(
    resolver: StaticKeys, keys: Keys, extra: dict[str, Any]
) -> None:
    # Validly signed over the encoded payload, as an implementation without RFC 7797 would check
    # it: only the b64 member can deny it.
    token = sign_raw({"alg": "RS256", "kid": keys.rsa.kid, **extra}, claims(), keys.rsa)
    error = await rejected(resolver, token)
    assert type(error) is errors.UnsupportedB64Header
    assert (error.status, error.rfc6750_error, error.code) == (401, "invalid_token", "b64_header_unsupported")
    await verify(resolver, sign_raw({"alg": "RS256", "kid": keys.rsa.kid}, claims(), keys.rsa))


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "!!!.e30.e30",
        "e30.e30.!!!",
        "e30=.e30.AA",  # padding is not base64url (RFC 7515 §2)
        "W10.e30.AA",  # header is a JSON array
        "bnVsbA.e30.AA",  # header is null
        "e30.bm90IGpzb24.AA",  # payload is not JSON
        "x.e30.AA",  # one-character segment cannot be base64
        "eyJhbGciOiJSUzI1NiIsImFsZyI6Im5vbmUifQ.e30.AA",  # duplicate "alg"
        "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOk5hTn0.AA",  # NaN
        "eyJhbGciOiJSUzI1NiJ9.//8.AA",  # not UTF-8
    ],
)
async def test_malformed_tokens(resolver: StaticKeys, token: str) -> None:
    error = await rejected(resolver, token)
    assert isinstance(error, errors.MalformedToken)


async def test_jwe_says_so(resolver: StaticKeys) -> None:
    error = await rejected(resolver, "a.b.c.d.e")
    assert "encrypted" in error.detail


async def test_duplicate_claims_rejected(resolver: StaticKeys, keys: Keys) -> None:
    payload = f'{{"sub":"alice","sub":"admin","iss":"{ISSUER}","aud":"api","exp":{int(NOW) + 60}}}'
    token = sign_raw({"alg": "RS256", "kid": keys.rsa.kid}, payload, keys.rsa)
    assert isinstance(await rejected(resolver, token), errors.MalformedToken)


async def test_size_limit_checked_first(resolver: StaticKeys) -> None:
    s = make_settings(max_token_bytes=1024)
    assert type(await rejected(resolver, "a" * 1025, s)) is errors.TokenTooLarge
    assert len(parse_token("e30.e30." + "A" * 100, 1024).signature) == 75


async def test_bad_signature_encodings(resolver: StaticKeys, keys: Keys, mint: Mint) -> None:
    head, payload, _ = mint(keys.ec).split(".")
    for signature in ("", "AAAA", "A" * 86, segment({"r": 0})):
        assert isinstance(await rejected(resolver, f"{head}.{payload}.{signature}"), errors.InvalidToken)
    zero = b64url(bytes(64))  # r = s = 0
    assert type(await rejected(resolver, f"{head}.{payload}.{zero}")) is errors.BadSignature


async def test_keys_unavailable_is_not_a_401(mint: Mint) -> None:
    error = await rejected(StaticKeys({}), mint())
    assert isinstance(error, errors.KeysUnavailable) and error.status == 503


async def test_token_location_must_be_accepted_by_the_issuer(resolver: StaticKeys, mint: Mint) -> None:
    v = verifier(resolver)
    with pytest.raises(errors.TokenLocationNotAccepted):
        await v.verify(credential(mint(), ParamToken("access_token")))
    s = make_settings(provider={"from_params": ["access_token"]})
    await verifier(resolver, s).verify(credential(mint(), ParamToken("access_token")))


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ('{"alg":"RS256"}', True),
        (' \n{ "alg" : "RS256" }\t ', True),  # JSON white space around and inside: still one object
        ('{"alg":"RS256"}x', False),  # trailing data
        ('{"alg":"RS256"}{}', False),
        ('["RS256"]', False),  # not an object
        ('"RS256"', False),
        ("", False),
        ('{"alg":"RS256","alg":"none"}', False),  # a duplicate member
        ('{"n":1e400}', False),  # not a finite number
        ('{"n":' + "9" * 21 + "}", False),  # more digits than any JWT number needs
        ('{"s":"\\ud800"}', False),  # a lone surrogate
    ],
)
def test_segment_json_is_one_object(header: str, accepted: bool) -> None:
    token = f"{b64url(header.encode())}.e30.AAAA"
    if accepted:
        assert parse_token(token, 4096).header == {"alg": "RS256"}
    else:
        with pytest.raises(errors.MalformedToken):
            parse_token(token, 4096)


@pytest.mark.parametrize(
    "token", ["e30\n.e30.AAAA", "e30.e30.AAAA\n", "e30.e3 0.AAAA", "e3=.e30.AAAA", "e30.e30.AA+/"]
)
def test_segments_are_strictly_base64url(token: str) -> None:
    with pytest.raises(errors.MalformedToken):
        parse_token(token, 4096)
