"""``ext-authz explain`` and ``ext-authz test`` as operators and CI run them: real processes, a test
issuer over HTTP on 127.0.0.1 (its request counts show when keys were fetched and when not)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz import policytest
from ext_authz.config.model import Settings
from ext_authz.config.parse import parse
from ext_authz.config.values import ConfigError
from ext_authz.model import Allow
from tests.support.idp import DISCOVERY_PATH, JWKS_PATH, TestIssuer

PARTNER_ISSUER = "https://partner.example.com/"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ext_authz", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input=stdin,
    )


def config(issuer_url: str) -> dict[str, Any]:
    return {
        "providers": [
            {
                "name": "test",
                "issuer": issuer_url,  # no jwks_uri: OIDC discovery, like the server
                "audiences": ["api"],
                "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
                "fetch_timeout_seconds": 2,
            },
            {
                "name": "partner",
                "issuer": PARTNER_ISSUER,
                "audiences": ["partner-app"],
                "jwks_uri": "https://partner.example.com/jwks.json",
                "algorithms": ["RS256"],
                "audience_claim": "client_id",  # Cognito-style access tokens
            },
        ],
        "rules": [
            {"name": "health", "match": {"paths": ["/healthz"]}, "allow": "anonymous"},
            {
                "name": "admin-api",
                "match": {
                    "paths": ["/admin/*"],
                    "methods": ["DELETE"],
                    "headers": {"x-env": "prod"},
                    "context": {"rule": "admin-api"},
                },
                "require": {"scopes": ["admin"]},
            },
            {"name": "partner", "match": {"paths": ["/partner/*"]}, "require": {"providers": ["partner"]}},
            {
                "name": "owner",
                "match": {"paths": ["/users/{id}"]},
                "require": {"expression": "claims.sub == params.id"},
            },
            {"match": {"paths": ["/*"]}, "require": {}},
        ],
    }


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience="api") as test_issuer:
        yield test_issuer


@pytest.fixture
def config_file(issuer: TestIssuer, tmp_path: Path) -> Path:
    file = tmp_path / "ext-authz.yaml"
    file.write_text(yaml.safe_dump(config(issuer.url), sort_keys=False))
    return file


def fetches(issuer: TestIssuer) -> int:
    return issuer.request_count(DISCOVERY_PATH) + issuer.request_count(JWKS_PATH)


def assert_secret(token: str, result: subprocess.CompletedProcess[str]) -> None:
    signature = token.split(".")[2]
    for output in (result.stdout, result.stderr):
        assert token not in output and signature not in output


# ---- explain ----


def test_explain_fetches_keys_like_the_server(issuer: TestIssuer, config_file: Path) -> None:
    token = issuer.mint({"scope": "admin"})
    result = run(
        "explain", "--config", str(config_file), "--method", "DELETE", "--path", "/admin/users/1",
        "--header", "x-env: prod", "--context", "rule=admin-api", "--token", token,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_secret(token, result)
    lines = result.stdout.splitlines()
    assert '  rules[0] "health": no match' in lines
    assert '  rules[1] "admin-api": MATCHED' in lines
    assert "      [x] context rule = 'admin-api'" in lines
    assert "          verified: provider test" in lines
    assert "        [x] scopes ['admin']" in lines
    assert 'decision  ALLOW 200 (rule "admin-api", provider test)' in lines
    assert "          set header x-user-id: alice" in lines
    assert issuer.request_count(DISCOVERY_PATH) >= 1 and issuer.request_count(JWKS_PATH) >= 1


def test_explain_json_with_the_token_on_stdin(issuer: TestIssuer, config_file: Path) -> None:
    token = issuer.mint()  # no admin scope
    result = run(
        "explain", "--config", str(config_file), "--method", "DELETE", "--path", "/admin/x",
        "--header", "x-env: prod", "--context", "rule=admin-api", "--token", "-", "--json",
        stdin=f"Bearer {token}\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_secret(token, result)
    data = json.loads(result.stdout)
    assert data["matched_rule"] == "admin-api"
    assert data["token"]["verified"] is True and data["token"]["provider"] == "test"
    assert data["requirements"] == [
        {"depth": 0, "requirement": "all of", "holds": False, "error": None},
        {"depth": 1, "requirement": "scopes ['admin']", "holds": False, "error": None},
    ]
    decision = data["decision"]
    assert (decision["allowed"], decision["status"], decision["code"]) == (False, 403, "insufficient_scope")
    assert decision["www_authenticate"].endswith('scope="admin"')


def test_explain_offline_with_a_jwks_file(issuer: TestIssuer, config_file: Path, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    token = issuer.mint({"sub": "bob"})
    result = run(
        "explain", "--config", str(config_file), "--path", "/users/bob", "--token", token, "--jwks", str(jwks)
    )
    assert result.returncode == 0, result.stderr
    assert_secret(token, result)
    assert '  rules[3] "owner": MATCHED  params: id=bob' in result.stdout
    assert "        [x] expression claims.sub == params.id" in result.stdout
    assert 'decision  ALLOW 200 (rule "owner", provider test)' in result.stdout
    assert fetches(issuer) == 0  # offline: the issuer was never asked


def test_explain_when_the_keys_cannot_be_fetched(issuer: TestIssuer, config_file: Path) -> None:
    issuer.fail_path(JWKS_PATH, 500)
    token = issuer.mint()
    result = run("explain", "--config", str(config_file), "--path", "/orders", "--token", token)
    assert result.returncode == 0, result.stderr  # whatever the decision
    assert_secret(token, result)
    assert "not verified: keys_unavailable" in result.stdout
    assert "decision  DENY 503 keys_unavailable" in result.stdout
    assert '"event": "key fetch failed"' in result.stderr


def test_explain_without_a_token(config_file: Path) -> None:
    result = run("explain", "--config", str(config_file), "--path", "/orders", "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)["decision"]
    assert (decision["status"], decision["code"]) == (401, "missing_token")
    assert decision["www_authenticate"] == 'Bearer realm="ext-authz"'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--header", "no colon"], "--header 'no colon'"),
        (["--context", "novalue"], "--context 'novalue'"),
        (["--jwks", "/nonexistent/jwks.json"], "--jwks /nonexistent/jwks.json: cannot read"),
        (["--token", ""], "--token: the token is empty"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_explain_usage_errors_exit_2(config_file: Path, extra: list[str], message: str) -> None:
    result = run("explain", "--config", str(config_file), "--path", "/", *extra)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_config_error_exits_2(tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text("providers: []\n")
    result = run("explain", "--config", str(file), "--path", "/")
    assert result.returncode == 2
    assert f"ext-authz: config error: {file}: providers: must not be empty" in result.stderr


# ---- test ----

PASSING = """\
cases:
  - name: admin can delete
    request: {method: DELETE, path: /admin/users/1, host: api.example.com, headers: {x-env: prod},
              context: {rule: admin-api}}
    claims: {sub: alice, scope: "admin"}
    expect: {status: 200, headers: {x-user-id: alice}}
  - name: admin needs the admin scope
    request: {method: DELETE, path: /admin/users/1, headers: {x-env: prod}, context: {rule: admin-api}}
    claims: {sub: alice, scope: "read"}
    expect:
      status: 403
      code: insufficient_scope
      headers:
        www-authenticate: >-
          Bearer realm="ext-authz", error="insufficient_scope",
          error_description="the token lacks a required scope", scope="admin"
  - name: anonymous gets 401
    request: {method: GET, path: /orders}
    expect: {status: 401, code: missing_token}
  - name: health is open
    request: {path: /healthz}
    expect: {status: 200}
  - name: partner token (client_id audience, RS256 only)
    request: {path: /partner/orders}
    provider: partner
    claims: {sub: svc}
    expect: {status: 200}
  - name: our token is not a partner token
    request: {path: /partner/orders}
    claims: {sub: alice}
    expect: {status: 401, code: issuer_not_accepted}
  - name: owner
    request: {path: /users/bob}
    claims: {sub: bob}
    expect: {status: 200}
  - name: not the owner
    request: {path: /users/bob}
    claims: {sub: alice}
    expect: {status: 403, code: requirement_not_met}
  - name: expired
    request: {path: /orders}
    claims: {exp: 1}
    expect: {status: 401, code: token_expired}
  - name: no expiry
    request: {path: /orders}
    claims: {exp: null}
    expect: {status: 401, code: invalid_claim}
  - name: another audience
    request: {path: /orders}
    claims: {aud: somebody-else}
    expect: {status: 401, code: audience_mismatch}
"""


def write(tmp_path: Path, text: str, name: str = "cases.yaml") -> Path:
    file = tmp_path / name
    file.write_text(text)
    return file


def test_passing_case_file(issuer: TestIssuer, config_file: Path, tmp_path: Path) -> None:
    result = run("test", str(write(tmp_path, PASSING)), "--config", str(config_file))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [c["name"] for c in yaml.safe_load(PASSING)["cases"]]
    assert result.stdout.splitlines() == [f"PASS {name}" for name in names] + [
        f"{len(names)} passed, 0 failed"
    ]
    assert fetches(issuer) == 0  # throwaway keys stand in: the config's keys are never fetched


def test_failing_case_exits_1(config_file: Path, tmp_path: Path) -> None:
    cases = """\
cases:
  - name: anonymous gets 401
    request: {method: GET, path: /orders}
    expect: {status: 401}
  - name: health is closed
    request: {path: /healthz}
    expect: {status: 403}
  - name: admin with the wrong header
    request: {method: DELETE, path: /admin/x, headers: {x-env: prod}, context: {rule: admin-api}}
    claims: {sub: bob, scope: admin}
    expect: {status: 200, headers: {x-user-id: alice, x-tenant: acme}}
  - name: wrong reason
    request: {path: /orders}
    claims: {exp: 1}
    expect: {status: 401, code: missing_token}
"""
    result = run("test", str(write(tmp_path, cases)), "--config", str(config_file))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "PASS anonymous gets 401",
        'FAIL health is closed: expected 403, got 200 (allowed by rule "health")',
        "FAIL admin with the wrong header: header x-user-id: expected 'alice', got 'bob'; "
        "header x-tenant: expected 'acme', got not set",
        'FAIL wrong reason: expected 401 missing_token, got 401 (token_expired, rule "rules[4]")',
        "1 passed, 3 failed",
    ]


def test_malformed_case_file_exits_2(config_file: Path, tmp_path: Path) -> None:
    cases = write(tmp_path, "cases:\n  - request: {path: /}\n    expect: {status: 200}\n"
                            "  - request: {path: /}\n    expect: {status: ok}\n")  # fmt: skip
    result = run("test", str(cases), "--config", str(config_file))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ext-authz: case file error: {cases}: cases[1].expect.status: must be a number, not a string"
    )
    assert result.stdout == ""


def test_config_error_exits_2(tmp_path: Path) -> None:
    config_file = write(tmp_path, "providers: [{name: x}]\n", "ext-authz.yaml")
    result = run("test", str(write(tmp_path, PASSING)), "--config", str(config_file))
    assert result.returncode == 2
    assert f"ext-authz: config error: {config_file}: providers[0].issuer: is required" in result.stderr


# ---- the case file, in process ----


@pytest.fixture(scope="module")
def loaded() -> Settings:
    return parse(config("https://idp.example.com"))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("{}", "cases: is required"),
        ("cases: {}", "cases: must be a list"),
        ("cases: []", "cases: must not be empty"),
        ("cases: [{request: {path: /}}]", "cases[0].expect: is required"),
        ("cases: [{expect: {status: 200}}]", "cases[0].request: is required"),
        ("cases: [{request: {path: /}, expect: {status: 200}, expct: 1}]", "cases[0].expct: unknown key"),
        ("cases: [{request: {}, expect: {status: 200}}]", "cases[0].request.path: is required"),
        ("cases: [{request: {path: /, method: 'GE T'}, expect: {status: 200}}]", "cases[0].request.method"),
        ("cases: [{request: {path: /, headers: {'a b': x}}, expect: {status: 200}}]", "request.headers.a b"),
        ("cases: [{request: {path: /, headers: [x]}, expect: {status: 200}}]", "cases[0].request.headers"),
        ("cases: [{request: {path: /, context: {r: [1]}}, expect: {status: 200}}]", "request.context.r"),
        ("cases: [{request: {path: /}, expect: {status: 200.5}}]", "cases[0].expect.status: must be a whole"),
        ("cases: [{request: {path: /}, expect: {status: 700}}]", "cases[0].expect.status: must be between"),
        ("cases: [{request: {path: /}, expect: {status: 200, code: 3}}]", "cases[0].expect.code"),
        ("cases: [{request: {path: /}, expect: {status: 200, headers: 1}}]", "cases[0].expect.headers"),
        ("cases: [{request: {path: /}, claims: [1], expect: {status: 200}}]", "cases[0].claims: must be a"),
        (
            "cases: [{request: {path: /}, claims: {d: 2024-01-01}, expect: {status: 200}}]",
            "cases[0].claims.d",
        ),
        (
            "cases: [{request: {path: /}, claims: {}, provider: nope, expect: {status: 200}}]",
            "cases[0].provider: no provider is named 'nope'",
        ),
        (
            "cases: [{request: {path: /}, provider: test, expect: {status: 200}}]",
            "cases[0].provider: a provider",
        ),
        (
            "cases: [{name: a, request: {path: /}, expect: {status: 200}},"
            " {name: a, request: {path: /}, expect: {status: 200}}]",
            "cases[1].name: another case (cases[0])",
        ),
        ("cases: [{request: {path: /}, expect: {status: 200, status: 401}}]", "duplicate key 'status'"),
        ("cases: [", "not valid YAML at line 1"),
    ],
)
def test_case_file_errors_name_the_key_path(loaded: Settings, tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as raised:
        policytest.load_cases(write(tmp_path, text), loaded)
    assert where in str(raised.value)


def test_default_claims(loaded: Settings) -> None:
    test, partner = loaded.providers
    assert policytest.token_claims(test, {"sub": "a", "iat": None}, 1000) == {
        "iss": "https://idp.example.com",
        "aud": "api",
        "exp": 1300,
        "sub": "a",
    }
    assert policytest.token_claims(partner, {}, 1000) == {
        "iss": PARTNER_ISSUER,
        "client_id": "partner-app",
        "iat": 1000,
        "exp": 1300,
    }


@pytest.mark.parametrize(
    ("algorithms", "alg"),
    [(None, "ES256"), (["RS256", "EdDSA"], "EdDSA"), (["RS256"], "RS256"), (["PS384", "ES512"], "ES512")],
)
def test_throwaway_key_from_the_allow_list(algorithms: list[str] | None, alg: str) -> None:
    document = config("https://idp.example.com")
    if algorithms is not None:
        document["providers"][0]["algorithms"] = algorithms
    keys = policytest.ThrowawayKeys(parse(document).providers)
    assert keys.for_provider("test").alg == alg
    assert keys.for_provider("test") is keys.for_provider("test")  # one per provider


async def test_cases_in_process(loaded: Settings) -> None:
    cases = policytest.parse_cases(yaml.safe_load(PASSING), loaded)
    outcomes = await policytest.run_cases(loaded, cases)
    assert [o.line for o in outcomes] == [f"PASS {c.name}" for c in cases]
    assert policytest.summary(outcomes) == f"{len(cases)} passed, 0 failed"
    allowed = outcomes[0].decision
    assert isinstance(allowed, Allow)
    claims = allowed.metadata["claims"]  # as verified by the pipeline, defaults filled in
    assert isinstance(claims, dict)
    assert (claims["scope"], claims["iss"], claims["aud"]) == ("admin", "https://idp.example.com", "api")


async def test_a_failed_case_names_the_requirement_that_errs() -> None:
    """A denial by an error (three-valued requirements) says which requirement and why."""
    document = config("https://idp.example.com")
    document["rules"] = [
        {"name": "staff", "require": {"not": {"expression": "claims.email.endsWith('@contractor.example')"}}}
    ]
    loaded = parse(document)
    cases = policytest.parse_cases(
        {
            "cases": [
                {
                    "name": "no email",
                    "request": {"path": "/x"},
                    "claims": {"sub": "a"},
                    "expect": {"status": 200},
                },
                {
                    "name": "denied",
                    "request": {"path": "/x"},
                    "claims": {"sub": "a"},
                    "expect": {"status": 403},
                },
            ]
        },
        loaded,
    )
    outcomes = await policytest.run_cases(loaded, cases)
    assert [o.line for o in outcomes] == [
        'FAIL no email: expected 200, got 403 (requirement_not_met, rule "staff"); '
        "error in expression claims.email.endsWith('@contractor.example'): Key not found in map \"email\"",
        "PASS denied",
    ]
