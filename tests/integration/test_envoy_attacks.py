"""The attack corpus end to end: a real Envoy in front of a real ext-authz and the echo backend.

A representative subset of tests/unit/test_attacks.py goes through Envoy in both header encodings;
every attack is refused with the expected status and RFC 6750 code and never reaches the backend.
Header safety is checked where it matters, at the backend: a claim that is not a legal header
value is left out while the request still succeeds, and an identity header forged by the client
(any case, repeated, on any route kind) never arrives. Last, every kind of denial is driven
through Envoy and ext-authz's complete output (stdout and stderr, from start to stop) and every
raw response is searched for the tokens, their signatures and the credential header values.

This module runs its own issuer (the unit tests' keys, published over HTTP), ext-authz process
(output kept in a file, whole) and Envoy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.attacks import P256_ORDER, Forge, jwe_token, nested_token, unencoded_payload_token
from tests.support.echo import EchoBackend
from tests.support.envoy import TRACE_HEADER, EnvoyProcess, Exchange, send, start_envoy
from tests.support.idp import JWKS_PATH, TestIssuer, b64url, b64url_decode
from tests.support.processes import DEFAULT_READY_TIMEOUT, ProcessError, json_log_line, venv_python
from tests.support.tokens import Keys

AUDIENCE = "api"
GUARDED_HOSTS = ["admin.example.com", "[2001:db8::1]"]  # rules[0]: a hosts rule before /public/*


# ---- the stack ----


class LoggedExtAuthz:
    """`python -m ext_authz serve` with its whole stdout and stderr kept in one file."""

    def __init__(self, config: Path, log: Path, *, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            [venv_python(), "-m", "ext_authz", "serve", "--config", str(config), "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        try:
            self.address = self._wait_until_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_serving(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                record = json_log_line(line)
                if record is not None and record.get("event") == "serving":
                    return str(record["address"])
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise ProcessError(f"ext-authz not serving (exit {self.popen.poll()}):\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ProcessError(f"ext-authz exited with {self.popen.returncode}:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self._out.close()


@dataclass(frozen=True, slots=True)
class Stack:
    envoy: EnvoyProcess
    echo: EchoBackend
    issuer: TestIssuer
    down: TestIssuer  # an issuer whose JWKS endpoint fails: its tokens meet "keys unavailable"
    authz: LoggedExtAuthz
    forge: Forge

    def get(self, path: str, headers: Sequence[tuple[str, str]] = (), token: str | None = None) -> Exchange:
        trace = uuid.uuid4().hex
        lines = [
            (TRACE_HEADER, trace),
            *((("Authorization", f"Bearer {token}"),) if token is not None else ()),
        ]
        response = send(self.envoy.base_url, "GET", path, [*lines, *headers])
        reached = [r for r in self.echo.requests if r.header_values(TRACE_HEADER) == [trace]]
        assert len(reached) <= 1
        return Exchange(response, reached[0] if reached else None)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def issuer(keys: Keys) -> Iterator[TestIssuer]:
    """Publishes the unit tests' RSA, EC and EdDSA keys (and only those)."""
    running = TestIssuer(audience=AUDIENCE)
    generated = running.default_kid
    for key in (keys.ed, keys.ec, keys.rsa):
        running.add_key(key.alg, kid=key.kid, private_key=key.private_key, make_default=True)
    running.remove_key(generated)
    with running:
        yield running


@pytest.fixture(scope="module")
def down() -> Iterator[TestIssuer]:
    with TestIssuer(audience=AUDIENCE) as failing:
        failing.fail_path(JWKS_PATH, 500)
        yield failing


@pytest.fixture(scope="module")
def authz(
    issuer: TestIssuer, down: TestIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedExtAuthz]:
    directory = tmp_path_factory.mktemp("attacks")
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        # As talkative as it gets: every decision, subjects in clear, debug logs.
        "log": {"level": "debug", "decisions": "all", "subject": "plain"},
        "readiness": "any",
        "providers": [
            {
                "name": "attacks",
                "issuer": issuer.url,
                "audiences": [AUDIENCE],
                "jwks_uri": issuer.jwks_uri,
                "from_cookies": ["session"],
                "from_params": ["access_token"],
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-note", "claim": "note"},
                    {"header": "x-name", "claim": "name"},
                    {"header": "x-roles", "claim": "roles"},
                ],
                "payload_header": "x-jwt-payload",
            },
            {
                "name": "down",
                "issuer": down.url,
                "audiences": [AUDIENCE],
                "jwks_uri": down.jwks_uri,
                "fetch_timeout_seconds": 0.5,
            },
        ],
        "rules": [
            {"match": {"hosts": GUARDED_HOSTS}, "require": {"scopes": ["admin"]}},
            {"match": {"paths": ["/public/*"]}, "allow": "anonymous"},
            {"match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
            {"match": {"paths": ["/*"]}, "require": {}},
        ],
    }
    file = directory / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    server = LoggedExtAuthz(file, directory / "ext-authz.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=[False, True], ids=["headers", "raw-headers"])
def stack(
    request: pytest.FixtureRequest, keys: Keys, issuer: TestIssuer, down: TestIssuer, authz: LoggedExtAuthz
) -> Iterator[Stack]:
    def real_time_claims(**overrides: Any) -> dict[str, Any]:
        return {k: v for k, v in issuer.claims().items() if k not in overrides} | {
            k: v for k, v in overrides.items() if v is not None
        }

    with (
        EchoBackend() as echo,
        start_envoy(authz.address, echo.port, encode_raw_headers=request.param) as envoy,
    ):
        yield Stack(envoy, echo, issuer, down, authz, Forge(keys, real_time_claims))
        authz.check_alive()


def challenge_error(exchange: Exchange) -> str | None:
    value = exchange.response.header("www-authenticate") or ""
    params = dict(part.split("=", 1) for part in value.removeprefix("Bearer ").split(", ") if "=" in part)
    error = params.get("error")
    return error.strip('"') if error else None


# ---- the corpus, through Envoy ----


@dataclass(frozen=True, slots=True)
class Attack:
    id: str
    # A token for "Authorization: Bearer", or (path, extra header lines) for a request of its own.
    make: Callable[[Forge], str | tuple[str, list[tuple[str, str]]]]
    status: int = 401
    error: str | None = "invalid_token"


def _claims_text(f: Forge, **raw: str) -> str:
    text = json.dumps(f.claims())
    return text[:-1] + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}"


HEADER = '{"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}'
ATTACKS = [
    Attack("alg-none", lambda f: f.unsigned({"alg": "none", "typ": "JWT"})),
    Attack("alg-None-with-signature", lambda f: f.unsigned({"alg": "None", "kid": "rsa-1"}, b"\x01" * 256)),
    Attack("HS256-keyed-with-public-pem", lambda f: f.hmac("HS256", f.public_pem(f.keys.rsa))),
    Attack("jku-attacker-url", lambda f: f.attacker_signed(jku="https://attacker.example/jwks.json")),
    Attack("jwk-embedded-attacker-key", lambda f: f.attacker_signed(jwk=f.attacker_jwk())),
    Attack("x5c-attacker-certificate", lambda f: f.attacker_signed(x5c=f.x5c())),
    Attack("kid-path-traversal", lambda f: f.token(header={"kid": "../../../../dev/null"})),
    Attack("crit", lambda f: f.token(header={"crit": ["exp"], "exp": 1})),
    Attack("b64-false-unencoded-payload", lambda f: unencoded_payload_token(f, crit=True)),
    Attack("jwe-5-parts", lambda f: jwe_token()),
    Attack("nested-jwt", lambda f: nested_token(f, f.keys.rsa)),
    Attack(
        "duplicate-header-alg",
        lambda f: f.raw('{"alg": "RS256", "alg": "none", "kid": "rsa-1"}', json.dumps(f.claims())),
    ),
    Attack("duplicate-payload-sub", lambda f: f.raw(HEADER, _claims_text(f, sub='"admin"'))),
    Attack("ecdsa-r0-s0", lambda f: f.ec_signature(raw=b"\x00" * 64)),
    Attack("ecdsa-r-s-equal-order", lambda f: f.ec_signature(P256_ORDER, P256_ORDER)),
    Attack("es256-claiming-rsa-kid", lambda f: f.token(f.keys.ec, {"kid": "rsa-1"})),
    Attack("exp-string", lambda f: f.token(exp=str(int(time.time()) + 300))),
    Attack("aud-number", lambda f: f.token(aud=123)),
    Attack("iss-array", lambda f: f.token(iss=[f.claims()["iss"]])),
    Attack("non-ascii-inside", lambda f: f.token()[:30] + "é" + f.token()[31:]),
    Attack(
        "bearer-without-token", lambda f: ("/orders", [("Authorization", "Bearer")]), 400, "invalid_request"
    ),
    Attack(
        "two-authorization-headers",
        lambda f: (
            "/orders",
            [("Authorization", f"Bearer {f.token()}"), ("Authorization", f"Bearer {f.token(sub='bob')}")],
        ),
        400,
        "invalid_request",
    ),
    Attack(
        "header-and-query-parameter",
        lambda f: (f"/orders?access_token={f.token(sub='bob')}", [("Authorization", f"Bearer {f.token()}")]),
        400,
        "invalid_request",
    ),
    Attack(
        "header-and-query-parameter-same-token",
        lambda f: (f"/orders?access_token={(t := f.token())}", [("Authorization", f"Bearer {t}")]),
        400,
        "invalid_request",
    ),
    Attack("b64-true-without-crit", lambda f: f.token(header={"b64": True})),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.id for a in ATTACKS])
def test_attack_is_refused_through_envoy(stack: Stack, attack: Attack) -> None:
    made = attack.make(stack.forge)
    exchange = stack.get("/orders", token=made) if isinstance(made, str) else stack.get(made[0], made[1])
    assert exchange.backend is None, exchange.describe()
    assert exchange.response.status == attack.status, exchange.describe()
    assert challenge_error(exchange) == attack.error, exchange.describe()
    assert exchange.response.json()["error"] == attack.error


def test_100kb_token_never_reaches_the_backend(stack: Stack) -> None:
    """Envoy's own header limit (60 KiB by default) may answer 431 before ext-authz is asked."""
    token = stack.forge.token(pad="x" * 100_000)
    exchange = stack.get("/orders", token=token)
    assert exchange.backend is None, exchange.describe()
    assert exchange.response.status in (401, 431), exchange.describe()
    if exchange.response.status == 401:
        assert exchange.response.json()["error_description"] == "the token is too large"
    just_over = stack.forge.token(pad="x" * 12_500)  # over ext-authz's 16 KiB, under Envoy's limit
    exchange = stack.get("/orders", token=just_over)
    assert (exchange.response.status, exchange.backend) == (401, None), exchange.describe()
    assert exchange.response.json()["error_description"] == "the token is too large"


# ---- header safety at the backend ----


def test_illegal_claim_values_are_left_out_and_the_request_succeeds(stack: Stack) -> None:
    token = stack.forge.token(note="a\r\nx-injected: 1", name="ctl\x01char", roles=["ok", "nul\x00"])
    exchange = stack.get("/orders", [("x-note", "forged")], token=token)
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None
    seen = exchange.backend.headers
    assert seen["x-user-id"] == ["alice"]
    for name in ("x-note", "x-name", "x-roles", "x-injected"):
        assert name not in seen, (name, seen)
    for value in ("\x7fdel", "x" * 8193, " padded"):
        exchange = stack.get("/orders", token=stack.forge.token(note=value))
        assert exchange.response.status == 200, exchange.describe()
        assert exchange.backend is not None and "x-note" not in exchange.backend.headers


def test_non_ascii_claim_reaches_the_backend_as_utf8(stack: Stack) -> None:
    exchange = stack.get("/orders", token=stack.forge.token(name="José Dąbrowska 🚀", note="a\u2028b"))
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None
    # The echo backend decodes header bytes as Latin-1: undo that to see the bytes Envoy sent.
    (name,) = exchange.backend.headers["x-name"]
    assert name.encode("latin-1").decode("utf-8") == "José Dąbrowska 🚀"
    (note,) = exchange.backend.headers["x-note"]
    assert note.encode("latin-1").decode("utf-8") == "a\u2028b"


FORGED = [
    ("X-User-Id", "mallory"),
    ("x-user-id", "eve"),
    ("X-USER-ID", "trudy"),
    ("x-note", "forged"),
    ("X-Note", "forged-again"),
    ("X-Jwt-Payload", "eyJzdWIiOiJhZG1pbiJ9"),
    ("x_user_id", "underscore"),  # Envoy drops underscored names (headers_with_underscores_action)
]
ROUTES: list[tuple[str, str, Callable[[Forge], str | None], dict[str, Callable[[str], list[str]]]]] = [
    (
        "protected-valid-token",
        "/orders",
        lambda f: f.token(),
        {"x-user-id": lambda t: ["alice"], "x-jwt-payload": lambda t: [t.split(".")[1]]},
    ),
    ("anonymous-no-token", "/public/x", lambda f: None, {}),
    ("anonymous-invalid-token", "/public/x", lambda f: f.token(exp=1), {}),
    (
        "anonymous-valid-token",
        "/public/x",
        lambda f: f.token(),
        {"x-user-id": lambda t: ["alice"], "x-jwt-payload": lambda t: [t.split(".")[1]]},
    ),
]


@pytest.mark.parametrize(("kind", "path", "make", "expected"), ROUTES, ids=[r[0] for r in ROUTES])
def test_forged_identity_headers_never_reach_the_backend(
    stack: Stack,
    kind: str,
    path: str,
    make: Callable[[Forge], str | None],
    expected: dict[str, Callable[[str], list[str]]],
) -> None:
    token = make(stack.forge)
    exchange = stack.get(path, FORGED, token=token)
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None
    seen = exchange.backend.headers
    for name in ("x-user-id", "x-note", "x-name", "x-roles", "x-jwt-payload", "x_user_id"):
        want = expected[name](token or "") if name in expected else None
        assert seen.get(name) == want, (name, seen.get(name))


# ---- claims the answer could not carry, end to end ----

UNENCODABLE = [
    ("lone-surrogate-claim", "name", '"\\ud800"'),
    ("integer-beyond-double-range", "big", "1" + "0" * 400),
]


@pytest.mark.parametrize(("case", "claim", "raw"), UNENCODABLE, ids=[n for n, _, _ in UNENCODABLE])
def test_unencodable_claim_gets_a_clean_answer(stack: Stack, case: str, claim: str, raw: str) -> None:
    token = stack.forge.raw(HEADER, _claims_text(stack.forge, **{claim: raw}))
    exchange = stack.get("/orders", token=token)
    assert exchange.response.status in (200, 401), exchange.describe()


# ---- secrets ----


def raw_exchange(port: int, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """One HTTP/1.1 request; the complete response as bytes (status line, headers, body)."""
    lines = [f"GET {path} HTTP/1.1", "Host: api.example.com", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_no_token_or_credential_is_ever_logged_or_echoed(stack: Stack) -> None:
    f, now = stack.forge, int(time.time())
    valid = f.token()
    down_token = f.token(iss=stack.down.url)
    denials: list[tuple[str, str, list[tuple[str, str]], int]] = [
        # (denial kind, path, header lines, expected status)
        ("missing", "/orders", [], 401),
        (
            "malformed",
            "/orders",
            [("Authorization", f"Bearer not-a-jwt.{uuid.uuid4().hex}.{uuid.uuid4().hex}")],
            401,
        ),
        ("expired", "/orders", [("Authorization", f"Bearer {f.token(exp=now - 3600)}")], 401),
        ("bad-signature", "/orders", [("Authorization", f"Bearer {f.attacker_signed()}")], 401),
        ("wrong-audience", "/orders", [("Authorization", f"Bearer {f.token(aud='other')}")], 401),
        (
            "wrong-issuer",
            "/orders",
            [("Authorization", f"Bearer {f.token(iss='https://other.example/')}")],
            401,
        ),
        (
            "alg-none",
            "/orders",
            [("Authorization", f"Bearer {f.unsigned({'alg': 'none'}, b'sig-bytes-0123456789')}")],
            401,
        ),
        ("insufficient-scope", "/admin/x", [("Authorization", f"Bearer {valid}")], 403),
        (
            "multiple-tokens",
            "/orders",
            [("Authorization", f"Bearer {valid}, Bearer {f.token(sub='bob')}")],
            400,
        ),
        ("keys-unavailable", "/orders", [("Authorization", f"Bearer {down_token}")], 503),
        ("too-large", "/orders", [("Authorization", f"Bearer {f.token(pad='p' * 13_000)}")], 401),
        (
            "expired-in-cookie",
            "/orders",
            [("Cookie", f"theme=dark; session={f.token(exp=now - 60 * 60)}")],
            401,
        ),
        ("expired-in-query", f"/orders?access_token={f.token(exp=now - 7200)}", [], 401),
        ("other-scheme", "/orders", [("Authorization", f"Basic {b64url(uuid.uuid4().bytes * 2)}")], 401),
    ]
    secrets: set[str] = set()
    responses: list[tuple[str, bytes]] = []
    for kind, path, headers, status in denials:
        raw = raw_exchange(stack.envoy.port, path, headers)
        assert raw.startswith(f"HTTP/1.1 {status} ".encode()), (kind, raw[:300])
        responses.append((kind, raw))
        values = [v for _, v in headers] + (
            [path.split("access_token=", 1)[1]] if "access_token=" in path else []
        )
        for value in values:
            secrets.add(value)
            for word in value.replace(",", " ").replace(";", " ").replace("=", " ").split():
                if len(word) >= 16:
                    secrets.add(word)
                    if word.count(".") == 2:
                        secrets.update(s for s in word.split(".") if len(s) >= 16)
    # Claims segments are not secret (they are forwarded as x-jwt-payload on allow); signatures
    # and whole tokens are. Keep only what must never appear.
    secrets = {s for s in secrets if not _is_payload_segment(s)}
    assert len(secrets) >= 30, sorted(secrets)  # whole header values, tokens, signatures
    time.sleep(0.3)  # let the last decision-log lines reach the file
    output = stack.authz.output()
    assert output.count('"decision":"deny"') >= len(denials), "the decision log is not being written"
    for secret in sorted(secrets):
        assert secret not in output, f"ext-authz logged a credential: {secret[:40]}..."
        for kind, raw in responses:
            assert secret.encode() not in raw, f"{kind}: the response echoes a credential: {secret[:40]}..."


def _is_payload_segment(text: str) -> bool:
    """A token's claims segment: not a credential (it is what x-jwt-payload forwards on allow)."""
    try:
        return '"iss"' in b64url_decode(text).decode("utf-8")
    except ValueError:
        return False


# ---- paths a backend could read differently, hosts spelled differently ----


@pytest.fixture(scope="module")
def raw_paths(keys: Keys, issuer: TestIssuer, down: TestIssuer, authz: LoggedExtAuthz) -> Iterator[Stack]:
    """Envoy with path normalisation off (as under Istio's default BASE, which leaves `;` and
    `%2F` alone): ext-authz sees, and the backend gets, the path exactly as the client sent it."""

    def real_time_claims(**overrides: Any) -> dict[str, Any]:
        return {**issuer.claims(), **overrides}

    with EchoBackend() as echo, start_envoy(authz.address, echo.port, normalise_paths=False) as envoy:
        yield Stack(envoy, echo, issuer, down, authz, Forge(keys, real_time_claims))
        authz.check_alive()


def test_the_raw_path_envoy_is_unnormalised(raw_paths: Stack) -> None:
    hcm = raw_paths.envoy.workdir / "envoy.yaml"
    config = yaml.safe_load(hcm.read_text())
    (listener,) = config["static_resources"]["listeners"]
    typed = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert (typed["normalize_path"], typed["merge_slashes"]) == (False, False)
    assert typed["path_with_escaped_slashes_action"] == "KEEP_UNCHANGED"
    exchange = raw_paths.get("/public/a/../b;x=1/%2e%2e%2Fc")
    assert exchange.backend is not None and exchange.backend["path"] == "/public/a/../b;x=1/%2e%2e%2Fc"


# Envoy 1.40 with normalisation off passes each of these to ext-authz (and, when allowed, to the
# backend) byte for byte, "\" included: ext-authz must refuse them itself.
RAW_PATHS = [
    "/public/..;/admin/x",
    "/admin;x=1/users",
    "/public/..%2fadmin/x",
    "/public/%2e%2e%2fadmin/x",
    "/public/..%5cadmin/x",
    "/public/..\\admin\\x",
    "/public/%252e%252e/admin/x",
    "/public/%2E%2E%2Fadmin/x",
    "/admin//../public/x",
    "/admin/x%00/../../public/y",
]


@pytest.mark.parametrize("path", RAW_PATHS)
def test_a_path_read_differently_never_reaches_the_backend(raw_paths: Stack, path: str) -> None:
    for token in (None, raw_paths.forge.token(), raw_paths.forge.token(scope="admin")):
        exchange = raw_paths.get(path, token=token)
        assert exchange.backend is None, exchange.describe()
        assert exchange.response.status == 400, exchange.describe()
        assert challenge_error(exchange) == "invalid_request", exchange.describe()
        assert exchange.response.json()["error_description"] == (
            "the request path can be read as different resources"
        )


@pytest.mark.parametrize(
    ("path", "token"),
    [
        ("/public/page;jsessionid=0123ABCD", False),
        ("/public/a%2Fb.txt", False),
        ("/admin/x;jsessionid=0123", True),
        ("/files/a%2Fb%5Cc", True),
    ],
)
def test_paths_whose_readings_agree_reach_the_backend_unchanged(
    raw_paths: Stack, path: str, token: bool
) -> None:
    exchange = raw_paths.get(path, token=raw_paths.forge.token(scope="admin") if token else None)
    assert exchange.response.status == 200, exchange.describe()
    assert exchange.backend is not None and exchange.backend["path"] == path


# Each is the guarded host to some backend: the hosts rule answers (401 without a token), or 400
# from ext-authz (invalid_host) or from Envoy itself ("envoy": its codec refuses the Host header,
# so no check is made and nothing reaches the backend). Envoy passes every other spelling through.
HOST_SPELLINGS = [
    ("admin.example.com", 401, "ext-authz"),
    ("admin.example.com:", 401, "ext-authz"),
    ("ADMIN.Example.COM:8443", 401, "ext-authz"),
    ("admin.example.com.", 401, "ext-authz"),
    ("admin.example.com.:", 401, "ext-authz"),
    ("[2001:DB8:0::1]:8443", 401, "ext-authz"),
    ("[2001:db8::1]:", 401, "ext-authz"),
    ("admin.example.com:443:443", 400, "ext-authz"),
    ("admin.example.com:x", 400, "ext-authz"),
    ("admin.example.com..", 400, "ext-authz"),
    ("user@admin.example.com", 400, "ext-authz"),
    ("admin%2eexample.com", 400, "ext-authz"),
    ("2001:db8::1", 400, "ext-authz"),
    ("admin example.com", 400, "envoy"),
    ("admin.example.com:99999", 400, "ext-authz"),
    ("admin.example.com\\", 400, "envoy"),
    ("[v1.x]", 400, "ext-authz"),
    ("[2001:db8::1%25eth0]", 400, "ext-authz"),
    ("admin.example.com/x", 400, "envoy"),
    ("", 400, "ext-authz"),  # no host at all, where a rule reads the host
    (":443", 400, "ext-authz"),
    ("010.0.0.1", 400, "ext-authz"),
]


@pytest.mark.parametrize(
    ("host", "status", "refused_by"), HOST_SPELLINGS, ids=[h for h, _, _ in HOST_SPELLINGS]
)
def test_a_hosts_rule_cannot_be_skipped_by_spelling_through_envoy(
    raw_paths: Stack, host: str, status: int, refused_by: str
) -> None:
    trace = uuid.uuid4().hex
    response = send(raw_paths.envoy.base_url, "GET", "/public/x", [(TRACE_HEADER, trace)], host=host)
    reached = [r for r in raw_paths.echo.requests if r.header_values(TRACE_HEADER) == [trace]]
    exchange = Exchange(response, reached[0] if reached else None)
    assert exchange.backend is None, exchange.describe()
    assert response.status == status, exchange.describe()
    if refused_by == "envoy":
        assert response.header("www-authenticate") is None, exchange.describe()
    elif status == 400:
        assert challenge_error(exchange) == "invalid_request", exchange.describe()
        assert response.json()["error_description"] == "the request host is malformed"
    else:
        assert response.json()["error"] == "missing_token", exchange.describe()
