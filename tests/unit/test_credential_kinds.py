"""Issue 16 in the decision core: issuer templates and tenants, introspected tokens, DPoP and
certificate-bound tokens, step-up answers. In process, with the fixed clock; the network parts
(the introspection client, the Redis replay cache) are faked here and tested on their own."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

import pytest

from ext_authz import errors
from ext_authz.certbinding import certificate_thumbprint
from ext_authz.compiled import compile
from ext_authz.config.model import ProviderSettings
from ext_authz.config.parse import parse
from ext_authz.config.values import ConfigError
from ext_authz.dpop import NonceIssuer
from ext_authz.introspection import Introspected
from ext_authz.keys.jwks import KeySet
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from tests.support.dpop import DPoPKey
from tests.support.tls import CertificateAuthority
from tests.support.tokens import ISSUER, NOW, Mint, clock

ENTRA = "https://login.microsoftonline.com/{tenant}/v2.0"
TENANT_A = "11111111-1111-1111-1111-111111111111"
TENANT_B = "22222222-2222-2222-2222-222222222222"
TENANT_C = "33333333-3333-3333-3333-333333333333"


def settings(provider: Mapping[str, Any], rules: list[Any] | None = None, **top: Any) -> Any:
    p: dict[str, Any] = {"name": "idp", "issuer": ISSUER, "audiences": ["api"], "jwks_uri": f"{ISSUER}jwks"}
    p.update(provider)
    document: dict[str, Any] = {"providers": [p], **top}
    document["rules"] = rules if rules is not None else [{"match": {"paths": ["/*"]}, "require": {}}]
    return parse(document)


def config_error(provider: Mapping[str, Any], rules: list[Any] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        settings(provider, rules)
    return caught.value


def request(
    token: str | None = None, *, scheme: str = "Bearer", path: str = "/orders", **headers: str
) -> Request:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        h["authorization"] = f"{scheme} {token}"
    return Request("GET", path, host="api.example.com", scheme="https", headers=h)


async def decide(pipeline: Pipeline, req: Request) -> Allow | Deny:
    return await pipeline.decide(req)


def denied(decision: Allow | Deny, status: int, code: str) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.code) == (status, code), decision
    return decision


def challenge(decision: Deny) -> str:
    return dict(decision.headers)["www-authenticate"]


# ---- issuer templates ----


@pytest.fixture
def tenants(key_set: KeySet) -> Pipeline:
    s = settings(
        {
            "name": "entra",
            "issuer": ENTRA,
            "tenants": [TENANT_A, TENANT_B],
            "jwks_uri": "https://login.microsoftonline.com/common/discovery/v2.0/keys",
            "claim_to_headers": [{"header": "x-tenant", "claim": "tid"}],
        },
        rules=[
            {"match": {"paths": ["/a/*"]}, "require": {"tenants": [TENANT_A]}},
            {"match": {"paths": ["/cel/*"]}, "require": {"expression": f"params.tenant == '{TENANT_B}'"}},
            {"match": {"paths": ["/t/{tenant}/*"]}, "require": {"expression": "params.tenant == claims.tid"}},
            {"match": {"paths": ["/*"]}, "require": {}},
        ],
    )
    return Pipeline(compile(s, clock), StaticKeys({"entra": key_set}), clock=clock)


def tenant_token(mint: Mint, tenant: str, **claims: Any) -> str:
    return mint(iss=ENTRA.replace("{tenant}", tenant), **{"tid": tenant, **claims})


async def test_two_tenants_allowed_a_third_refused(tenants: Pipeline, mint: Mint) -> None:
    for tenant in (TENANT_A, TENANT_B):
        allowed = await decide(tenants, request(tenant_token(mint, tenant)))
        assert isinstance(allowed, Allow)
        assert ("x-tenant", tenant) in allowed.headers_to_set
    third = denied(await decide(tenants, request(tenant_token(mint, TENANT_C))), 401, "tenant_not_allowed")
    assert 'error="invalid_token"' in challenge(third)


async def test_the_tid_claim_must_be_the_issuers_tenant(tenants: Pipeline, mint: Mint) -> None:
    token = mint(iss=ENTRA.replace("{tenant}", TENANT_A), tid=TENANT_C)
    denied(await decide(tenants, request(token)), 401, "tenant_not_allowed")
    # Without tid the issuer's tenant stands.
    assert isinstance(await decide(tenants, request(mint(iss=ENTRA.replace("{tenant}", TENANT_A)))), Allow)


@pytest.mark.parametrize(
    "iss",
    [
        ENTRA,  # the template's own text is no issuer
        "https://login.microsoftonline.com//v2.0",
        f"https://login.microsoftonline.com/{TENANT_A}/extra/v2.0",
        f"https://login.microsoftonline.com/{TENANT_A}/v2.0/",
        f"https://login.microsoftonline.com/{TENANT_A}%2Fx/v2.0",
        f"https://evil.example/{TENANT_A}/v2.0",
    ],
)
async def test_issuers_that_do_not_fit_the_template(tenants: Pipeline, mint: Mint, iss: str) -> None:
    decision = await decide(tenants, request(mint(iss=iss)))
    assert isinstance(decision, Deny) and decision.status == 401
    assert decision.code in ("unknown_issuer", "tenant_not_allowed")


async def test_rules_read_the_tenant(tenants: Pipeline, mint: Mint) -> None:
    a, b = tenant_token(mint, TENANT_A), tenant_token(mint, TENANT_B)
    assert isinstance(await decide(tenants, request(a, path="/a/x")), Allow)
    denied(await decide(tenants, request(b, path="/a/x")), 403, "requirement_not_met")
    assert isinstance(await decide(tenants, request(b, path="/cel/x")), Allow)
    denied(await decide(tenants, request(a, path="/cel/x")), 403, "requirement_not_met")
    # The path's own {tenant} stays the path's: a token of tenant A cannot reach tenant B's path.
    assert isinstance(await decide(tenants, request(a, path=f"/t/{TENANT_A}/x")), Allow)
    denied(await decide(tenants, request(a, path=f"/t/{TENANT_B}/x")), 403, "requirement_not_met")


async def test_a_cached_token_keeps_its_tenant(tenants: Pipeline, mint: Mint) -> None:
    token = tenant_token(mint, TENANT_B)
    for _ in range(2):
        assert isinstance(await decide(tenants, request(token, path="/cel/x")), Allow)


async def test_tenants_any(key_set: KeySet, mint: Mint) -> None:
    s = settings({"name": "entra", "issuer": ENTRA, "tenants": "any", "jwks_uri": f"{ISSUER}jwks"})
    p = Pipeline(compile(s, clock), StaticKeys({"entra": key_set}), clock=clock)
    assert isinstance(await decide(p, request(tenant_token(mint, TENANT_C))), Allow)


@pytest.mark.parametrize(
    ("provider", "path", "words"),
    [
        ({"issuer": ENTRA}, "providers[0].tenants", "tenants"),
        ({"issuer": ENTRA, "tenants": ["a/b"]}, "providers[0].tenants[0]", "segment"),
        ({"issuer": "https://x.example/{tenant}{tenant}/", "tenants": "any"}, "providers[0].issuer", "once"),
        ({"issuer": "https://x.example/t{tenant}/", "tenants": "any"}, "providers[0].issuer", "segment"),
        ({"issuer": "https://{tenant}.example/", "tenants": "any"}, "providers[0].issuer", "segment"),
        ({"issuer": "https://x.example/{tid}/", "tenants": "any"}, "providers[0].issuer", "{tenant}"),
        ({"tenants": ["a"]}, "providers[0].tenants", "template"),
        ({"discovery_issuer": "https://x.example/common/"}, "providers[0].discovery_issuer", "template"),
        (
            {"issuer": ENTRA, "tenants": "any", "jwks_uri": None},
            "providers[0].discovery_issuer",
            "cannot be discovered",
        ),
    ],
)
def test_template_config_errors(provider: dict[str, Any], path: str, words: str) -> None:
    provider = {**provider}
    if provider.get("jwks_uri", "") is None:
        del provider["jwks_uri"]
        p: dict[str, Any] = {"name": "idp", "audiences": ["api"], **provider}
        with pytest.raises(ConfigError) as caught:
            parse({"providers": [p], "rules": [{"match": {"paths": ["/*"]}, "require": {}}]})
        error = caught.value
    else:
        error = config_error(provider)
    assert error.key_path == path, error
    assert words in str(error)


def test_a_concrete_issuer_inside_a_template_is_refused() -> None:
    template = {
        "name": "entra",
        "issuer": ENTRA,
        "tenants": "any",
        "audiences": ["api"],
        "jwks_uri": f"{ISSUER}k",
    }
    concrete = {
        "name": "one",
        "issuer": f"https://login.microsoftonline.com/{TENANT_A}/v2.0",
        "audiences": ["api"],
        "jwks_uri": f"{ISSUER}k",
    }
    with pytest.raises(ConfigError) as caught:
        parse({"providers": [template, concrete], "rules": [{"match": {"paths": ["/*"]}, "require": {}}]})
    assert caught.value.key_path == "providers[1].issuer"


# ---- introspection ----


class FakeIntrospector:
    """Answers by token; counts what it was asked (the HTTP client is tested on its own)."""

    def __init__(self, answers: Mapping[str, Mapping[str, object] | None]) -> None:
        self.answers = dict(answers)
        self.asked: list[tuple[str, str]] = []
        self.down: set[str] = set()

    def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
        return None

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        self.asked.append((provider.name, token))
        if provider.name in self.down:
            raise errors.IntrospectionUnavailable()
        answer = self.answers.get(f"{provider.name}:{token}")
        if answer is None:
            return Introspected(False, {})
        return Introspected(True, MappingProxyType(dict(answer)))  # read-only, as the real client's


INTROSPECTION = {"client_id": "ext-authz", "client_secret_env": "TEST_INTROSPECTION_SECRET"}


@pytest.fixture
def introspection_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "s3cret")


def introspecting(key_set: KeySet, introspector: FakeIntrospector, **provider: Any) -> Pipeline:
    s = parse(
        {
            "providers": [
                {
                    "name": "idp",
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "jwks_uri": f"{ISSUER}jwks",
                    "introspection": INTROSPECTION,
                    "claim_to_headers": [{"header": "x-user", "claim": "sub"}],
                    **provider,
                },
                {
                    "name": "second",
                    "issuer": "https://second.example.com/",
                    "audiences": ["api"],
                    "jwks_uri": "https://second.example.com/jwks",
                    "introspection": INTROSPECTION,
                },
            ],
            "rules": [
                {"match": {"paths": ["/write"]}, "require": {"scopes": ["write"]}},
                {"match": {"paths": ["/*"]}, "require": {}},
            ],
        }
    )
    keys = StaticKeys({"idp": key_set, "second": key_set})
    return Pipeline(compile(s, clock), keys, clock=clock, introspector=introspector)


def active(**claims: Any) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": "bob",
        "aud": "api",
        "iss": ISSUER,
        "exp": int(NOW) + 60,
        "scope": "read",
    }
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.usefixtures("introspection_secret")
async def test_an_opaque_token_is_introspected(key_set: KeySet) -> None:
    fake = FakeIntrospector(
        {"idp:opaque-1": active(), "second:opaque-2": active(iss="https://second.example.com/")}
    )
    p = introspecting(key_set, fake)
    allowed = await decide(p, request("opaque-1"))
    assert isinstance(allowed, Allow) and allowed.provider == "idp"
    assert json.dumps(allowed.metadata["claims"])  # plain JSON for the decision log and metadata
    assert ("x-user", "bob") in allowed.headers_to_set
    # In order: the first provider says inactive, the second active.
    second = await decide(p, request("opaque-2"))
    assert isinstance(second, Allow) and second.provider == "second"
    assert fake.asked[-2:] == [("idp", "opaque-2"), ("second", "opaque-2")]
    # Scopes of the answer feed the rules like a JWT's.
    denied(await decide(p, request("opaque-1", path="/write")), 403, "insufficient_scope")


@pytest.mark.usefixtures("introspection_secret")
async def test_inactive_unavailable_and_claim_checks(key_set: KeySet) -> None:
    fake = FakeIntrospector(
        {
            "idp:expired": active(exp=int(NOW) - 120),  # beyond the clock skew
            "idp:other-aud": active(aud="other"),
            "idp:no-aud": active(aud=None),
            "idp:other-iss": active(iss="https://second.example.com/"),
        }
    )
    p = introspecting(key_set, fake)
    denied(await decide(p, request("unknown")), 401, "token_inactive")
    denied(await decide(p, request("expired")), 401, "token_expired")
    denied(await decide(p, request("other-aud")), 401, "audience_mismatch")
    denied(await decide(p, request("no-aud")), 401, "audience_mismatch")
    denied(await decide(p, request("other-iss")), 401, "issuer_not_accepted")
    fake.down.add("idp")
    # The first endpoint down, the second says inactive: the token may be fine, so 503.
    unavailable = denied(await decide(p, request("unknown")), 503, "introspection_unavailable")
    assert dict(unavailable.headers)["retry-after"]
    assert "unknown" not in unavailable.body


@pytest.mark.usefixtures("introspection_secret")
async def test_jwts_never_reach_introspection_unless_asked(key_set: KeySet, mint: Mint) -> None:
    fake = FakeIntrospector({})
    p = introspecting(key_set, fake)
    assert isinstance(await decide(p, request(mint())), Allow)
    denied(await decide(p, request("a.b.c")), 401, "malformed_token")
    assert fake.asked == []
    # A token that is no RFC 6750 b64token is never sent to an IdP.
    denied(await decide(p, request("not a token!")), 401, "malformed_token")
    assert fake.asked == []
    revoking = introspecting(key_set, fake, introspect_jwts=True)
    token = mint()
    denied(await decide(revoking, request(token)), 401, "token_inactive")
    fake.answers[f"idp:{token}"] = active()
    assert isinstance(await decide(revoking, request(token)), Allow)
    fake.down.add("idp")
    denied(await decide(revoking, request(token)), 503, "introspection_unavailable")


@pytest.mark.usefixtures("introspection_secret")
@pytest.mark.parametrize(
    ("introspection", "path"),
    [
        ({"client_id": "x"}, "providers[0].introspection.client_secret_file"),
        ({**INTROSPECTION, "auth_method": "private_key_jwt"}, "providers[0].introspection.auth_method"),
        ({**INTROSPECTION, "endpoint": "http://idp.example.com/i"}, "providers[0].introspection.endpoint"),
        ({**INTROSPECTION, "cache_seconds": -1}, "providers[0].introspection.cache_seconds"),
        ({**INTROSPECTION, "surprise": 1}, "providers[0].introspection.surprise"),
    ],
)
def test_introspection_config_errors(introspection: dict[str, Any], path: str) -> None:
    assert config_error({"introspection": introspection}).key_path == path


def test_introspect_jwts_needs_introspection() -> None:
    assert config_error({"introspect_jwts": True}).key_path == "providers[0].introspect_jwts"


# ---- DPoP ----

URL = "https://api.example.com/orders"


def dpop_pipeline(key_set: KeySet, mode: str = "required", **provider: Any) -> Pipeline:
    s = settings({"dpop": mode, **provider})
    nonces = NonceIssuer(b"k" * 32, 300, clock)
    return Pipeline(compile(s, clock), StaticKeys({"idp": key_set}), clock=clock, dpop_nonces=nonces)


async def test_a_dpop_bound_token_with_its_proof(key_set: KeySet, mint: Mint) -> None:
    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = dpop_pipeline(key_set)
    proof = holder.proof("GET", URL, token, iat=NOW)
    allowed = await decide(p, request(token, scheme="DPoP", dpop=proof))
    assert isinstance(allowed, Allow)
    assert "dpop" in allowed.headers_to_remove
    # The same proof again: a replay.
    replay = denied(await decide(p, request(token, scheme="DPoP", dpop=proof)), 401, "invalid_dpop_proof")
    assert challenge(replay).startswith("DPoP ") and 'error="invalid_dpop_proof"' in challenge(replay)
    assert 'algs="' in challenge(replay)


async def test_dpop_refusals(key_set: KeySet, mint: Mint) -> None:
    holder, other = DPoPKey(), DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = dpop_pipeline(key_set)
    # A bound token as a bearer token.
    bearer = denied(await decide(p, request(token)), 401, "dpop_binding_mismatch")
    assert challenge(bearer).startswith("DPoP ")
    # No proof; a proof by another key; two proofs.
    denied(await decide(p, request(token, scheme="DPoP")), 401, "invalid_dpop_proof")
    foreign = other.proof("GET", URL, token, iat=NOW)
    denied(await decide(p, request(token, scheme="DPoP", dpop=foreign)), 401, "dpop_binding_mismatch")
    two = f"{holder.proof('GET', URL, token, iat=NOW)}, {holder.proof('GET', URL, token, iat=NOW)}"
    denied(await decide(p, request(token, scheme="DPoP", dpop=two)), 401, "invalid_dpop_proof")
    # Wrong method, URL, token hash, a stale proof.
    for bad in (
        holder.proof("POST", URL, token, iat=NOW),
        holder.proof("GET", "https://api.example.com/other", token, iat=NOW),
        holder.proof("GET", URL, "another-token", iat=NOW),
        holder.proof("GET", URL, token, iat=NOW - 600),
    ):
        denied(await decide(p, request(token, scheme="DPoP", dpop=bad)), 401, "invalid_dpop_proof")
    # An unbound token: refused in required mode (as bearer or with DPoP).
    plain = mint()
    denied(await decide(p, request(plain)), 401, "dpop_binding_mismatch")
    proof = holder.proof("GET", URL, plain, iat=NOW)
    denied(await decide(p, request(plain, scheme="DPoP", dpop=proof)), 401, "dpop_binding_mismatch")


async def test_dpop_allowed_takes_unbound_bearer_tokens(key_set: KeySet, mint: Mint) -> None:
    holder = DPoPKey()
    p = dpop_pipeline(key_set, "allowed")
    assert isinstance(await decide(p, request(mint())), Allow)
    denied(await decide(p, request(mint(cnf={"jkt": holder.thumbprint}))), 401, "dpop_binding_mismatch")


async def test_dpop_public_origin(key_set: KeySet, mint: Mint) -> None:
    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = dpop_pipeline(key_set, dpop_public_origin="https://public.example.com")
    internal = holder.proof("GET", URL, token, iat=NOW)
    denied(await decide(p, request(token, scheme="DPoP", dpop=internal)), 401, "invalid_dpop_proof")
    public = holder.proof("GET", "https://public.example.com/orders", token, iat=NOW)
    assert isinstance(await decide(p, request(token, scheme="DPoP", dpop=public)), Allow)


async def test_dpop_nonce(key_set: KeySet, mint: Mint) -> None:
    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = dpop_pipeline(key_set, dpop_nonce=True)
    first = denied(
        await decide(p, request(token, scheme="DPoP", dpop=holder.proof("GET", URL, token, iat=NOW))),
        401,
        "use_dpop_nonce",
    )
    nonce = dict(first.headers)["dpop-nonce"]
    assert 'error="use_dpop_nonce"' in challenge(first)
    proof = holder.proof("GET", URL, token, iat=NOW, nonce=nonce)
    assert isinstance(await decide(p, request(token, scheme="DPoP", dpop=proof)), Allow)


async def test_a_provider_without_dpop_reads_no_dpop_scheme(resolver: StaticKeys, mint: Mint) -> None:
    s = settings({})
    p = Pipeline(compile(s, clock), resolver, clock=clock)
    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    denied(
        await decide(p, request(token, scheme="DPoP", dpop=holder.proof("GET", URL, token))),
        401,
        "missing_token",
    )


@pytest.mark.parametrize(
    ("provider", "path"),
    [
        ({"dpop": "yes"}, "providers[0].dpop"),
        ({"dpop_nonce": True}, "providers[0].dpop_nonce"),
        ({"dpop": "required", "dpop_algorithms": ["HS256"]}, "providers[0].dpop_algorithms[0]"),
        ({"dpop": "required", "dpop_algorithms": ["none"]}, "providers[0].dpop_algorithms[0]"),
        (
            {"dpop": "required", "dpop_public_origin": "https://x.example/path"},
            "providers[0].dpop_public_origin",
        ),
        ({"dpop": "required", "claim_to_headers": [{"header": "dpop", "claim": "sub"}]}, None),
    ],
)
def test_dpop_config_errors(provider: dict[str, Any], path: str | None) -> None:
    error = config_error(provider)
    if path is not None:
        assert error.key_path == path


# ---- certificate-bound tokens ----


@pytest.fixture(scope="module")
def certificates() -> tuple[bytes, bytes]:
    ca = CertificateAuthority()
    return ca.issue("client-a", client=True).cert_pem, ca.issue("client-b", client=True).cert_pem


def with_certificate(req: Request, pem: bytes) -> Request:
    return Request(
        req.method,
        req.path,
        host=req.host,
        scheme=req.scheme,
        headers=req.headers,
        peer_certificate=quote(pem.decode("ascii"), safe=""),
    )


def der(pem: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


async def test_certificate_bound_tokens(
    key_set: KeySet, mint: Mint, certificates: tuple[bytes, bytes]
) -> None:
    a, b = certificates
    p = Pipeline(
        compile(settings({"mtls_bound": "required"}), clock), StaticKeys({"idp": key_set}), clock=clock
    )
    token = mint(cnf={"x5t#S256": certificate_thumbprint(der(a))})
    assert isinstance(await decide(p, with_certificate(request(token), a)), Allow)
    denied(await decide(p, with_certificate(request(token), b)), 401, "certificate_binding_mismatch")
    denied(await decide(p, request(token)), 401, "certificate_binding_mismatch")
    denied(await decide(p, with_certificate(request(mint()), a)), 401, "certificate_binding_mismatch")
    lax = Pipeline(
        compile(settings({"mtls_bound": "allowed"}), clock), StaticKeys({"idp": key_set}), clock=clock
    )
    assert isinstance(await decide(lax, request(mint())), Allow)
    denied(await decide(lax, request(token)), 401, "certificate_binding_mismatch")


# ---- step-up (RFC 9470) ----


async def test_step_up_challenge(resolver: StaticKeys, mint: Mint) -> None:
    s = settings(
        {},
        rules=[
            {"match": {"paths": ["/*"]}, "require": {"acr": ["phr", "phrh"], "max_auth_age_seconds": 300}}
        ],
    )
    p = Pipeline(compile(s, clock), resolver, clock=clock)
    assert isinstance(await decide(p, request(mint(acr="phr", auth_time=int(NOW) - 60))), Allow)
    for claims in (
        {"acr": "pwd", "auth_time": int(NOW) - 60},
        {"acr": "phr", "auth_time": int(NOW) - 301},
        {"acr": "phr"},
        {"auth_time": int(NOW)},
    ):
        deny = denied(await decide(p, request(mint(**claims))), 401, "insufficient_user_authentication")
        value = challenge(deny)
        assert 'error="insufficient_user_authentication"' in value
        assert 'acr_values="phr phrh"' in value and 'max_age="300"' in value
        assert json.loads(deny.body)["error"] == "insufficient_user_authentication"


def test_step_up_config_errors() -> None:
    rule = {"match": {"paths": ["/*"]}, "require": {"max_auth_age_seconds": 1.5}}
    assert config_error({}, [rule]).key_path == "rules[0].require.max_auth_age_seconds"
    rule = {"match": {"paths": ["/*"]}, "require": {"acr": ["a b"]}}
    assert config_error({}, [rule]).key_path == "rules[0].require.acr[0]"


# ---- explain shows the checks ----


async def test_explain_shows_each_check(key_set: KeySet, mint: Mint) -> None:
    from ext_authz.explain import explain
    from ext_authz.explainrender import as_json

    holder = DPoPKey()
    token = mint(cnf={"jkt": holder.thumbprint})
    p = dpop_pipeline(key_set)
    e = await explain(p, request(token, scheme="DPoP", dpop=holder.proof("GET", URL, token, iat=NOW)))
    checks = as_json(e)["token"]["checks"]  # type: ignore[index]
    assert checks == [{"check": "DPoP", "verdict": "proof valid; its key is the token's cnf.jkt"}]
    bad = await explain(p, request(token))
    error = as_json(bad)["token"]["error"]  # type: ignore[index]
    assert error["code"] == "dpop_binding_mismatch"
