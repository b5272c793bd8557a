"""Issue 16 review (outside attacker): inputs that get a request allowed that should be denied,
take the service down, or leak. Each test FAILS on 89faa4d and describes the expected behaviour."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.compiled import compile
from ext_authz.config.model import IntrospectionSettings, ProviderSettings
from ext_authz.config.parse import parse
from ext_authz.introspection import Introspected, _answer
from ext_authz.keys.jwks import KeySet
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Allow, Deny, Request
from ext_authz.pipeline import Pipeline
from ext_authz.transport.adapter import serialized_response, to_response
from tests.support.tokens import ISSUER, NOW, Mint, clock

INTROSPECTION = {"client_id": "ext-authz", "client_secret_env": "TEST_INTROSPECTION_SECRET"}
SETTINGS = IntrospectionSettings(
    endpoint="https://idp.example.com/introspect", client_id="x", client_secret="y"
)


class RealShapedIntrospector:
    """Answers as HttpIntrospector does: through introspection._answer (the IdP's JSON body as
    aiohttp + decode_json would give it), so the claims object has the real type."""

    def __init__(self, bodies: dict[str, dict[str, object]]) -> None:
        self.bodies = bodies

    def answer_now(self, provider: ProviderSettings, token: str) -> Introspected | None:
        return None

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        body = self.bodies.get(token, {"active": False})
        answer, _ttl = _answer(200, body, SETTINGS, NOW)
        return answer


@pytest.fixture(autouse=True)
def _introspection_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "s3cret")


def introspecting(key_set: KeySet, bodies: dict[str, dict[str, object]], **provider: Any) -> Pipeline:
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
                }
            ],
            "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
        }
    )
    return Pipeline(
        compile(s, clock),
        StaticKeys({"idp": key_set}),
        clock=clock,
        introspector=RealShapedIntrospector(bodies),
    )


def request(
    token: str | None = None, *, scheme: str = "Bearer", path: str = "/orders", **headers: str
) -> Request:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if token is not None:
        h["authorization"] = f"{scheme} {token}"
    return Request("GET", path, host="api.example.com", scheme="https", headers=h)


def active(**claims: Any) -> dict[str, object]:
    body: dict[str, object] = {
        "active": True,
        "sub": "bob",
        "aud": "api",
        "iss": ISSUER,
        "exp": int(NOW) + 60,
    }
    body.update(claims)
    return body


# ---- 1. every allowed introspected token becomes a 500 at the gRPC transport ----


async def test_an_allowed_introspected_token_serializes_to_an_ok_response(key_set: KeySet) -> None:
    """HttpIntrospector (introspection._answer) keeps an active answer's claims as a
    MappingProxyType. Verifier._introspected then runs json.dumps(claims) for the payload segment:
    TypeError ("mappingproxy is not JSON serializable") escapes Pipeline.decide (not an AuthError);
    the servicer turns it into 500 internal_error. Every active opaque token is refused with 500.
    (Past that, Answers.allow puts the same object into the dynamic metadata, and protobuf's
    Struct.update refuses a MappingProxyType too: "Unexpected type".) The unit tests miss it because
    their FakeIntrospector returns a dict. Expected: Allow, serializable as status OK."""
    p = introspecting(key_set, {"opaque-token-1": active()})
    decision = await p.decide(request("opaque-token-1"))
    assert isinstance(decision, Allow)
    response = to_response(decision)  # what the servicer does (serialized_response)
    assert response.status.code == 0
    serialized_response(decision)


async def test_introspected_claims_in_the_dynamic_metadata_serialize(key_set: KeySet) -> None:
    """The second half of the same bug, past the json.dumps: Answers.allow puts principal.claims
    into dynamic_metadata, and Struct.update raised ValueError("Unexpected type") on the
    introspector's MappingProxyType (a 500). The verifier now hands on a plain dict."""
    p = introspecting(key_set, {"opaque": {"active": True, "sub": "bob", "aud": "api", "iss": ISSUER}})
    decision = await p.decide(request("opaque"))
    assert isinstance(decision, Allow)
    response = to_response(decision)
    assert response.status.code == 0
    assert response.dynamic_metadata.fields["claims"].struct_value.fields["sub"].string_value == "bob"
    assert serialized_response(decision, "rid")


# ---- 2. an introspection answer's text is not held to a JWT's rules: lone surrogates → 500 ----


class DictIntrospector(RealShapedIntrospector):
    """As RealShapedIntrospector, with the claims as a plain dict (past bug 1)."""

    async def introspect(self, provider: ProviderSettings, token: str) -> Introspected:
        answer = await super().introspect(provider, token)
        return Introspected(answer.active, dict(answer.claims))


async def test_a_lone_surrogate_in_an_introspected_claim_does_not_break_the_answer(key_set: KeySet) -> None:
    """identity._json_object refuses a JWT whose JSON holds "\\ud800" (no UTF-8 form); the
    introspection answer goes through keys.fetch.decode_json (plain json.loads), which keeps it.
    A user-chosen claim the IdP echoes (sub, username, name) copied to a header by claim_to_headers
    passes is_safe_header_value (it encodes with surrogatepass), then protobuf cannot encode the
    HeaderValue: UnicodeEncodeError in serialized_response, 500 internal_error for that user on
    every request. Expected: the claim is not emitted (as for any unsafe header value), or the
    answer refused as malformed; in no case an exception at serialization."""
    import json

    # What decode_json (json.loads) makes of the IdP's answer text.
    body = json.loads('{"active": true, "sub": "\\ud800bob", "aud": "api"}')
    body["exp"] = int(NOW) + 60
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
                }
            ],
            "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
        }
    )
    p = Pipeline(
        compile(s, clock),
        StaticKeys({"idp": key_set}),
        clock=clock,
        introspector=DictIntrospector({"opaque-token-2": body}),
    )
    decision = await p.decide(request("opaque-token-2"))
    # Whatever the decision, it must reach Envoy as a well-formed answer.
    to_response(decision).SerializeToString()


# ---- 3. DPoP replay protection is per process: a proof replayed at another worker passes ----


def test_dpop_with_several_workers_needs_a_shared_replay_cache() -> None:
    """server.Server gives each process its own ReplayCache, shared (Redis) only when
    jwks_cache.backend is redis: under `serve --workers N` (SO_REUSEPORT spreads Envoy's
    connections) a captured proof was accepted once per worker within its iat window, and
    dpop_nonce clients looped on use_dpop_nonce as their connections alternated between workers
    with per-process nonce secrets. Now `serve --workers N` (and a worker's reload) refuses dpop
    without the redis backend, whose required secret also makes the workers' nonces one."""
    from ext_authz.config.credentials import check_workers
    from ext_authz.config.values import ConfigError

    provider = {"name": "idp", "issuer": ISSUER, "audiences": ["api"], "jwks_uri": f"{ISSUER}jwks"}
    rules = [{"match": {"paths": ["/*"]}, "require": {}}]
    s = parse({"providers": [{**provider, "dpop": "required", "dpop_nonce": True}], "rules": rules})
    check_workers(s, 1)
    with pytest.raises(ConfigError) as caught:
        check_workers(s, 2)
    assert caught.value.key_path == "providers[0].dpop"
    assert "jwks_cache.backend: redis" in str(caught.value)
    check_workers(parse({"providers": [provider], "rules": rules}), 4)  # no dpop: nothing shared


# ---- the review's suspicions, made tests once mended ----


async def test_introspection_answers_are_held_to_a_jwts_rules(key_set: KeySet) -> None:
    """NaN and Infinity (plain json.loads keeps them), nbf/iat without exp, and a refresh token
    the IdP calls active."""
    bodies: dict[str, dict[str, object]] = {
        "infinite-auth-time": active(auth_time=float("inf")),
        "nan": active(level=float("nan")),
        "not-yet": {"active": True, "sub": "bob", "aud": "api", "iss": ISSUER, "nbf": int(NOW) + 3600},
        "hydra-refresh": active(token_use="refresh_token"),
        "keycloak-refresh": active(typ="Refresh"),
        "access": active(token_use="access_token", typ="Bearer"),
    }
    p = introspecting(key_set, bodies)
    for token, code in (
        ("infinite-auth-time", "invalid_claim"),
        ("nan", "invalid_claim"),
        ("not-yet", "token_not_yet_valid"),
        ("hydra-refresh", "token_type_not_accepted"),
        ("keycloak-refresh", "token_type_not_accepted"),
    ):
        decision = await p.decide(request(token))
        assert isinstance(decision, Deny) and decision.code == code, (token, decision)
    assert isinstance(await p.decide(request("access")), Allow)


async def test_a_cnf_that_is_not_an_object_is_no_unbound_token(key_set: KeySet, mint: Mint) -> None:
    """A duplicate member inside cnf (an introspection answer's lenient JSON turns the object into
    a list of pairs) must not read as "not DPoP-bound", which `dpop: allowed` takes as bearer."""
    bodies: dict[str, dict[str, object]] = {"dup": active(cnf=[["jkt", "a"], ["jkt", "b"]])}
    p = introspecting(key_set, bodies, dpop="allowed")
    decision = await p.decide(request("dup"))
    assert isinstance(decision, Deny) and decision.code == "dpop_binding_mismatch"


async def test_a_future_auth_time_is_no_recent_authentication(resolver: StaticKeys, mint: Mint) -> None:
    s = parse(
        {
            "providers": [{"name": "idp", "issuer": ISSUER, "audiences": ["api"], "jwks_uri": f"{ISSUER}k"}],
            "rules": [{"match": {"paths": ["/*"]}, "require": {"max_auth_age_seconds": 300}}],
        }
    )
    p = Pipeline(compile(s, clock), resolver, clock=clock)
    assert isinstance(await p.decide(request(mint(auth_time=int(NOW) + 30))), Allow)  # clocks differ
    for auth_time in (int(NOW) + 3600, 2**62):
        decision = await p.decide(request(mint(auth_time=auth_time)))
        assert isinstance(decision, Deny) and decision.code == "insufficient_user_authentication"


@pytest.mark.parametrize("binding", ["dpop", "mtls_bound"])
def test_required_bindings_and_browser_sessions_do_not_mix(binding: str, tmp_path: Any) -> None:
    """Session principals never pass the sender-constraint stage: `required` on a login provider
    would not hold for its sessions, so the config refuses it."""
    from ext_authz.config.values import ConfigError

    secret = tmp_path / "session"
    secret.write_text("k" * 48)
    provider = {
        "name": "idp",
        "issuer": ISSUER,
        "audiences": ["api"],
        "jwks_uri": f"{ISSUER}k",
        "login": {"client_id": "app", "token_endpoint_auth": "none"},
        binding: "required",
    }
    with pytest.raises(ConfigError) as caught:
        parse(
            {
                "providers": [provider],
                "sessions": {"secret_file": str(secret)},
                "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
            }
        )
    assert caught.value.key_path == f"providers[0].{binding}"


async def test_a_flood_of_made_up_opaque_tokens_is_bounded() -> None:
    """Each random opaque token costs an IdP request (no negative cache helps): at most
    MAX_IN_FLIGHT go out at once (key fetches keep their connections), the rest queue, and
    beyond MAX_PENDING distinct tokens waiting the answer is 503 at once."""
    import asyncio

    from ext_authz import errors
    from ext_authz.introspection import MAX_IN_FLIGHT, MAX_PENDING, HttpIntrospector

    release = asyncio.Event()
    in_flight = peak = calls = 0

    class SlowFetcher:
        async def post_form(self, url: str, form: Any, **_: Any) -> tuple[int, object]:
            nonlocal calls, in_flight, peak
            calls += 1
            in_flight += 1
            peak = max(peak, in_flight)
            await release.wait()
            in_flight -= 1
            return 200, {"active": False}

    s = parse(
        {
            "providers": [
                {
                    "name": "idp",
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "jwks_uri": f"{ISSUER}jwks",
                    "introspection": {**INTROSPECTION, "endpoint": "https://idp.example.com/introspect"},
                    "fetch_timeout_seconds": 5,
                }
            ],
            "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
        }
    )
    provider = s.providers[0]
    introspector = HttpIntrospector(SlowFetcher(), clock=clock)  # type: ignore[arg-type]
    count = MAX_PENDING + 5
    tasks = [asyncio.create_task(introspector.introspect(provider, f"token-{i}")) for i in range(count)]
    for _ in range(5):
        await asyncio.sleep(0)
    refused = [t for t in tasks if t.done()]
    assert len(refused) == 5
    assert all(isinstance(t.exception(), errors.IntrospectionUnavailable) for t in refused)
    assert peak == MAX_IN_FLIGHT
    release.set()
    results = await asyncio.gather(*[t for t in tasks if t not in refused])
    assert all(not r.active for r in results) and calls == MAX_PENDING
    assert peak == MAX_IN_FLIGHT
