"""Issue 16 review, second pass (outside attacker): the HTTP listener's dialects with DPoP and
certificate binding, the sources, caches, dry-run/anonymous routes. Each test FAILS on 720d462
and describes the expected behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.compiled import compile
from ext_authz.config.parse import parse
from ext_authz.dpop import NonceIssuer
from ext_authz.keys.jwks import KeySet
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from ext_authz.transport.dialects import Dialects
from tests.support.dpop import DPoPKey
from tests.support.tokens import ISSUER, NOW, Mint, clock


def settings(provider: dict[str, Any], rules: list[Any] | None = None, **top: Any) -> Any:
    p: dict[str, Any] = {"name": "idp", "issuer": ISSUER, "audiences": ["api"], "jwks_uri": f"{ISSUER}jwks"}
    p.update(provider)
    document: dict[str, Any] = {"providers": [p], **top}
    document["rules"] = rules if rules is not None else [{"match": {"paths": ["/*"]}, "require": {}}]
    return parse(document)


def pipeline(
    key_set: KeySet, provider: dict[str, Any], rules: list[Any] | None = None, **top: Any
) -> Pipeline:
    s = settings(provider, rules, **top)
    return Pipeline(
        compile(s, clock),
        StaticKeys({"idp": key_set}),
        clock=clock,
        dpop_nonces=NonceIssuer(b"k" * 32, 300, clock),
    )


# ---- 1. the envoy (and nginx, forward_auth) dialect takes any X-Forwarded-Proto as the scheme ----


@pytest.mark.parametrize("dialect", ["envoy", "nginx", "forward_auth"])
async def test_x_forwarded_proto_cannot_move_the_htu_to_another_path(
    key_set: KeySet, mint: Mint, dialect: str
) -> None:
    """The dialects take `x-forwarded-proto` as the scheme after .strip().lower(), whatever it
    holds. binding._dpop builds the htu as f"{scheme}://{host}{path}"; normalise_htu drops query
    and fragment. So X-Forwarded-Proto: "https://api.example.com/orders#" makes the request URL
    "https://api.example.com/orders#://api.example.com/admin/delete", whose comparison form is
    https://api.example.com/orders: a proof made for GET /orders (or for another origin, with
    another host in the forged scheme: a malicious resource server replaying what a client sent
    it, the attack htu exists for, RFC 9449 §11.1) is accepted for GET /admin/delete. In the envoy
    dialect X-Forwarded-Proto is whatever Envoy forwards (a client's own copy unless the HCM is an
    edge with use_remote_address); in nginx whatever the client sent when the location does not
    set it. Expected: a scheme other than http/https is no scheme (400, or the proof refused)."""
    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = pipeline(key_set, {"dpop": "required"})
    proof = holder.proof("GET", "https://api.example.com/orders", token, iat=NOW)
    headers = {
        "host": "api.example.com",
        "authorization": f"DPoP {token}",
        "dpop": proof,
        "x-forwarded-proto": "https://api.example.com/orders#",
    }
    if dialect == "nginx":
        headers |= {"x-original-method": "GET", "x-original-uri": "/admin/delete"}
        rest = ""
    elif dialect == "forward_auth":
        headers |= {
            "x-forwarded-method": "GET",
            "x-forwarded-uri": "/admin/delete",
            "x-forwarded-host": "api.example.com",
        }
        rest = ""
    else:
        rest = "/admin/delete"
    dialects = Dialects(settings({"dpop": "required"}).http)
    try:
        req = dialects.to_request(dialect, rest, "GET", "", dict(headers))
    except ValueError:
        return  # refused as a malformed authorization request: fine
    assert req.path == "/admin/delete"
    decision = await p.decide(req)
    assert isinstance(decision, Deny), "a proof for GET /orders was accepted for GET /admin/delete"


# ---- 2. a reload that widens dpop_proof_max_age_seconds reopens the replay window ----


async def test_a_proof_seen_before_a_reload_is_no_fresh_proof_after_it(key_set: KeySet, mint: Mint) -> None:
    """server.py keeps one ReplayCache across reloads so that a reload is no replay window. But
    each jti is remembered only for iat + the *old* dpop_proof_max_age_seconds (+1 s)
    (replay_ttl_seconds); check_proof judges iat with the *new* one. A reload from 60 s to 600 s
    (the configured maximum) lets every proof seen in the minute before it be replayed, once its
    short entry has expired, for up to ten minutes: the proof below (iat = now - 50, remembered
    until now + 11) is accepted again at now + 15. Expected: a proof used once stays refused for
    as long as any config could accept its iat (remember it for the largest window, 600 s, or
    re-check seen jtis against the new window)."""
    from ext_authz.dpop import ReplayCache

    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint}, exp=int(NOW) + 3600)
    replays = ReplayCache()
    proof = holder.proof("GET", "https://api.example.com/orders", token, iat=NOW - 50)
    req = Request(
        "GET", "/orders", host="api.example.com", scheme="https",
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )  # fmt: skip
    before = Pipeline(
        compile(settings({"dpop": "required"}), clock),
        StaticKeys({"idp": key_set}),
        clock=clock,
        replays=replays,
    )
    assert isinstance(await before.decide(req), Allow)
    assert isinstance(await before.decide(req), Deny)  # a replay, refused

    def later() -> float:
        return NOW + 15

    reloaded = settings({"dpop": "required", "dpop_proof_max_age_seconds": 600})
    after = Pipeline(compile(reloaded, later), StaticKeys({"idp": key_set}), clock=later, replays=replays)
    decision = await after.decide(req)
    assert isinstance(decision, Deny), "the proof used before the reload was accepted again after it"


# ---- 3. an introspection answer's over-long integer: a 500 for that token's every request ----


async def test_an_over_long_integer_in_an_introspection_answer_does_not_break_the_answer(
    key_set: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """identity._parse_int refuses a JWT integer of more than 20 digits ("it could not go into a
    header or dynamic metadata"); an introspection answer goes through keys.fetch.decode_json
    (plain json.loads), which keeps any integer up to Python's 4300 digits, and the first review's
    guard (json.dumps(allow_nan=False)) passes it. The Allow carries the claims in dynamic
    metadata, and protobuf's Struct.update converts the number to a double: OverflowError ("int
    too large to convert to float") in to_response / serialized_response, which the servicer
    answers 500 internal_error on every request with that token. An IdP echoing a user- or
    client-chosen member (a custom attribute, an extension claim) is enough. Expected: the answer
    refused as malformed (invalid_claim), as a JWT would be; in no case an exception at
    serialization."""
    import json

    from ext_authz.config.model import IntrospectionSettings, ProviderSettings
    from ext_authz.introspection import Introspected, _answer
    from ext_authz.transport.adapter import to_response

    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "s3cret")
    employee_no = "1" + "0" * 400  # a 401-digit integer, as the IdP's JSON text carries it
    text = (
        f'{{"active": true, "sub": "bob", "aud": "api", "iss": "{ISSUER}", "exp": {int(NOW) + 60}, '
        f'"employee_no": {employee_no}}}'
    )
    body = json.loads(text)  # what decode_json makes of the IdP's answer
    answer_settings = IntrospectionSettings(
        endpoint="https://idp.example.com/introspect", client_id="x", client_secret="y"
    )

    class Answering:
        def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
            return None

        async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
            return _answer(200, body, answer_settings, NOW)[0]

    s = settings(
        {"introspection": {"client_id": "ext-authz", "client_secret_env": "TEST_INTROSPECTION_SECRET"}}
    )
    p = Pipeline(compile(s, clock), StaticKeys({"idp": key_set}), clock=clock, introspector=Answering())
    decision = await p.decide(
        Request(
            "GET",
            "/orders",
            host="api.example.com",
            scheme="https",
            headers={"authorization": "Bearer opaque-1"},
        )
    )
    to_response(decision).SerializeToString()  # what the servicer sends Envoy


async def test_a_proof_seen_before_a_reload_that_renames_its_provider_stays_used(
    key_set: KeySet, mint: Mint
) -> None:
    """The same replay window by another reload: replay_key digests (provider *name*, jkt, jti),
    so a reload that renames the provider (same issuer, same keys: the same tokens) makes every
    proof seen under the old name a fresh one under the new name, within its iat window. The
    jti is unique per key (RFC 9449 §11.1) whatever we call its issuer. Expected: refused as a
    replay after the reload too (key the cache by issuer, or by jkt and jti alone)."""
    from ext_authz.dpop import ReplayCache

    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    replays = ReplayCache()
    proof = holder.proof("GET", "https://api.example.com/orders", token, iat=NOW)
    req = Request(
        "GET", "/orders", host="api.example.com", scheme="https",
        headers={"authorization": f"DPoP {token}", "dpop": proof},
    )  # fmt: skip
    before = Pipeline(
        compile(settings({"dpop": "required"}), clock),
        StaticKeys({"idp": key_set}),
        clock=clock,
        replays=replays,
    )
    assert isinstance(await before.decide(req), Allow)
    renamed = settings({"name": "bank", "dpop": "required"})
    after = Pipeline(compile(renamed, clock), StaticKeys({"bank": key_set}), clock=clock, replays=replays)
    decision = await after.decide(req)
    assert isinstance(decision, Deny), "the proof used before the reload was accepted again after it"


async def test_an_over_long_exp_in_an_introspection_answer_is_no_crash(
    key_set: KeySet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same integer, as the answer's exp: introspection._answer computes the cache time as
    min(cache_seconds, exp - now), and exp - now with a 400-digit int and a float clock raises
    OverflowError. HttpIntrospector._ask catches only FetchError, TimeoutError and _Unavailable,
    so the exception leaves introspect(), the verifier and the pipeline: the servicer's catch-all
    answers 500 internal_error (and logs a traceback) for every request with the token, for ever
    (nothing is cached). Expected: an answer with such an exp is refused as malformed
    (IntrospectionUnavailable: 503, or treated as inactive), never an exception."""
    from ext_authz import errors
    from ext_authz.introspection import HttpIntrospector

    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "s3cret")

    class Fetcher:
        async def post_form(self, url: str, form: Any, **_: Any) -> tuple[int, object]:
            return 200, {"active": True, "sub": "bob", "aud": "api", "iss": ISSUER, "exp": 10**400}

    s = settings(
        {
            "introspection": {
                "endpoint": "https://idp.example.com/introspect",
                "client_id": "ext-authz",
                "client_secret_env": "TEST_INTROSPECTION_SECRET",
            }
        }
    )
    introspector = HttpIntrospector(Fetcher(), clock=clock)  # type: ignore[arg-type]
    p = Pipeline(compile(s, clock), StaticKeys({"idp": key_set}), clock=clock, introspector=introspector)
    req = Request(
        "GET", "/orders", host="api.example.com", scheme="https", headers={"authorization": "Bearer opaque-2"}
    )
    try:
        decision = await p.decide(req)
    except errors.AuthError:  # pragma: no cover - decide turns these into denials
        raise
    assert isinstance(decision, Deny)


# ---- 4. a client certificate with an out-of-range X.509 version: a 500, not a 400 ----


def _certificate_with_version(version: int) -> bytes:
    """A real client certificate's DER with its TBSCertificate version field (v3 = 2) replaced."""
    from tests.support.tls import CertificateAuthority

    der = bytearray(CertificateAuthority().issue("client", client=True).der)
    marker = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2: the version of a v3 certificate
    at = der.index(marker)
    der[at + 4] = version
    return bytes(der)


@pytest.mark.parametrize("source", ["client-cert", "peer", "xfcc"])
async def test_a_certificate_of_an_unknown_version_is_a_malformed_certificate(
    key_set: KeySet, mint: Mint, source: str
) -> None:
    """certbinding catches ValueError around cryptography's certificate loaders, but
    cryptography (50.x) raises x509.InvalidVersion, a plain Exception, for a version other than
    v1-v3 ("38 is not a valid X509 version"). It leaves presented_thumbprint,
    SenderConstraints.check and the pipeline: the servicer's catch-all answers 500 internal_error
    with a logged traceback. It runs for every token of an mtls_bound provider (bound or not,
    `allowed` too), before the binding is judged. The certificate is the client's: a TLS
    terminator that takes unverified client certificates (RFC 8705 §2.2 self-signed mode, e.g.
    nginx `ssl_verify_client optional_no_ca`) and puts it in Client-Cert / XFCC Cert= hands it
    on. Expected: 400 malformed_client_certificate, as for any other unreadable certificate."""
    import base64
    from urllib.parse import quote

    der = _certificate_with_version(38)
    b64 = base64.b64encode(der).decode()
    pem = "-----BEGIN CERTIFICATE-----\n" + "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    pem += "\n-----END CERTIFICATE-----\n"
    headers = {"authorization": f"Bearer {mint()}"}
    peer = ""
    if source == "client-cert":
        headers["client-cert"] = f":{b64}:"
    elif source == "xfcc":
        headers["x-forwarded-client-cert"] = f'Cert="{quote(pem, safe="")}"'
    else:
        peer = quote(pem, safe="")
    p = pipeline(key_set, {"mtls_bound": "allowed", "client_certificate_from": [source]})
    req = Request(
        "GET", "/orders", host="api.example.com", scheme="https", headers=headers, peer_certificate=peer
    )
    decision = await p.decide(req)
    assert isinstance(decision, Deny) and decision.status == 400, decision
