"""Differential test: ext-authz against Envoy's own JWT filter (jwt_authn), on one real Envoy.

One Envoy process has two listeners in front of the same echo backend: `jwt` runs
`envoy.filters.http.jwt_authn` configured like the ext-authz provider (issuer, audiences, the same
keys inline, clock_skew_seconds 60, require_expiration, forward: true), `authz` runs ext_authz →
a real ext-authz process (`jwks:` inline, same issuer and audiences, default algorithms). Every
token of the corpus goes through both; the decision is whether the backend got the request.

Both must decide as the corpus says, except the cases in DIFFERENCES: there they must differ
exactly as listed, each for the reason given. A case where they disagree without being listed
is either a bug or a difference to document.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, utils

from ext_authz import jws
from ext_authz.dev.plan import envoy_binary
from tests.support.attacks import P256_ORDER
from tests.support.echo import EchoBackend
from tests.support.envoy import LISTENER_NAME, TRACE_HEADER, envoy_config, send
from tests.support.idp import SigningKey, b64url, b64url_decode, public_jwk, tamper_signature
from tests.support.processes import DEFAULT_READY_TIMEOUT, ExtAuthzProcess, ManagedProcess, start_ext_authz

ISSUER = "https://idp.example.com/"
AUDIENCE = "api"
SKEW = 60
JWT_LISTENER = "jwt"


# ---- keys: one per algorithm family, plus two that make interesting cases ----


class Keys:
    def __init__(self) -> None:
        self.rs = SigningKey(
            "rsa-rs", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        self.ps = SigningKey(
            "rsa-ps", "PS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        self.es256 = SigningKey("ec-256", "ES256", ec.generate_private_key(ec.SECP256R1()))
        # A second ES256 key: a token without kid then fits two keys.
        self.es256_b = SigningKey("ec-256-b", "ES256", ec.generate_private_key(ec.SECP256R1()))
        self.es384 = SigningKey("ec-384", "ES384", ec.generate_private_key(ec.SECP384R1()))
        self.ed = SigningKey("ed", "EdDSA", ed25519.Ed25519PrivateKey.generate())
        # Under ext-authz's 2048-bit minimum: skipped by ext-authz when it loads the set.
        self.weak = SigningKey(
            "rsa-1024",
            "RS256",
            rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
        )
        self.attacker = SigningKey(
            "rsa-rs", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )

    def jwks(self) -> dict[str, Any]:
        published = (self.rs, self.ps, self.es256, self.es256_b, self.es384, self.ed, self.weak)
        return {"keys": [public_jwk(k.public_key, kid=k.kid, alg=k.alg) for k in published]}


@dataclass(frozen=True, slots=True)
class Minter:
    keys: Keys
    now: int

    def claims(self, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": self.now,
            "exp": self.now + 300,
        }
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def token(
        self, key: SigningKey | None = None, header: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        key = key or self.keys.rs
        full = {
            k: v
            for k, v in {"alg": key.alg, "typ": "JWT", "kid": key.kid, **(header or {})}.items()
            if v is not None
        }
        return self.raw(json.dumps(full), json.dumps(self.claims(**claims)), key)

    def raw(self, header: str, payload: str, key: SigningKey | None = None) -> str:
        key = key or self.keys.rs
        return jws.sign(header.encode(), payload.encode(), key.private_key, key.alg)

    def payload_text(self, **raw: str) -> str:
        """The default claims as JSON text with members set to raw JSON text (duplicates allowed)."""
        return json.dumps(self.claims())[:-1] + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}"


def _resign(token: str, signature: bytes) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{b64url(signature)}"


def _non_canonical(token: str) -> str:
    """The same signature bytes spelled with non-zero trailing bits in the last character."""
    head, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    original = b64url_decode(signature)
    for ch in alphabet:
        spelled = signature[:-1] + ch
        if ch != signature[-1] and b64url_decode(spelled) == original:
            return f"{head}.{payload}.{spelled}"
    raise AssertionError("no non-canonical spelling")


def _high_s(m: Minter) -> str:
    """ES256 with s replaced by n - s: a second valid signature of the same bytes (malleability)."""
    token = m.token(m.keys.es256)
    raw = b64url_decode(token.split(".")[2])
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    return _resign(token, r.to_bytes(32, "big") + (P256_ORDER - s).to_bytes(32, "big"))


def _der(m: Minter) -> str:
    token = m.token(m.keys.es256)
    raw = b64url_decode(token.split(".")[2])
    return _resign(
        token, utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    )


def _padded(token: str) -> str:
    parts = token.split(".")
    return ".".join(p + "=" * (-len(p) % 4) for p in parts)


def _hs256(m: Minter) -> str:
    """Algorithm confusion: HS256 keyed with the RS256 key's public PEM."""
    pem = m.keys.rs.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-rs"}).encode())
    signing_input = f"{head}.{b64url(json.dumps(m.claims()).encode())}"
    return f"{signing_input}.{b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


ALLOW, DENY = True, False

# (case, token maker, ext-authz's decision). jwt_authn must decide the same unless in DIFFERENCES.
CORPUS: list[tuple[str, Callable[[Minter], str], bool]] = [
    ("valid-RS256", lambda m: m.token(m.keys.rs), ALLOW),
    ("valid-PS256", lambda m: m.token(m.keys.ps), ALLOW),
    ("valid-ES256", lambda m: m.token(m.keys.es256), ALLOW),
    ("valid-ES384", lambda m: m.token(m.keys.es384), ALLOW),
    ("valid-EdDSA", lambda m: m.token(m.keys.ed), ALLOW),
    ("valid-typ-at+jwt", lambda m: m.token(header={"typ": "at+jwt"}), ALLOW),
    ("valid-aud-array", lambda m: m.token(aud=["other", AUDIENCE]), ALLOW),
    ("valid-nbf-in-the-past", lambda m: m.token(nbf=m.now - 60), ALLOW),
    ("no-kid-one-RS256-key", lambda m: m.token(header={"kid": None}), ALLOW),
    ("no-kid-EdDSA", lambda m: m.token(m.keys.ed, {"kid": None}), ALLOW),
    ("no-kid-two-ES256-keys-fit", lambda m: m.token(m.keys.es256, {"kid": None}), DENY),
    ("expired", lambda m: m.token(exp=m.now - 3600), DENY),
    ("exp-past-the-skew", lambda m: m.token(exp=m.now - SKEW - 10), DENY),
    ("exp-at-the-skew-edge", lambda m: m.token(exp=m.now - SKEW), DENY),
    ("exp-within-the-skew", lambda m: m.token(exp=m.now - SKEW + 10), ALLOW),
    ("nbf-within-the-skew", lambda m: m.token(nbf=m.now + SKEW - 10), ALLOW),
    ("nbf-past-the-skew", lambda m: m.token(nbf=m.now + SKEW + 10), DENY),
    ("not-yet-valid", lambda m: m.token(nbf=m.now + 3600), DENY),
    ("iat-in-the-future", lambda m: m.token(iat=m.now + 3600), DENY),
    ("no-exp", lambda m: m.token(exp=None), DENY),
    ("exp-float", lambda m: m.token(exp=m.now + 300.5), ALLOW),
    ("exp-string", lambda m: m.token(exp=str(m.now + 300)), DENY),
    ("exp-huge", lambda m: m.token(exp=10**20), DENY),  # NumericDates are [0, 2**64) on both sides
    ("nbf-negative", lambda m: m.token(nbf=-1), DENY),
    ("wrong-audience", lambda m: m.token(aud="other"), DENY),
    ("no-audience", lambda m: m.token(aud=None), DENY),
    ("aud-number", lambda m: m.token(aud=123), DENY),
    ("wrong-issuer", lambda m: m.token(iss="https://other.example/"), DENY),
    ("no-issuer", lambda m: m.token(iss=None), DENY),
    ("bad-signature", lambda m: tamper_signature(m.token()), DENY),
    ("signed-by-another-key-same-kid", lambda m: m.token(m.keys.attacker), DENY),
    ("unknown-kid", lambda m: m.token(header={"kid": "nope"}), DENY),
    ("kid-of-another-algorithm", lambda m: m.token(m.keys.es384, {"kid": "ec-256"}), DENY),
    ("weak-rsa-1024-key", lambda m: m.token(m.keys.weak), DENY),
    ("signature-non-canonical-base64", lambda m: _non_canonical(m.token()), ALLOW),
    ("ecdsa-high-s", _high_s, ALLOW),
    ("ecdsa-der-signature", _der, DENY),
    ("ecdsa-r0-s0", lambda m: _resign(m.token(m.keys.es256), b"\x00" * 64), DENY),
    (
        "alg-none",
        lambda m: ".".join(b64url(json.dumps(p).encode()) for p in ({"alg": "none"}, m.claims())) + ".",
        DENY,
    ),
    ("HS256-keyed-with-public-key", _hs256, DENY),
    ("typ-not-accepted", lambda m: m.token(header={"typ": "JOSE+JSON"}), DENY),
    ("crit", lambda m: m.token(header={"crit": ["exp"], "exp": m.now + 60}), DENY),
    ("b64-false-with-crit", lambda m: m.token(header={"b64": False, "crit": ["b64"]}), DENY),
    ("b64-true-without-crit", lambda m: m.token(header={"b64": True}), DENY),
    ("jku-header-ignored", lambda m: m.token(header={"jku": "https://attacker.example/jwks.json"}), ALLOW),
    (
        "duplicate-claim",
        lambda m: m.raw(json.dumps({"alg": "RS256", "kid": "rsa-rs"}), m.payload_text(sub='"admin"')),
        DENY,
    ),
    (
        "duplicate-header-member",
        lambda m: m.raw('{"alg": "RS256", "kid": "x", "kid": "rsa-rs"}', json.dumps(m.claims())),
        DENY,
    ),
    ("padded-segments", lambda m: _padded(m.token()), DENY),
    ("over-16-KiB", lambda m: m.token(pad="x" * 17_000), DENY),
    ("garbage", lambda m: "garbage", DENY),
    ("two-segments", lambda m: m.token().rsplit(".", 1)[0], DENY),
    (
        "jwe-5-segments",
        lambda m: ".".join([b64url(b'{"alg":"RSA-OAEP","enc":"A256GCM"}'), "a", "b", "c", "d"]),
        DENY,
    ),
    ("payload-not-an-object", lambda m: m.raw(json.dumps({"alg": "RS256", "kid": "rsa-rs"}), "[1]"), DENY),
    (
        "exp-1e400",
        lambda m: m.raw(
            json.dumps({"alg": "RS256", "kid": "rsa-rs"}),
            json.dumps(m.claims(exp=None))[:-1] + ', "exp": 1e400}',
        ),
        DENY,
    ),
]

# Where the two filters decide differently on purpose: (ext-authz, jwt_authn, why).
DIFFERENCES: dict[str, tuple[bool, bool, str]] = {
    "no-kid-two-ES256-keys-fit": (
        DENY,
        ALLOW,
        "ext-authz picks exactly one key and refuses a token that names none when several fit its "
        "alg; jwt_authn tries every key that fits and accepts if any verifies",
    ),
    "iat-in-the-future": (
        DENY,
        ALLOW,
        "ext-authz rejects iat later than now + skew (a token from the future is a clock or "
        "issuer fault); jwt_authn does not look at iat",
    ),
    "exp-at-the-skew-edge": (
        DENY,
        ALLOW,
        "at exactly exp + skew: ext-authz follows RFC 7519 §4.1.4 (not accepted on or after exp); "
        "jwt_authn rejects only after it (now > exp + skew)",
    ),
    "weak-rsa-1024-key": (
        DENY,
        ALLOW,
        "ext-authz skips RSA keys under 2048 bits when it loads a key set (NIST SP 800-131A); "
        "jwt_authn uses any RSA key",
    ),
    "typ-not-accepted": (
        DENY,
        ALLOW,
        "ext-authz checks typ against token_types (JWT, at+jwt by default; RFC 8725 §3.11 explicit "
        "typing); jwt_authn ignores typ",
    ),
    "crit": (
        DENY,
        ALLOW,
        "RFC 7515 §4.1.11: a recipient that does not understand a crit extension must reject the "
        "JWS; ext-authz implements none and rejects every crit, jwt_authn ignores crit",
    ),
    "b64-false-with-crit": (
        DENY,
        ALLOW,
        "RFC 7797 is not implemented: ext-authz refuses any b64 header member (crit or not); "
        "jwt_authn verifies the encoded form and ignores b64 and crit",
    ),
    "b64-true-without-crit": (
        DENY,
        ALLOW,
        "the same b64 rule: an RFC 7797 implementation and one without it may read a token with "
        "b64 differently, so ext-authz refuses it; jwt_authn ignores b64",
    ),
    "over-16-KiB": (
        DENY,
        ALLOW,
        "ext-authz rejects tokens over max_token_bytes (16 KiB by default) before parsing; "
        "jwt_authn is bounded only by Envoy's header size limit (60 KiB)",
    ),
}

# Where ext-authz is wrong: the decision it should make is the one in CORPUS (strict xfail).
KNOWN_BUGS: dict[str, str] = {}


# ---- the stack: one Envoy, two listeners ----


def differential_config(authz_address: str, backend_port: int, jwks: dict[str, Any]) -> dict[str, Any]:
    """tests/support/envoy's bootstrap (its ext_authz listener) plus a jwt_authn listener."""
    config = envoy_config(authz_address, backend_port)
    (authz_listener,) = config["static_resources"]["listeners"]
    jwt_listener = json.loads(json.dumps(authz_listener))
    jwt_listener["name"] = JWT_LISTENER
    hcm = jwt_listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "jwt_http"
    router = hcm["http_filters"][-1]
    hcm["http_filters"] = [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    "idp": {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "local_jwks": {"inline_string": json.dumps(jwks)},
                        "clock_skew_seconds": SKEW,
                        "require_expiration": True,  # ext-authz requires exp
                        "forward": True,
                        "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                    }
                },
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "idp"}}],
            },
        },
        router,
    ]
    config["static_resources"]["listeners"].append(jwt_listener)
    return config


@dataclass(frozen=True, slots=True)
class TwoListeners:
    process: ManagedProcess
    admin_address: str
    ports: dict[str, int]  # listener name → port


def _admin(address: str, path: str) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_two_listener_envoy(workdir: Path, config: dict[str, Any]) -> TwoListeners:
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    admin_path = workdir / "admin-address"
    argv = [envoy_binary(), "-c", str(path), "--admin-address-path", str(admin_path), "--use-dynamic-base-id",
            "--concurrency", "1", "-l", "warning"]  # fmt: skip
    process = ManagedProcess("envoy", argv)
    deadline = time.monotonic() + DEFAULT_READY_TIMEOUT
    try:
        while True:
            process.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(process.describe_failure("not ready"))
            time.sleep(0.05)
            if not admin_path.exists() or not admin_path.read_text().strip():
                continue
            admin = admin_path.read_text().strip()
            try:
                status, body = _admin(admin, "/listeners?format=json")
                ready = _admin(admin, "/ready")
            except OSError:
                continue
            if status != 200 or ready != (200, b"LIVE\n"):
                continue
            ports = {
                entry["name"]: entry["local_address"]["socket_address"]["port_value"]
                for entry in json.loads(body).get("listener_statuses", [])
            }
            if {JWT_LISTENER, LISTENER_NAME} <= set(ports) and all(ports.values()):
                return TwoListeners(process, admin, ports)
    except BaseException:
        process.stop()
        raise


@dataclass(frozen=True, slots=True)
class Differential:
    envoy: TwoListeners
    echo: EchoBackend
    authz: ExtAuthzProcess
    keys: Keys

    def allowed(self, listener: str, token: str) -> bool:
        trace = uuid.uuid4().hex
        lines = [(TRACE_HEADER, trace), ("Authorization", f"Bearer {token}")]
        response = send(f"http://127.0.0.1:{self.envoy.ports[listener]}", "GET", "/orders", lines)
        reached = any(r.header_values(TRACE_HEADER) == [trace] for r in self.echo.requests)
        assert reached == (response.status == 200), (listener, response.describe())
        return reached


@pytest.fixture(scope="module")
def differential(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Differential]:
    keys = Keys()
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-differential-"))
    config = {
        "listen": "127.0.0.1:0",
        "providers": [
            {
                "name": "idp",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks": keys.jwks(),
                "clock_skew_seconds": SKEW,
            }
        ],
    }
    config_file = workdir / "ext-authz.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        with EchoBackend() as echo, start_ext_authz(config_file) as authz:
            envoy = start_two_listener_envoy(
                workdir, differential_config(authz.address, echo.port, keys.jwks())
            )
            try:
                yield Differential(envoy, echo, authz, keys)
            finally:
                envoy.process.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def decisions(differential: Differential) -> dict[str, tuple[bool, bool]]:
    """Each case's (ext-authz, jwt_authn) decision; tokens minted just before they are sent."""
    results = {}
    for case, make, _ in CORPUS:
        if case == "exp-at-the-skew-edge":
            # Both sides must judge within the second the token was minted in: jwt_authn's clock
            # counts whole seconds, so start at the top of a second.
            time.sleep(1.02 - time.time() % 1)
        token = make(Minter(differential.keys, int(time.time())))
        results[case] = (
            differential.allowed(LISTENER_NAME, token),
            differential.allowed(JWT_LISTENER, token),
        )
    differential.authz.process.check_alive()
    return results


def _params() -> list[Any]:
    params = []
    for case, _, expected in CORPUS:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case])] if case in KNOWN_BUGS else []
        params.append(pytest.param(case, expected, id=case, marks=marks))
    return params


@pytest.mark.parametrize(("case", "expected"), _params())
def test_decisions_agree_or_differ_as_documented(
    decisions: dict[str, tuple[bool, bool]], case: str, expected: bool
) -> None:
    ours, theirs = decisions[case]
    name = {ALLOW: "allow", DENY: "deny"}
    observed = f"ext-authz {name[ours]}, jwt_authn {name[theirs]}"
    if case in DIFFERENCES:
        documented_ours, documented_theirs, _ = DIFFERENCES[case]
        assert (ours, theirs) == (documented_ours, documented_theirs), observed
        assert ours == expected, observed
    else:
        assert ours == theirs == expected, observed


def test_tables_name_only_corpus_cases() -> None:
    cases = {case for case, _, _ in CORPUS}
    assert len(cases) == len(CORPUS)
    assert set(DIFFERENCES) <= cases and set(KNOWN_BUGS) <= cases
    assert not set(DIFFERENCES) & set(KNOWN_BUGS)
    for case, (ours, theirs, _) in DIFFERENCES.items():
        assert ours != theirs and ours == next(e for c, _, e in CORPUS if c == case)
