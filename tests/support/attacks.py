"""The attack corpus's building blocks (tests/unit/test_attacks.py): CheckRequests as Envoy sends
them, the servicer they go through, what any answer must look like, and `Forge`, which builds
tokens byte by byte with the issuer's real keys and an attacker's. Shared with the Envoy attack
tests, the differential tests, the property tests and the fuzzers.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

from ext_authz import jws
from ext_authz._proto.envoy.config.core.v3 import base_pb2
from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz.compiled import compile
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.pipeline import Pipeline
from ext_authz.response import underscore_spellings
from ext_authz.transport.servicer import AuthorizationServicer
from tests.support.idp import SigningKey, b64url, b64url_decode, public_jwk
from tests.support.tokens import Keys, claims, clock, make_settings

HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest
CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# P-256 group order: an ECDSA r or s must lie in [1, n-1] (SEC 1 §4.1.4).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

OWNED = ("x-user-id", "x-user-email", "x-note", "x-roles", "x-jwt-payload", "x-tenant")
OWNED_SPELLINGS = {spelling for name in OWNED for spelling in underscore_spellings(name)}
PROVIDER: dict[str, Any] = {
    "from_params": ["access_token"],
    "claim_to_headers": [
        {"header": "x-user-id", "claim": "sub"},
        {"header": "x-user-email", "claim": "email"},
        {"header": "x-note", "claim": "note"},
        {"header": "x-roles", "claim": "roles"},
    ],
    "payload_header": "x-jwt-payload",
}
RULES: list[Any] = [
    {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {"name": "dry", "match": {"paths": ["/dry/*"]}, "require": {"scopes": ["admin"]}, "mode": "dry_run"},
    {
        "name": "tenant",
        "match": {"paths": ["/tenant/*"]},
        "require": {},
        "claim_to_headers": [{"header": "x-tenant", "claim": "tenant"}],
    },
    {"match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
    {"match": {"paths": ["/*"]}, "require": {}},
]


def build_servicer(keys: Keys, **top: Any) -> AuthorizationServicer:
    resolver = StaticKeys({"idp": parse_jwks(keys.jwks())})
    return AuthorizationServicer(
        Pipeline(compile(make_settings(provider=PROVIDER, rules=RULES, **top)), resolver, clock=clock)
    )


async def check(servicer: AuthorizationServicer, request: CheckRequest) -> CheckResponse:
    # The servicer reads only the call's deadline from its gRPC context.
    return await servicer.Check(request, cast(Any, NoDeadline()))


class NoDeadline:
    def time_remaining(self) -> float | None:
        return None


def check_request(
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "/orders",
    method: str = "GET",
    host: str = "api.example.com",
    raw: Sequence[tuple[str, bytes]] | None = None,
) -> CheckRequest:
    """A CheckRequest as Envoy sends it: the `headers` map, or with `raw` the `header_map` entries
    of `encode_raw_headers: true` (one per header line, duplicates kept)."""
    http = HttpRequest(method=method, path=path, host=host, headers=dict(headers or {}))
    if raw is not None:
        entries = [base_pb2.HeaderValue(key=k, raw_value=v) for k, v in raw]
        http.header_map.CopyFrom(base_pb2.HeaderMap(headers=entries))
    attributes = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http)
    )
    return CheckRequest(attributes=attributes)


def bearer(token: str, path: str = "/orders", **headers: str) -> CheckRequest:
    return check_request({"authorization": f"Bearer {token}", **headers}, path=path)


def response_headers(options: Sequence[base_pb2.HeaderValueOption]) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def challenge_params(value: str) -> dict[str, str]:
    assert value.startswith("Bearer "), value
    return dict(_CHALLENGE_PARAM.findall(value))


def is_legal_field_value(value: str) -> bool:
    """RFC 9110 §5.5 field-value as Envoy forwards it: no control characters (Envoy itself fails
    the request on NUL, CR and LF), no leading or trailing blanks, encodable as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) and value == value.strip(" \t")


def assert_well_formed(response: CheckResponse) -> None:
    """What Envoy needs from any answer: OK with legal header mutations, or a complete denial."""
    response.SerializeToString()  # every string is valid UTF-8
    if response.status.code == 0:
        assert response.HasField("ok_response") and not response.HasField("denied_response")
        for option in response.ok_response.headers:
            assert option.append_action == OVERWRITE, option
            assert option.header.key == option.header.key.lower() and option.header.key
            assert is_legal_field_value(option.header.value), option.header
        return
    assert response.status.code in (7, 14, 16), response.status  # never INTERNAL (13): a bug
    assert response.HasField("denied_response") and not response.HasField("ok_response")
    denied = response.denied_response
    assert denied.status.code in (400, 401, 403, 503), denied.status
    headers = response_headers(denied.headers)
    assert all(is_legal_field_value(v) for v in headers.values()), headers
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    body = json.loads(denied.body)
    assert set(body) == {"error", "error_description"}
    if denied.status.code in (400, 401):
        challenge_params(headers["www-authenticate"])


def assert_denied(
    response: CheckResponse,
    status: int,
    error: str | None,
    code: str | None,
    secrets: Sequence[str] = (),
) -> None:
    """A clean denial with this status, RFC 6750 error (None: a challenge without one) and code."""
    assert_well_formed(response)
    assert response.status.code != 0, "allowed"
    denied = response.denied_response
    observed = (denied.status.code, response.status.message)
    assert denied.status.code == status, observed
    headers = response_headers(denied.headers)
    if status in (400, 401):
        params = challenge_params(headers["www-authenticate"])
        assert params.get("error") == error, (headers["www-authenticate"], observed)
        assert response.status.code == 16
    if code is not None:
        assert response.status.message == code, observed
    for secret in secrets:
        assert secret not in denied.body
        assert all(secret not in v for v in headers.values())
        assert secret not in response.status.message


# ---- forging tokens ----


def json_segment(value: object) -> str:
    return b64url(json.dumps(value).encode())


class Forge:
    """Builds tokens byte by byte: the issuer's real keys (`keys`) and an attacker's.

    `claims` gives a valid claim set (overrides as keywords; None leaves a claim out): by default
    for the unit tests' fixed clock, or for real time and a real issuer in integration tests.
    """

    def __init__(self, keys: Keys, claims: Callable[..., dict[str, Any]] = claims) -> None:
        self.keys = keys
        self.claims = claims
        # The attacker's RSA key claims the real kid; its public key is not in the issuer's JWKS.
        self.attacker = keys.other_rsa
        self.attacker_p384 = SigningKey("ec-1", "ES384", ec.generate_private_key(ec.SECP384R1()))
        self.attacker_cert = _self_signed(self.attacker)

    def header(self, key: SigningKey, **overrides: Any) -> dict[str, Any]:
        header = {"alg": key.alg, "typ": "JWT", "kid": key.kid, **overrides}
        return {k: v for k, v in header.items() if v is not ABSENT}

    def token(
        self, key: SigningKey | None = None, header: Mapping[str, Any] | None = None, **claim: Any
    ) -> str:
        """Signed by `key` (default: the issuer's RSA key) over the header and default claims."""
        key = key or self.keys.rsa
        full = {k: v for k, v in {**self.header(key), **(header or {})}.items() if v is not ABSENT}
        payload = {k: v for k, v in self.claims(**claim).items() if v is not ABSENT}
        return self.raw(json.dumps(full), json.dumps(payload, ensure_ascii=False), key)

    def raw(self, header_json: str, payload_json: str, key: SigningKey | None = None) -> str:
        """Signed over exactly these JSON texts (duplicate members, odd numbers, ...)."""
        key = key or self.keys.rsa
        return jws.sign(header_json.encode(), payload_json.encode(), key.private_key, key.alg)

    def unsigned(self, header: Mapping[str, Any], signature: bytes = b"", **claim: Any) -> str:
        return f"{json_segment(dict(header))}.{json_segment(self.claims(**claim))}.{b64url(signature)}"

    def hmac(self, alg: str, secret: bytes, key: SigningKey | None = None) -> str:
        """Algorithm confusion: HS* keyed with the issuer's PUBLIC key material."""
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        key = key or self.keys.rsa
        signing_input = f"{json_segment(self.header(key, alg=alg))}.{json_segment(self.claims())}"
        signature = hmac.new(secret, signing_input.encode(), digest).digest()
        return f"{signing_input}.{b64url(signature)}"

    def public_pem(self, key: SigningKey) -> bytes:
        return key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_der(self, key: SigningKey) -> bytes:
        return key.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def attacker_signed(self, **header: Any) -> str:
        """Signed by the attacker's key, with header members pointing at that key."""
        return self.token(self.attacker, header)

    def attacker_jwk(self) -> dict[str, Any]:
        return public_jwk(self.attacker.public_key, kid=self.attacker.kid, alg="RS256")

    def x5c(self) -> list[str]:
        der = self.attacker_cert.public_bytes(serialization.Encoding.DER)
        return [base64.b64encode(der).decode()]

    def ec_signature(self, r: int | None = None, s: int | None = None, *, raw: bytes | None = None) -> str:
        """An ES256 token for the real EC key whose signature has r and/or s replaced (or raw bytes)."""
        token = self.token(self.keys.ec)
        head, payload, signature = token.split(".")
        real = b64url_decode(signature)
        if raw is None:
            real_r, real_s = int.from_bytes(real[:32], "big"), int.from_bytes(real[32:], "big")
            raw = (real_r if r is None else r).to_bytes(32, "big") + (real_s if s is None else s).to_bytes(
                32, "big"
            )
        return f"{head}.{payload}.{b64url(raw)}"

    def ec_der_signature(self) -> str:
        token = self.token(self.keys.ec)
        head, payload, signature = token.split(".")
        real = b64url_decode(signature)
        der = encode_dss_signature(int.from_bytes(real[:32], "big"), int.from_bytes(real[32:], "big"))
        return f"{head}.{payload}.{b64url(der)}"

    def with_signature(self, token: str, signature: bytes) -> str:
        head, payload, _ = token.split(".")
        return f"{head}.{payload}.{b64url(signature)}"


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()  # a claim or header member left out entirely


def _self_signed(key: SigningKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker.example")])
    now = datetime.datetime.now(datetime.UTC)
    private = key.private_key
    assert not isinstance(private, ec.EllipticCurvePrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )


def jwe_token(alg: str = "RSA-OAEP") -> str:
    header = json_segment({"alg": alg, "enc": "A256GCM", "kid": "rsa-1"})
    return ".".join([header, b64url(b"k" * 256), b64url(b"i" * 12), b64url(b"c" * 40), b64url(b"t" * 16)])


def nested_token(f: Forge, outer: SigningKey | None) -> str:
    inner = f.token()
    header = {"alg": "RS256", "kid": "rsa-1", "typ": "JWT", "cty": "JWT"}
    if outer is None:  # the attacker wraps a genuine token in an unsigned envelope
        return f"{json_segment({'alg': 'none', 'cty': 'JWT'})}.{b64url(inner.encode())}."
    return f.raw(json.dumps(header), inner, outer)


def unencoded_payload_token(f: Forge, *, crit: bool) -> str:
    """RFC 7797 `b64: false`: the signature covers the payload unencoded, which no compact-JWS
    signer (ext_authz.jws.sign included) produces, so it is built by hand."""
    header = {"alg": "RS256", "kid": "rsa-1", "b64": False, **({"crit": ["b64"]} if crit else {})}
    payload = json.dumps(f.claims())
    head = json_segment(header)
    signature = get_default_algorithms()["RS256"].sign(f"{head}.{payload}".encode(), f.keys.rsa.private_key)
    middle = payload if crit else b64url(payload.encode())
    return f"{head}.{middle}.{b64url(signature)}"
