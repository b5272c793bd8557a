"""DPoP (RFC 9449) end to end: a real Envoy in front of the real ext-authz process.

The proof's `htu` is the URL the client addressed at Envoy: `http://127.0.0.1:<envoy port>/path`
(Envoy puts `:scheme` http and the client's Host, with its port, in the CheckRequest). Tokens
carry `cnf.jkt`, the thumbprint of the client's key, and every `iat` is this machine's clock.

One ext-authz process serves three issuers: `required` (tokens forwarded), `allowed` (tokens not
forwarded) and `required` with server nonces. Two more processes share one real redis-server
(`jwks_cache.backend: redis`) behind one public origin: a proof used at one replica is a replay at
the other, and without Redis a DPoP request fails closed (503 with Retry-After, never 200).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dpop import DPoPKey, compact, foreign_jwk_proof, hmac_proof, unsigned_proof
from tests.support.echo import EchoBackend
from tests.support.envoy import Exchange, Gateway, start_envoy
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz
from tests.support.redis import RedisServer

AUDIENCE = "api"
MAX_AGE = 10  # dpop_proof_max_age_seconds
PATH = "/orders"
PUBLIC_ORIGIN = "https://api.example.com"  # the replicas' load balancer, as the client sees it
CACHE_SECRET = "dpop-envoy-test-secret-0123456789abcdef"


@dataclass(frozen=True, slots=True)
class Issuers:
    required: TestIssuer
    allowed: TestIssuer
    nonce: TestIssuer


@pytest.fixture(scope="module")
def issuers() -> Iterator[Issuers]:
    with (
        TestIssuer(audience=AUDIENCE) as required,
        TestIssuer(audience=AUDIENCE) as allowed,
        TestIssuer(audience=AUDIENCE) as nonce,
    ):
        yield Issuers(required, allowed, nonce)


@pytest.fixture(scope="module")
def holder() -> DPoPKey:
    """The client the tokens are bound to."""
    return DPoPKey()


def dpop_provider(name: str, issuer: TestIssuer, mode: str, **keys: Any) -> dict[str, Any]:
    return {
        "name": name,
        "issuer": issuer.url,
        "audiences": [AUDIENCE],
        "jwks_uri": issuer.jwks_uri,
        "dpop": mode,
        "dpop_proof_max_age_seconds": MAX_AGE,
        **keys,
    }


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def authz(issuers: Issuers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtAuthzProcess]:
    document = {
        "listen": "127.0.0.1:0",
        "providers": [
            dpop_provider("bound", issuers.required, "required"),
            dpop_provider("mixed", issuers.allowed, "allowed", forward_token=False),
            dpop_provider("nonced", issuers.nonce, "required", dpop_nonce=True),
        ],
    }
    path = write_yaml(tmp_path_factory.mktemp("dpop") / "ext-authz.yaml", document)
    with start_ext_authz(path) as server:
        yield server


@pytest.fixture(scope="module", params=[False, True], ids=["headers", "raw-headers"])
def gateway(request: pytest.FixtureRequest, issuers: Issuers, authz: ExtAuthzProcess) -> Iterator[Gateway]:
    with (
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, encode_raw_headers=request.param) as envoy,
    ):
        yield Gateway(envoy, echo, issuers.required, authz, request.param)


# ---- helpers -----------------------------------------------------------------------------------


def url_of(gateway: Gateway, path: str = PATH) -> str:
    """The URL the client uses at Envoy: what `htu` must name."""
    return f"{gateway.envoy.base_url}{path}"


def bound_token(issuer: TestIssuer, key: DPoPKey, **claims: Any) -> str:
    return issuer.mint({"cnf": {"jkt": key.thumbprint}, **claims})


def dpop_request(
    gateway: Gateway,
    token: str,
    proofs: Sequence[str],
    *,
    method: str = "GET",
    path: str = PATH,
    host: str | None = None,
) -> Exchange:
    """`Authorization: DPoP <token>` and one `DPoP` header line per proof."""
    lines = [("Authorization", f"DPoP {token}"), *(("DPoP", proof) for proof in proofs)]
    return gateway.request(method, path, lines, host=host)


def challenge(exchange: Exchange) -> tuple[str, dict[str, str]]:
    """The WWW-Authenticate scheme and its parameters."""
    value = exchange.response.header("www-authenticate")
    assert value is not None, exchange.describe()
    scheme, _, rest = value.partition(" ")
    return scheme, dict(re.findall(r'([a-z_]+)="([^"]*)"', rest))


def assert_allowed(exchange: Exchange) -> dict[str, list[str]]:
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None, exchange.describe()
    return exchange.backend.headers


def assert_dpop_denied(exchange: Exchange, error: str, description: str | None = None) -> None:
    """401, the DPoP scheme with `error` (RFC 9449 §7.1), `algs` listed, the backend not reached."""
    assert exchange.response.status == 401, exchange.describe()
    assert exchange.backend is None, exchange.describe()
    scheme, params = challenge(exchange)
    assert scheme == "DPoP", exchange.describe()
    assert params.get("error") == error, exchange.describe()
    assert "ES256" in params.get("algs", "").split(), exchange.describe()
    if description is not None:
        assert exchange.response.json()["error_description"] == description, exchange.describe()


# ---- a valid proof ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256"])
def test_a_valid_proof_passes_and_never_reaches_the_backend(gateway: Gateway, alg: str) -> None:
    key = DPoPKey(alg)
    token = bound_token(gateway.issuer, key)
    headers = assert_allowed(dpop_request(gateway, token, [key.proof("GET", url_of(gateway), token)]))
    assert "dpop" not in headers
    # forward_token is on for this provider: the token reaches the backend as the client sent it.
    assert headers["authorization"] == [f"DPoP {token}"]


def test_htu_ignores_the_query_and_a_post_needs_htm_post(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = holder.proof("GET", url_of(gateway), token)
    assert_allowed(dpop_request(gateway, token, [proof], path=f"{PATH}?page=2"))
    post = holder.proof("POST", url_of(gateway), token)
    assert_allowed(dpop_request(gateway, token, [post], method="POST"))


def test_forward_token_false_removes_authorization_and_the_proof(issuers: Issuers, gateway: Gateway) -> None:
    key = DPoPKey()
    token = bound_token(issuers.allowed, key)
    headers = assert_allowed(dpop_request(gateway, token, [key.proof("GET", url_of(gateway), token)]))
    assert "authorization" not in headers
    assert "dpop" not in headers


# ---- proofs that do not fit the request, the token or the clock ----------------------------------------


def test_wrong_htm(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = holder.proof("POST", url_of(gateway), token)
    assert_dpop_denied(
        dpop_request(gateway, token, [proof]),
        "invalid_dpop_proof",
        "the DPoP proof htm does not match the request method",
    )


@pytest.mark.parametrize(
    "htu",
    [
        "{base}/other",
        "http://localhost:{port}" + PATH,  # same socket, another host name
        "http://127.0.0.1:{other_port}" + PATH,
        "https://127.0.0.1:{port}" + PATH,
        "http://127.0.0.1" + PATH,  # the port left out
    ],
    ids=["other-path", "other-host", "other-port", "other-scheme", "no-port"],
)
def test_wrong_htu(gateway: Gateway, holder: DPoPKey, htu: str) -> None:
    port = gateway.envoy.port
    url = htu.format(base=gateway.envoy.base_url, port=port, other_port=port + 1)
    token = bound_token(gateway.issuer, holder)
    assert_dpop_denied(
        dpop_request(gateway, token, [holder.proof("GET", url, token)]),
        "invalid_dpop_proof",
        "the DPoP proof htu does not match the request URL",
    )


def test_htu_comparison_normalises_scheme_and_host_and_drops_query_and_fragment(
    gateway: Gateway, holder: DPoPKey
) -> None:
    """RFC 9449 §4.3 point 9 (RFC 3986 §6.2.2.1, §6.2.3)."""
    token = bound_token(gateway.issuer, holder)
    port = gateway.envoy.port
    for htu, host in (
        (f"HTTP://127.0.0.1:{port}{PATH}", None),
        (f"http://localhost:{port}{PATH}", f"LOCALHOST:{port}"),
        (f"http://127.0.0.1:{port}{PATH}?page=1#top", None),
    ):
        assert_allowed(dpop_request(gateway, token, [holder.proof("GET", htu, token)], host=host))


def test_the_scheme_name_is_case_insensitive(gateway: Gateway, holder: DPoPKey) -> None:
    """RFC 9110 §11.1: `dpop` is the DPoP scheme too."""
    token = bound_token(gateway.issuer, holder)
    lines = [("Authorization", f"dpop {token}"), ("DPoP", holder.proof("GET", url_of(gateway), token))]
    assert_allowed(gateway.request("GET", PATH, lines))


def test_a_proof_for_envoy_sent_with_another_host_header(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = holder.proof("GET", url_of(gateway), token)
    assert_dpop_denied(
        dpop_request(gateway, token, [proof], host="api.example.com"),
        "invalid_dpop_proof",
        "the DPoP proof htu does not match the request URL",
    )


def test_wrong_ath_a_proof_for_another_token(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    other = bound_token(gateway.issuer, holder, sub="bob")
    assert_dpop_denied(
        dpop_request(gateway, token, [holder.proof("GET", url_of(gateway), other)]),
        "invalid_dpop_proof",
        "the DPoP proof ath does not match the access token",
    )
    no_ath = holder.proof("GET", url_of(gateway), None)
    assert_dpop_denied(
        dpop_request(gateway, token, [no_ath]), "invalid_dpop_proof", "the DPoP proof has no ath"
    )


@pytest.mark.parametrize(
    ("offset", "description"),
    [
        (-(MAX_AGE + 5), "the DPoP proof is too old"),
        (MAX_AGE + 5, "the DPoP proof iat is in the future"),
    ],
    ids=["stale", "future"],
)
def test_iat_outside_the_window(gateway: Gateway, holder: DPoPKey, offset: int, description: str) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = holder.proof("GET", url_of(gateway), token, iat=int(time.time()) + offset)
    assert_dpop_denied(dpop_request(gateway, token, [proof]), "invalid_dpop_proof", description)


def test_iat_a_little_off_is_accepted(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    for offset in (-(MAX_AGE - 4), MAX_AGE - 4):
        proof = holder.proof("GET", url_of(gateway), token, iat=int(time.time()) + offset)
        assert_allowed(dpop_request(gateway, token, [proof]))


def test_a_replayed_proof_is_refused(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = holder.proof("GET", url_of(gateway), token)
    assert_allowed(dpop_request(gateway, token, [proof]))
    assert_dpop_denied(
        dpop_request(gateway, token, [proof]), "invalid_dpop_proof", "the DPoP proof was used before"
    )


def test_alg_none_and_hmac_proofs(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    url = url_of(gateway)
    for proof in (
        unsigned_proof(holder, "GET", url, token),
        hmac_proof("GET", url, token, jwk=holder.public_jwk),
    ):
        assert_dpop_denied(
            dpop_request(gateway, token, [proof]),
            "invalid_dpop_proof",
            "the DPoP proof algorithm is not allowed",
        )
    # The header names ES256 and the bound key, and there is no signature at all.
    empty = compact(holder.header(), holder.claims("GET", url, token))
    assert_dpop_denied(
        dpop_request(gateway, token, [empty]), "invalid_dpop_proof", "the DPoP proof signature is invalid"
    )


def test_a_proof_of_another_key_is_a_binding_mismatch(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    thief = DPoPKey()
    # Self-consistent (the thief's jwk, signed by the thief): a valid proof, the wrong key (§7.1).
    assert_dpop_denied(
        dpop_request(gateway, token, [thief.proof("GET", url_of(gateway), token)]),
        "invalid_token",
        "the token is not bound to the DPoP proof key",
    )


def test_the_bound_keys_jwk_signed_by_another_key(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    proof = foreign_jwk_proof(DPoPKey(), holder, "GET", url_of(gateway), token)
    assert_dpop_denied(
        dpop_request(gateway, token, [proof]), "invalid_dpop_proof", "the DPoP proof signature is invalid"
    )


def test_two_dpop_headers(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    first, second = (holder.proof("GET", url_of(gateway), token) for _ in range(2))
    assert_dpop_denied(
        dpop_request(gateway, token, [first, second]),
        "invalid_dpop_proof",
        "the request carries more than one DPoP proof",
    )
    # Neither was recorded: each alone still passes (once).
    assert_allowed(dpop_request(gateway, token, [first]))


def test_the_dpop_scheme_without_a_proof(gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(gateway.issuer, holder)
    assert_dpop_denied(
        dpop_request(gateway, token, []), "invalid_dpop_proof", "the request carries no DPoP proof"
    )


# ---- bearer tokens and the modes ------------------------------------------------------------------------


def test_a_bound_token_as_a_bearer_token(issuers: Issuers, gateway: Gateway, holder: DPoPKey) -> None:
    """RFC 9449 §7.2: never accepted as a bearer token, even with a valid proof beside it."""
    for issuer in (issuers.required, issuers.allowed):
        token = bound_token(issuer, holder)
        for proofs in ([], [holder.proof("GET", url_of(gateway), token)]):
            exchange = gateway.get(PATH, [("DPoP", p) for p in proofs], token=token)
            assert_dpop_denied(
                exchange, "invalid_token", "a DPoP-bound token needs the DPoP scheme and a proof"
            )


def test_required_refuses_an_unbound_token(gateway: Gateway, holder: DPoPKey) -> None:
    unbound = gateway.issuer.mint()
    assert_dpop_denied(
        gateway.get(PATH, token=unbound), "invalid_token", "this issuer's tokens must be DPoP-bound"
    )
    # With the DPoP scheme and a valid proof of some key, it is still not bound to that key.
    proof = holder.proof("GET", url_of(gateway), unbound)
    assert_dpop_denied(
        dpop_request(gateway, unbound, [proof]),
        "invalid_token",
        "the token sent with the DPoP scheme is not DPoP-bound",
    )


def test_allowed_takes_an_unbound_bearer_token(issuers: Issuers, gateway: Gateway) -> None:
    headers = assert_allowed(gateway.get(PATH, token=issuers.allowed.mint()))
    assert "authorization" not in headers  # forward_token: false
    # A stray DPoP header beside a bearer token is not looked at, and still never reaches the backend.
    headers = assert_allowed(gateway.get(PATH, [("DPoP", "not-a-proof")], token=issuers.allowed.mint()))
    assert "dpop" not in headers


# ---- server nonces (RFC 9449 §8-9) ---------------------------------------------------------------------


def test_nonce_required_then_accepted(issuers: Issuers, gateway: Gateway, holder: DPoPKey) -> None:
    token = bound_token(issuers.nonce, holder)
    url = url_of(gateway)
    first = dpop_request(gateway, token, [holder.proof("GET", url, token)])
    assert_dpop_denied(first, "use_dpop_nonce", "the DPoP proof must carry the server nonce")
    nonce = first.response.header("dpop-nonce")
    assert nonce is not None and re.fullmatch(r"[A-Za-z0-9_-]+", nonce), first.describe()
    forged = nonce[:-2] + ("AA" if not nonce.endswith("AA") else "BB")
    wrong = dpop_request(gateway, token, [holder.proof("GET", url, token, nonce=forged)])
    assert_dpop_denied(wrong, "use_dpop_nonce")
    assert wrong.response.header("dpop-nonce") == nonce
    nonced = holder.proof("GET", url, token, nonce=nonce)
    headers = assert_allowed(dpop_request(gateway, token, [nonced]))
    assert "dpop" not in headers
    assert_dpop_denied(
        dpop_request(gateway, token, [nonced]), "invalid_dpop_proof", "the DPoP proof was used before"
    )


# ---- replicas sharing Redis -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replicas:
    redis: RedisServer
    first: Gateway
    second: Gateway


@contextlib.contextmanager
def running_replicas(issuers: Issuers, directory: Path) -> Iterator[Replicas]:
    """Two ext-authz processes, each behind its own Envoy, sharing one redis-server; both are
    reached by clients at PUBLIC_ORIGIN (`dpop_public_origin`), as behind one load balancer."""
    (directory / "jwks-cache-secret").write_text(CACHE_SECRET + "\n")
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        document = {
            "listen": "127.0.0.1:0",
            "jwks_cache": {"backend": "redis", "url": redis.url, "secret_file": "jwks-cache-secret"},
            "providers": [
                dpop_provider("bound", issuers.required, "required", dpop_public_origin=PUBLIC_ORIGIN),
                dpop_provider(
                    "nonced", issuers.nonce, "required", dpop_public_origin=PUBLIC_ORIGIN, dpop_nonce=True
                ),
            ],
        }
        path = write_yaml(directory / "ext-authz.yaml", document)
        gateways = []
        for _ in range(2):
            authz = stack.enter_context(start_ext_authz(path))
            echo = stack.enter_context(EchoBackend())
            envoy = stack.enter_context(start_envoy(authz.address, echo.port))
            gateways.append(Gateway(envoy, echo, issuers.required, authz, False))
        yield Replicas(redis, *gateways)


@pytest.fixture(scope="module")
def replicas(issuers: Issuers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with running_replicas(issuers, tmp_path_factory.mktemp("dpop-replicas")) as running:
        yield running


@pytest.fixture
def doomed_replicas(issuers: Issuers, tmp_path: Path) -> Iterator[Replicas]:
    """Replicas of their own, for a test that stops their Redis."""
    with running_replicas(issuers, tmp_path) as running:
        yield running


def public_proof(key: DPoPKey, token: str) -> str:
    return key.proof("GET", PUBLIC_ORIGIN + PATH, token)


def assert_unavailable(exchange: Exchange) -> None:
    """ext-authz's own 503 (not Envoy's status_on_error): Retry-After, temporarily_unavailable."""
    assert exchange.response.status == 503, exchange.describe()
    assert exchange.backend is None, exchange.describe()
    retry_after = exchange.response.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, exchange.describe()
    assert exchange.response.json()["error"] == "temporarily_unavailable", exchange.describe()


def test_a_proof_used_at_one_replica_is_a_replay_at_the_other(replicas: Replicas, holder: DPoPKey) -> None:
    token = bound_token(replicas.first.issuer, holder)
    # Each replica takes a fresh proof for the public URL: the refusal below is the replay alone.
    assert_allowed(dpop_request(replicas.second, token, [public_proof(holder, token)]))
    proof = public_proof(holder, token)
    assert_allowed(dpop_request(replicas.first, token, [proof]))
    assert_dpop_denied(
        dpop_request(replicas.second, token, [proof]), "invalid_dpop_proof", "the DPoP proof was used before"
    )
    # The internal address is not the URL the client used.
    internal = holder.proof("GET", url_of(replicas.first), token)
    assert_dpop_denied(dpop_request(replicas.first, token, [internal]), "invalid_dpop_proof")


def test_a_nonce_from_one_replica_is_good_at_the_other(
    issuers: Issuers, replicas: Replicas, holder: DPoPKey
) -> None:
    """The replicas share the jwks_cache secret, from which the nonce key is derived (RFC 9449 §8)."""
    token = bound_token(issuers.nonce, holder)
    first = dpop_request(replicas.first, token, [public_proof(holder, token)])
    assert_dpop_denied(first, "use_dpop_nonce")
    nonce = first.response.header("dpop-nonce")
    assert nonce is not None, first.describe()
    proof = holder.proof("GET", PUBLIC_ORIGIN + PATH, token, nonce=nonce)
    assert_allowed(dpop_request(replicas.second, token, [proof]))
    assert_dpop_denied(
        dpop_request(replicas.first, token, [proof]), "invalid_dpop_proof", "the DPoP proof was used before"
    )


def test_a_frozen_redis_fails_closed_then_recovers(replicas: Replicas, holder: DPoPKey) -> None:
    token = bound_token(replicas.first.issuer, holder)
    replicas.redis.pause()
    try:
        started = time.monotonic()
        assert_unavailable(dpop_request(replicas.first, token, [public_proof(holder, token)]))
        assert time.monotonic() - started < 1.9  # bounded by jwks_cache.timeout_seconds, not Envoy's 2 s
    finally:
        replicas.redis.resume()
    deadline = time.monotonic() + 5
    while True:
        exchange = dpop_request(replicas.first, token, [public_proof(holder, token)])
        if exchange.response.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert_allowed(exchange)


def test_a_stopped_redis_fails_closed(doomed_replicas: Replicas, holder: DPoPKey) -> None:
    replicas = doomed_replicas
    token = bound_token(replicas.first.issuer, holder)
    assert_allowed(dpop_request(replicas.first, token, [public_proof(holder, token)]))
    replicas.redis.stop()
    for gateway in (replicas.first, replicas.second, replicas.first):
        assert_unavailable(dpop_request(gateway, token, [public_proof(holder, token)]))
    # A token that is not DPoP-bound needs no replay check: the rest of the service still answers.
    assert_dpop_denied(replicas.first.get(PATH, token=replicas.first.issuer.mint()), "invalid_token")
