"""Property tests (hypothesis) over the whole Check path: CheckRequest in, CheckResponse out.

For arbitrary requests and arbitrary token bytes the servicer always answers with a well-formed
CheckResponse, never raises, and never allows a route that needs a token unless the request
carries a token validly signed by the test issuer. Valid tokens with random claims are allowed,
and a single-byte change to one is allowed only when it leaves the signed bytes and the decoded
signature unchanged: JWS signs the base64url TEXT of header and payload (RFC 7515 §5.2), so any
change there is fatal, while the last signature character carries bits that base64url decoders
ignore (RFC 4648 §3.5), so 2**k spellings of one signature decode to the same bytes.

Claims with lone surrogates, integers beyond the double range and non-finite numbers are refused
as malformed tokens (tests/unit/test_attacks.py pins each).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import string
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_authz import jws
from ext_authz._proto.envoy.config.core.v3 import base_pb2
from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz.compiled import compile
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.pipeline import Pipeline
from ext_authz.transport.servicer import AuthorizationServicer
from tests.support.attacks import OWNED, PROVIDER, RULES, assert_well_formed, check, response_headers
from tests.support.idp import SigningKey, b64url
from tests.support.tokens import NOW, Keys, claims, clock, make_settings

CheckRequest = external_auth_pb2.CheckRequest
HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"
REGISTERED = frozenset({"iss", "aud", "exp", "nbf", "iat"})


class Harness:
    """One event loop and two servicers: every route needs a token (`strict`), or the attack
    corpus's rules with anonymous, dry-run and rule-header routes (`mixed`)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        resolver = StaticKeys({"idp": parse_jwks(keys.jwks())})
        self.strict = AuthorizationServicer(
            Pipeline(compile(make_settings(provider=PROVIDER)), resolver, clock=clock)
        )
        self.mixed = AuthorizationServicer(
            Pipeline(compile(make_settings(provider=PROVIDER, rules=RULES)), resolver, clock=clock)
        )
        self.runner = asyncio.Runner()

    def check(
        self, servicer: AuthorizationServicer, request: CheckRequest
    ) -> external_auth_pb2.CheckResponse:
        response = self.runner.run(check(servicer, request))
        assert_well_formed(response)
        return response


@pytest.fixture(scope="module")
def harness(keys: Keys) -> Iterator[Harness]:
    h = Harness(keys)
    try:
        yield h
    finally:
        h.runner.close()


# ---- generators ----

# Protobuf strings are UTF-8: no lone surrogates (Envoy never sends them).
TEXT = st.characters(exclude_categories=["Cs"])
texts = st.text(TEXT, max_size=60)
HEADER_NAMES = [
    "authorization", "cookie", ":path", ":method", ":authority", "content-type", "x-request-id",
    *OWNED,
]  # fmt: skip
header_names = st.one_of(st.sampled_from(HEADER_NAMES), st.text(TEXT, max_size=20))
b64_segments = st.text(B64URL_ALPHABET, max_size=80)
token_shaped = st.builds("{}.{}.{}".format, b64_segments, b64_segments, b64_segments)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT, max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(TEXT, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(TEXT, max_size=10), json_values, max_size=6)


@st.composite
def structured_tokens(draw: st.DrawFn) -> str:
    """Three segments that decode: JSON header and payload (sometimes nearly valid), random signature."""
    header = draw(json_objects)
    if draw(st.booleans()):
        header.update(alg=draw(st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", "PS256"])))
        header.update(kid=draw(st.sampled_from(["rsa-1", "ec-1", "ed-1", "other"])))
    payload = {**claims(), **draw(json_objects)} if draw(st.booleans()) else draw(json_objects)
    signature = draw(st.binary(max_size=300))
    return ".".join(b64url(json.dumps(p).encode()) for p in (header, payload)) + "." + b64url(signature)


token_strings = st.one_of(
    st.text(TEXT, max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    token_shaped,
    structured_tokens(),
)
authorizations = st.one_of(
    texts,
    st.builds(
        "{} {}".format, st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer "]), token_strings
    ),
    st.lists(token_strings, min_size=2, max_size=3).map(lambda ts: ", ".join(f"Bearer {t}" for t in ts)),
)
paths = st.one_of(
    st.sampled_from(
        ["/", "/orders", "/public/x", "/admin/x", "/dry/x", "/tenant/x", "", "*", "/public/../admin"]
    ),
    st.text(TEXT, max_size=40),
    st.builds("/{}?access_token={}".format, st.text(TEXT, max_size=10), token_strings),
)


@st.composite
def check_requests(draw: st.DrawFn, authorization: st.SearchStrategy[str] = authorizations) -> CheckRequest:
    headers = draw(st.dictionaries(header_names, texts, max_size=8))
    if draw(st.booleans()):
        headers["authorization"] = draw(authorization)
    http = HttpRequest(
        method=draw(st.one_of(st.sampled_from(["GET", "POST", "get", ""]), texts)),
        path=draw(paths),
        host=draw(st.one_of(st.just("api.example.com"), texts)),
    )
    if draw(st.booleans()):
        http.headers.update(headers)
    else:  # encode_raw_headers: every line its own entry, any case, raw bytes
        entries = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
        entries += [
            base_pb2.HeaderValue(key=k, raw_value=v)
            for k, v in draw(st.lists(st.tuples(header_names, st.binary(max_size=80)), max_size=6))
        ]
        http.header_map.CopyFrom(base_pb2.HeaderMap(headers=entries))
    attributes = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        context_extensions=draw(st.dictionaries(texts, texts, max_size=3)),
    )
    return draw(st.sampled_from([CheckRequest(attributes=attributes), CheckRequest()]))


def bearer_request(token: str, *, raw: bool, path: str = "/orders") -> CheckRequest:
    http = HttpRequest(method="GET", path=path, host="api.example.com")
    value = f"Bearer {token}"
    if raw:
        raw_value = value.encode("latin-1") if max(map(ord, value)) < 256 else value.encode()
        http.header_map.CopyFrom(
            base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="authorization", raw_value=raw_value)])
        )
    else:
        http.headers["authorization"] = value
    request = attribute_context_pb2.AttributeContext.Request(http=http)
    return CheckRequest(attributes=attribute_context_pb2.AttributeContext(request=request))


def _signing_keys(keys: Keys) -> list[SigningKey]:
    return [keys.rsa, keys.ec, keys.ed]


@st.composite
def valid_tokens(draw: st.DrawFn, keys: Keys) -> str:
    """Signed by one of the issuer's keys, with random extra claims (identity claims included)."""
    key = draw(st.sampled_from(_signing_keys(keys)))
    names = st.one_of(
        st.sampled_from(["sub", "email", "note", "roles", "tenant", "scope"]), st.text(TEXT, max_size=10)
    )
    extra = draw(st.dictionaries(names.filter(lambda n: n not in REGISTERED), json_values, max_size=6))
    payload = {**claims(), **extra}
    if draw(st.booleans()):
        payload["nbf"] = int(NOW) - draw(st.integers(0, 10**6))
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid}
    if draw(st.booleans()):
        header["typ"] = draw(st.sampled_from(["JWT", "at+jwt", "application/jwt"]))
    if draw(st.booleans()) and key.alg != "RS256":
        del header["kid"]  # one key fits ES256 and EdDSA each: no ambiguity
    return sign(header, payload, key)


def sign(header: Mapping[str, Any], payload: Mapping[str, Any], key: SigningKey) -> str:
    body = json.dumps(payload, ensure_ascii=False).encode()
    return jws.sign(json.dumps(header).encode(), body, key.private_key, key.alg)


def decodes_to(segment: str) -> bytes | None:
    """The bytes a base64url segment stands for, trailing bits ignored; None if it is not one."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", segment) or len(segment) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def same_signed_token(original: str, mutated: str) -> bool:
    """True when `mutated` has the same signing input and a signature with the same bytes."""
    head, payload, signature = original.split(".")
    parts = mutated.split(".")
    if len(parts) != 3 or parts[:2] != [head, payload]:
        return False
    return decodes_to(parts[2]) == decodes_to(signature)


# ---- properties ----


@FUZZ
@given(request=check_requests())
def test_arbitrary_requests_never_pass_a_route_that_needs_a_token(
    harness: Harness, request: CheckRequest
) -> None:
    response = harness.check(harness.strict, request)
    assert response.status.code != 0
    assert response.denied_response.status.code in (400, 401, 403)


@FUZZ
@given(request=check_requests())
def test_arbitrary_requests_on_mixed_routes_never_keep_a_forged_identity(
    harness: Harness, request: CheckRequest
) -> None:
    response = harness.check(harness.mixed, request)
    if response.status.code != 0:
        return
    # Allowed without a valid token: only anonymous or dry-run routes; whatever the client sent
    # in an owned header is either replaced by ours or removed.
    ok = response.ok_response
    assert not (set(response_headers(ok.headers)) & set(OWNED)), "identity headers without a valid token"
    http = request.attributes.request.http
    sent = {k.lower() for k in http.headers} | {e.key.lower() for e in http.header_map.headers}
    assert sent & set(OWNED) <= set(ok.headers_to_remove)


@FUZZ
@given(token=token_strings, raw=st.booleans(), path=st.sampled_from(["/orders", "/admin/x", "/tenant/x"]))
def test_arbitrary_token_text_is_never_allowed(harness: Harness, token: str, raw: bool, path: str) -> None:
    for servicer in (harness.strict, harness.mixed):
        response = harness.check(servicer, bearer_request(token, raw=raw, path=path))
        assert response.status.code != 0
        assert response.denied_response.status.code in (400, 401, 403)


@FUZZ
@given(data=st.data())
def test_valid_tokens_with_random_claims_are_allowed(harness: Harness, data: st.DataObject) -> None:
    token = data.draw(valid_tokens(harness.keys))
    response = harness.check(harness.strict, bearer_request(token, raw=data.draw(st.booleans())))
    assert response.status.code == 0, response.status.message
    emitted = response_headers(response.ok_response.headers)
    assert emitted["x-jwt-payload"] == token.split(".")[1]


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_single_byte_mutations_of_a_valid_token(harness: Harness, data: st.DataObject) -> None:
    token = data.draw(valid_tokens(harness.keys))
    position = data.draw(st.integers(0, len(token) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != ord(token[position])))
    mutated = token[:position] + chr(byte) + token[position + 1 :]
    response = harness.check(harness.strict, bearer_request(mutated, raw=data.draw(st.booleans())))
    assert (response.status.code == 0) is same_signed_token(token, mutated), (position, chr(byte))


@pytest.mark.parametrize("key_name", ["rsa", "ec", "ed"])
@pytest.mark.parametrize("segment", [0, 1, 2], ids=["header", "payload", "signature"])
def test_every_spelling_of_a_last_character(harness: Harness, key_name: str, segment: int) -> None:
    """Exhaustive at the one place base64url is not canonical: the last character of a segment.

    Header and payload: every other character is refused, even one that decodes to the same
    JSON, since the signature covers the text. Signature: exactly the characters that decode to
    the same bytes are accepted (64, 86 or 342 characters for 64 or 256 bytes leave 4 spare bits,
    so 16 spellings), every other one refused.
    """
    key: SigningKey = getattr(harness.keys, key_name)
    token = sign({"alg": key.alg, "kid": key.kid}, claims(), key)
    parts = token.split(".")
    allowed = set()
    for ch in B64URL_ALPHABET:
        mutated_parts = list(parts)
        mutated_parts[segment] = parts[segment][:-1] + ch
        mutated = ".".join(mutated_parts)
        response = harness.check(harness.strict, bearer_request(mutated, raw=False))
        assert (response.status.code == 0) is same_signed_token(token, mutated), ch
        if response.status.code == 0:
            allowed.add(ch)
    assert parts[segment][-1] in allowed  # the token itself
    assert len(allowed) == (16 if segment == 2 else 1)
