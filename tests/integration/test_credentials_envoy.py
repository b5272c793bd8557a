"""End to end through a real Envoy: issuer templates with tenants (keys by jwks_uri, and by a
multi-tenant IdP's `common` discovery document naming `.../{tenantid}/v2.0`), RFC 7662 token
introspection (endpoint by discovery with client_secret_basic, explicit with client_secret_post,
`introspect_jwts`), and RFC 9470 step-up answers.

Three ext-authz servers for the module, each behind its own Envoy and with test issuers of its
own, so that every count of IdP requests is one provider's; one more, briefly, for an IdP that is
gone. Cache times are short (2 s active, 1 s inactive) and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.echo import EchoBackend
from tests.support.envoy import Exchange, Gateway, start_envoy
from tests.support.idp import DISCOVERY_PATH, INTROSPECTION_PATH, JWKS_PATH, TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz

AUDIENCE = "api"
TENANT_A = "11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
TENANT_B = "contoso.example"
TENANT_C = "33333333-cccc-4ccc-8ccc-cccccccccccc"
CLIENT_ID = "ext-authz"
CLIENT_SECRET = "s3cret+with:odd/chars"
CACHE_SECONDS = 2
NEGATIVE_CACHE_SECONDS = 1
FETCH_TIMEOUT = 0.5
COMMON = "/common/v2.0"
KEEP_LINES = 20_000  # every log line of the module's requests: the token must be in none


@dataclass(frozen=True, slots=True)
class Stack:
    """One ext-authz behind one Envoy, and the issuers its providers trust."""

    gateway: Gateway
    issuers: tuple[TestIssuer, ...]

    @property
    def authz(self) -> ExtAuthzProcess:
        return self.gateway.authz

    def get(self, path: str, headers: list[tuple[str, str]] | None = None, *, token: str) -> Exchange:
        return self.gateway.get(path, headers or [], token=token)

    def log_text(self) -> str:
        return "\n".join(self.authz.process.output_lines())


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoBackend]:
    with EchoBackend() as backend:
        yield backend


@contextlib.contextmanager
def running_stack(config: Path, echo: EchoBackend, issuers: tuple[TestIssuer, ...]) -> Iterator[Stack]:
    with (
        start_ext_authz(config, keep_lines=KEEP_LINES) as authz,
        start_envoy(authz.address, echo.port) as envoy,
    ):
        yield Stack(Gateway(envoy, echo, issuers[0], authz, False), issuers)
        authz.process.check_alive()


def status_of(exchange: Exchange, status: int) -> Exchange:
    assert exchange.response.status == status, exchange.describe()
    if status != 200:
        assert exchange.backend is None, exchange.describe()
    return exchange


def seen(exchange: Exchange) -> dict[str, list[str]]:
    status_of(exchange, 200)
    assert exchange.backend is not None
    return exchange.backend.headers


def challenge(exchange: Exchange) -> str:
    return exchange.response.header("www-authenticate") or ""


def challenge_error(exchange: Exchange) -> str | None:
    for part in challenge(exchange).split(", "):
        if part.startswith('error="'):
            return part[len('error="') : -1]
    return None


def unavailable(exchange: Exchange) -> None:
    """503 with a Retry-After of whole seconds: the token may be fine, so never a 401."""
    status_of(exchange, 503)
    retry_after = exchange.response.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0, exchange.describe()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:g}s")
        time.sleep(0.1)


# ---- issuer templates and tenants ------------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(echo: EchoBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`by-jwks-uri`: keys by jwks_uri; `by-common`: keys through the `common` discovery document,
    which names the template in Entra's spelling (`{tenantid}`)."""
    with TestIssuer(audience=AUDIENCE) as keyed, TestIssuer(audience=AUDIENCE) as common:
        common.publish_discovery(COMMON, issuer=f"{common.url}/{{tenantid}}/v2.0")
        headers = [{"header": "x-tenant", "claim": "tid"}, {"header": "x-user-id", "claim": "sub"}]
        config = {
            "listen": "127.0.0.1:0",
            "providers": [
                {
                    "name": "by-jwks-uri",
                    "issuer": f"{keyed.url}/{{tenant}}/v2.0",
                    "tenants": [TENANT_A, TENANT_B],
                    "audiences": [AUDIENCE],
                    "jwks_uri": keyed.jwks_uri,
                    "claim_to_headers": headers,
                },
                {
                    "name": "by-common",
                    "issuer": f"{common.url}/{{tenant}}/v2.0",
                    "tenants": [TENANT_A, TENANT_B],
                    "discovery_issuer": f"{common.url}{COMMON}",
                    "audiences": [AUDIENCE],
                    "claim_to_headers": headers,
                },
            ],
            "rules": [
                {"match": {"paths": ["/a-only/*"]}, "require": {"tenants": [TENANT_A]}},
                {"match": {"paths": ["/mfa/*"]}, "require": {"acr": ["mfa"], "max_auth_age_seconds": 300}},
                {"match": {"paths": ["/*"]}, "require": {}},
            ],
        }
        with running_stack(
            write_config(tmp_path_factory.mktemp("tenants"), config), echo, (keyed, common)
        ) as stack:
            yield stack


def tenant_token(issuer: TestIssuer, tenant: str, **claims: Any) -> str:
    return issuer.mint({"iss": f"{issuer.url}/{tenant}/v2.0", "tid": tenant, **claims})


@pytest.fixture(params=[0, 1], ids=["by-jwks-uri", "by-common"])
def tenant_issuer(request: pytest.FixtureRequest, tenants: Stack) -> TestIssuer:
    issuer: TestIssuer = tenants.issuers[request.param]
    return issuer


def test_listed_tenants_pass_with_their_tenant_header(tenants: Stack, tenant_issuer: TestIssuer) -> None:
    for tenant in (TENANT_A, TENANT_B):
        token = tenant_token(tenant_issuer, tenant, sub=f"user-of-{tenant}")
        headers = seen(tenants.get("/orders", [("x-tenant", "forged")], token=token))
        # The client's x-tenant never reaches the backend: only the verified tenant does.
        assert headers["x-tenant"] == [tenant]
        assert headers["x-user-id"] == [f"user-of-{tenant}"]


def test_the_common_document_is_what_keys_are_discovered_by(tenants: Stack) -> None:
    keyed, common = tenants.issuers
    seen(tenants.get("/orders", token=tenant_token(common, TENANT_A)))
    assert common.request_count(COMMON + DISCOVERY_PATH) >= 1
    assert common.request_count(DISCOVERY_PATH) == 0  # the template's own text is no issuer
    assert common.request_count(JWKS_PATH) >= 1
    seen(tenants.get("/orders", token=tenant_token(keyed, TENANT_A)))
    assert keyed.request_count(JWKS_PATH) >= 1
    assert keyed.request_count(DISCOVERY_PATH) == 0  # jwks_uri given: no discovery


def test_an_unlisted_tenant_is_an_invalid_token(tenants: Stack, tenant_issuer: TestIssuer) -> None:
    exchange = status_of(tenants.get("/orders", token=tenant_token(tenant_issuer, TENANT_C)), 401)
    assert challenge_error(exchange) == "invalid_token"


def test_tid_must_be_the_issuers_tenant(tenants: Stack, tenant_issuer: TestIssuer) -> None:
    token = tenant_issuer.mint({"iss": f"{tenant_issuer.url}/{TENANT_A}/v2.0", "tid": TENANT_C})
    assert challenge_error(status_of(tenants.get("/orders", token=token), 401)) == "invalid_token"
    # The template's own text, as an iss, names no tenant: no issuer at all.
    literal = tenant_issuer.mint({"iss": f"{tenant_issuer.url}/{{tenant}}/v2.0", "tid": TENANT_A})
    assert challenge_error(status_of(tenants.get("/orders", token=literal), 401)) == "invalid_token"


def test_a_forged_tenant_header_is_removed_even_without_tid(tenants: Stack) -> None:
    keyed = tenants.issuers[0]
    token = keyed.mint({"iss": f"{keyed.url}/{TENANT_B}/v2.0"})  # tenant from iss alone
    headers = seen(tenants.get("/orders", [("x-tenant", TENANT_A), ("X-Tenant", "forged")], token=token))
    assert "x-tenant" not in headers


def test_rule_requiring_a_tenant(tenants: Stack, tenant_issuer: TestIssuer) -> None:
    a = seen(tenants.get("/a-only/x", [("x-tenant", TENANT_B)], token=tenant_token(tenant_issuer, TENANT_A)))
    assert a["x-tenant"] == [TENANT_A]
    # A forged header claiming tenant A does not help tenant B.
    token_b = tenant_token(tenant_issuer, TENANT_B)
    refused = status_of(tenants.get("/a-only/x", [("x-tenant", TENANT_A)], token=token_b), 403)
    assert refused.response.header("www-authenticate") is None, refused.describe()
    assert refused.response.json()["error"] == "access_denied"
    seen(tenants.get("/elsewhere", token=token_b))


# ---- step-up (RFC 9470) ----------------------------------------------------------------------


def test_step_up_fresh_mfa_passes(tenants: Stack) -> None:
    token = tenant_token(tenants.issuers[0], TENANT_A, acr="mfa", auth_time=int(time.time()) - 10)
    assert seen(tenants.get("/mfa/transfer", token=token))["x-tenant"] == [TENANT_A]


@pytest.mark.parametrize(
    "claims",
    [{"acr": "pwd", "auth_time": -10}, {"acr": "mfa", "auth_time": -3600}, {"acr": "mfa"}],
    ids=["acr-pwd", "mfa-too-old", "mfa-no-auth-time"],
)
def test_step_up_challenge(tenants: Stack, claims: dict[str, Any]) -> None:
    if "auth_time" in claims:
        claims = {**claims, "auth_time": int(time.time()) + claims["auth_time"]}
    token = tenant_token(tenants.issuers[0], TENANT_A, **claims)
    exchange = status_of(tenants.get("/mfa/transfer", token=token), 401)
    value = challenge(exchange)
    assert value.startswith("Bearer "), exchange.describe()
    assert 'error="insufficient_user_authentication"' in value
    assert 'acr_values="mfa"' in value
    assert 'max_age="300"' in value
    assert exchange.response.json()["error"] == "insufficient_user_authentication"
    # Elsewhere the same token is fine: the requirement is the rule's.
    seen(tenants.get("/orders", token=token))


# ---- introspection: endpoint by discovery, client_secret_basic -------------------------------


def introspection_provider(
    issuer: TestIssuer, secret_file: Path, *, auth_method: str, endpoint: bool, **extra: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret_file": secret_file.name,  # relative to the config file
        "auth_method": auth_method,
        "cache_seconds": CACHE_SECONDS,
        "negative_cache_seconds": NEGATIVE_CACHE_SECONDS,
    }
    if endpoint:
        settings["endpoint"] = issuer.introspection_endpoint
    return {
        "name": "idp",
        "issuer": issuer.url,
        "audiences": [AUDIENCE],
        "fetch_timeout_seconds": FETCH_TIMEOUT,
        "introspection": settings,
        "claim_to_headers": [
            {"header": "x-user-id", "claim": "sub"},
            {"header": "x-scope", "claim": "scope"},
        ],
        **extra,
    }


@contextlib.contextmanager
def introspecting_stack(
    echo: EchoBackend, directory: Path, issuer: TestIssuer, *, auth_method: str, endpoint: bool, **extra: Any
) -> Iterator[Stack]:
    secret_file = directory / "introspection-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    issuer.set_introspection_client(CLIENT_ID, CLIENT_SECRET)
    provider = introspection_provider(
        issuer, secret_file, auth_method=auth_method, endpoint=endpoint, **extra
    )
    config = {
        "listen": "127.0.0.1:0",
        "providers": [provider],
        "rules": [{"match": {"paths": ["/*"]}, "require": {}}],
    }
    with running_stack(write_config(directory, config), echo, (issuer,)) as stack:
        yield stack


@pytest.fixture(scope="module")
def basic(echo: EchoBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with (
        TestIssuer(audience=AUDIENCE) as issuer,
        introspecting_stack(
            echo, tmp_path_factory.mktemp("basic"), issuer, auth_method="client_secret_basic", endpoint=False
        ) as stack,
    ):
        yield stack


@pytest.fixture
def idp(basic: Stack) -> Iterator[TestIssuer]:
    """The introspecting issuer, healed after each test whatever it failed."""
    issuer = basic.issuers[0]
    yield issuer
    issuer.heal()


def introspections(issuer: TestIssuer) -> int:
    return issuer.request_count(INTROSPECTION_PATH)


def test_an_opaque_token_passes_with_its_subject(basic: Stack, idp: TestIssuer) -> None:
    token = idp.issue_opaque({"sub": "carol", "scope": "read write"})
    before = introspections(idp)
    headers = seen(basic.get("/orders", [("x-user-id", "forged")], token=token))
    assert headers["x-user-id"] == ["carol"]
    assert headers["x-scope"] == ["read write"]
    assert introspections(idp) == before + 1
    # Discovery named the endpoint: our discovery document was read for it.
    assert idp.request_count(DISCOVERY_PATH) >= 1
    assert token not in basic.log_text()


def test_an_unknown_token_is_invalid_and_briefly_remembered(basic: Stack, idp: TestIssuer) -> None:
    token = "never-issued-" + "x" * 30
    before = introspections(idp)
    started = time.monotonic()
    for _ in range(3):
        exchange = status_of(basic.get("/orders", token=token), 401)
        assert challenge_error(exchange) == "invalid_token"
    if time.monotonic() - started < NEGATIVE_CACHE_SECONDS * 0.8:
        assert introspections(idp) == before + 1  # within negative_cache_seconds: one question
    time.sleep(NEGATIVE_CACHE_SECONDS + 0.2)
    status_of(basic.get("/orders", token=token), 401)
    assert introspections(idp) >= before + 2  # the inactive answer expired: asked again
    assert token not in basic.log_text()


def test_one_introspection_per_cache_period_and_revocation_shows_after_it(
    basic: Stack, idp: TestIssuer
) -> None:
    token = idp.issue_opaque({"sub": "dave"})
    before = introspections(idp)
    asked_at = time.monotonic()
    for _ in range(8):
        assert seen(basic.get("/orders", token=token))["x-user-id"] == ["dave"]
    within_cache = time.monotonic() - asked_at < CACHE_SECONDS * 0.8
    if within_cache:
        assert introspections(idp) == before + 1
    idp.revoke_opaque(token)
    if time.monotonic() - asked_at < CACHE_SECONDS * 0.8:
        seen(basic.get("/orders", token=token))  # still the cached active answer
    time.sleep(max(0.0, CACHE_SECONDS + 0.2 - (time.monotonic() - asked_at)))
    exchange = status_of(basic.get("/orders", token=token), 401)
    assert challenge_error(exchange) == "invalid_token"
    assert introspections(idp) >= before + 2


def test_concurrent_requests_with_a_new_token_share_one_introspection(basic: Stack, idp: TestIssuer) -> None:
    token = idp.issue_opaque({"sub": "nina"})
    idp.delay_path(INTROSPECTION_PATH, 0.3)  # every request arrives while the first is asked
    before = introspections(idp)
    with ThreadPoolExecutor(max_workers=6) as pool:
        exchanges = list(pool.map(lambda _: basic.get("/orders", token=token), range(6)))
    for exchange in exchanges:
        assert seen(exchange)["x-user-id"] == ["nina"]
    assert introspections(idp) == before + 1


def test_a_jwt_of_the_same_provider_is_never_introspected(basic: Stack, idp: TestIssuer) -> None:
    before = introspections(idp)
    for sub in ("erin", "frank"):
        assert seen(basic.get("/orders", token=idp.mint({"sub": sub})))["x-user-id"] == [sub]
    assert introspections(idp) == before


def test_idp_failing_is_503_not_401(basic: Stack, idp: TestIssuer) -> None:
    cached = idp.issue_opaque({"sub": "grace"})
    seen(basic.get("/orders", token=cached))
    idp.fail_path(INTROSPECTION_PATH, 500)
    token = idp.issue_opaque()
    before = introspections(idp)
    unavailable(basic.get("/orders", token=token))
    assert introspections(idp) > before  # it was asked, and failed
    # An answer already in hand still holds while the IdP is down.
    assert seen(basic.get("/orders", token=cached))["x-user-id"] == ["grace"]
    idp.heal()
    seen(basic.get("/orders", token=token))  # a failure is not cached as "inactive"
    assert token not in basic.log_text()


def test_idp_stopped_is_503(echo: EchoBackend, tmp_path: Path) -> None:
    """Connection refused: an issuer of its own (a stopped one cannot start on the same port)."""
    with (
        TestIssuer(audience=AUDIENCE) as issuer,
        introspecting_stack(
            echo, tmp_path, issuer, auth_method="client_secret_basic", endpoint=True
        ) as stack,
    ):
        cached, token = issuer.issue_opaque({"sub": "mallory"}), issuer.issue_opaque()
        seen(stack.get("/orders", token=cached))
        issuer.stop(drop_connections=True)
        started = time.monotonic()
        unavailable(stack.get("/orders", token=token))
        assert time.monotonic() - started < FETCH_TIMEOUT + 1.5
        # An answer already in hand holds while the IdP is gone.
        assert seen(stack.get("/orders", token=cached))["x-user-id"] == ["mallory"]
        assert token not in stack.log_text()


def test_a_slow_idp_is_503_within_the_fetch_timeout(basic: Stack, idp: TestIssuer) -> None:
    idp.delay_path(INTROSPECTION_PATH, FETCH_TIMEOUT * 4)
    token = idp.issue_opaque()
    before = introspections(idp)
    started = time.monotonic()
    unavailable(basic.get("/orders", token=token))
    elapsed = time.monotonic() - started
    assert FETCH_TIMEOUT * 0.8 <= elapsed < FETCH_TIMEOUT + 1.5, f"answered after {elapsed:.2f}s"
    assert introspections(idp) == before + 1
    idp.heal()
    assert seen(basic.get("/orders", token=token))["x-user-id"] == ["alice"]


# ---- introspection: explicit endpoint, client_secret_post, introspect_jwts -------------------


@pytest.fixture(scope="module")
def post(echo: EchoBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with (
        TestIssuer(audience=AUDIENCE) as issuer,
        introspecting_stack(
            echo,
            tmp_path_factory.mktemp("post"),
            issuer,
            auth_method="client_secret_post",
            endpoint=True,
            introspect_jwts=True,
        ) as stack,
    ):
        yield stack


@pytest.fixture
def post_idp(post: Stack) -> Iterator[TestIssuer]:
    issuer = post.issuers[0]
    yield issuer
    issuer.heal()
    issuer.set_introspection_client(CLIENT_ID, CLIENT_SECRET)


def test_client_secret_post_to_an_explicit_endpoint(post: Stack, post_idp: TestIssuer) -> None:
    token = post_idp.issue_opaque({"sub": "heidi"})
    before = introspections(post_idp)
    assert seen(post.get("/orders", token=token))["x-user-id"] == ["heidi"]
    assert introspections(post_idp) == before + 1
    status_of(post.get("/orders", token="unknown-token-" + "y" * 30), 401)
    assert token not in post.log_text()


def test_introspect_jwts_asks_about_each_jwt(post: Stack, post_idp: TestIssuer) -> None:
    unknown = post_idp.mint({"sub": "ivan"})
    before = introspections(post_idp)
    exchange = status_of(post.get("/orders", token=unknown), 401)
    assert challenge_error(exchange) == "invalid_token"
    assert introspections(post_idp) == before + 1  # validly signed, yet not active

    token = post_idp.mint({"sub": "judy"})
    post_idp.introspect_as_active(token)
    asked_at = time.monotonic()
    for _ in range(4):
        assert seen(post.get("/orders", token=token))["x-user-id"] == ["judy"]
    if time.monotonic() - asked_at < CACHE_SECONDS * 0.8:
        assert introspections(post_idp) == before + 2
    post_idp.revoke_opaque(token)
    time.sleep(max(0.0, CACHE_SECONDS + 0.2 - (time.monotonic() - asked_at)))
    status_of(post.get("/orders", token=token), 401)
    assert introspections(post_idp) >= before + 3


def test_introspect_jwts_idp_down_is_503(post: Stack, post_idp: TestIssuer) -> None:
    token = post_idp.mint({"sub": "ken"})
    post_idp.introspect_as_active(token)
    post_idp.fail_path(INTROSPECTION_PATH, 500)
    unavailable(post.get("/orders", token=token))
    post_idp.heal()
    assert seen(post.get("/orders", token=token))["x-user-id"] == ["ken"]


def test_wrong_client_secret_is_503_and_the_token_is_not_logged(post: Stack, post_idp: TestIssuer) -> None:
    # The IdP now knows our client by another secret: the one configured is wrong.
    post_idp.set_introspection_client(CLIENT_ID, "rotated-secret")
    token = post_idp.issue_opaque({"sub": "leo"})
    before = introspections(post_idp)
    exchange = post.get("/orders", token=token)
    unavailable(exchange)
    assert introspections(post_idp) == before + 1
    assert token not in exchange.response.body.decode("utf-8", "replace")
    wait_until(lambda: "token introspection failed" in post.log_text(), 5, "logged")
    log = post.log_text()
    assert token not in log
    assert CLIENT_SECRET not in log
    # Our refused credentials are no verdict on the token: once they are right it passes.
    post_idp.set_introspection_client(CLIENT_ID, CLIENT_SECRET)
    assert seen(post.get("/orders", token=token))["x-user-id"] == ["leo"]
