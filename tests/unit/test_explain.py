"""``ext-authz explain`` in process: allow, 401 and 403 explained in text and JSON, with static keys.

The final answer is the pipeline's own decision; the token never appears in the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ext_authz import explain
from ext_authz.compiled import compile
from ext_authz.config.model import Settings
from ext_authz.config.parse import parse
from ext_authz.explain import Explanation, build_request, render_json, render_text, with_token
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Decision, Deny, Request
from ext_authz.pipeline import Pipeline
from ext_authz.sources import CookieToken
from ext_authz.trace import Trace
from tests.support.tokens import ISSUER, NOW, Keys, Mint, clock, make_settings

RULES: list[Any] = [
    {"name": "health", "match": {"paths": ["/healthz", "/public/*"]}, "allow": "anonymous"},
    {
        "name": "admin",
        "match": {"paths": ["/admin/*"], "methods": ["POST", "DELETE"]},
        "require": {
            "scopes": ["admin"],
            "any_of": [{"claims": {"sub": "alice"}}, {"roles": ["boss"]}],
            "not": {"claims": {"suspended": True}},
        },
    },
    {
        "name": "owner",
        "match": {"paths": ["/users/{id}"]},
        "require": {"expression": "claims.sub == params.id"},
        "deny": {"status": 404, "message": "not found"},
    },
    {"match": {"paths": ["/*"]}, "require": {}},
]
PROVIDER: dict[str, Any] = {"claim_to_headers": [{"header": "x-user-id", "claim": "sub"}]}


def settings_with(rules: list[Any] = RULES, **top: Any) -> Settings:
    return make_settings(provider=PROVIDER, rules=rules, **top)


def request(
    method: str, path: str, token: str | None = None, settings: Settings | None = None, **headers: str
) -> Request:
    built = build_request(method, path, headers=[(k.replace("_", "-"), v) for k, v in headers.items()])
    if token is None:
        return built
    provider = (settings or settings_with()).providers[0]
    return with_token(built, explain.token_location(provider), token)


def static_keys(keys: Keys) -> StaticKeys:
    return StaticKeys(keys=parse_jwks(keys.jwks()))


async def explained(keys: Keys, req: Request, settings: Settings | None = None) -> Explanation:
    return await explain.run(settings or settings_with(), req, static_keys(keys), clock=clock)


def assert_token_absent(token: str, *outputs: str) -> None:
    header, payload, signature = token.split(".")
    for output in outputs:
        assert token not in output
        assert signature not in output
        assert f"{header}.{payload}" not in output


# ---- allow ----


async def test_allow_text(keys: Keys, mint: Mint) -> None:
    token = mint(scope="admin", suspended=False)
    e = await explained(keys, request("DELETE", "/admin/users/1", token, x_user_id="mallory"))
    text = render_text(e)
    assert_token_absent(token, text)
    lines = text.splitlines()
    assert lines[0] == "request   DELETE /admin/users/1"
    assert "          header names: authorization, x-user-id" in lines
    # Why the earlier rule did not match, each condition with its mark.
    assert '  rules[0] "health": no match' in lines
    assert "      [ ] path '/admin/users/1' matches ['/healthz', '/public/*']" in lines
    assert '  rules[1] "admin": MATCHED' in lines
    assert "      [x] method DELETE in ['DELETE', 'POST']" in lines
    assert "      [x] path '/admin/users/1' matches ['/admin/*']" in lines
    assert not any("rules[2]" in line for line in lines)  # later rules are not consulted
    assert "token     found in header authorization" in lines
    assert "          verified: provider idp" in lines
    requirements = lines[lines.index('requirements of rules[1] "admin"') + 1 :][:7]
    assert requirements == [
        "      [x] all of",
        "        [x] scopes ['admin']",
        "        [x] any of",
        "          [x] claim sub = 'alice'",
        "          [ ] roles any of ['boss']",
        "        [x] not",
        "          [ ] claim suspended = True",
    ]
    assert lines[-5:] == [
        'decision  ALLOW 200 (rule "admin", provider idp)',
        "          set header x-user-id: alice",
        "          remove header x-user_id",
        "          remove header x_user-id",
        "          remove header x_user_id",
    ]


async def test_allow_json(keys: Keys, mint: Mint) -> None:
    token = mint(scope="admin", suspended=False)
    e = await explained(keys, request("DELETE", "/admin/users/1", token, x_user_id="mallory"))
    output = render_json(e)
    assert_token_absent(token, output)
    data = json.loads(output)
    assert data["request"]["headers"] == ["authorization", "x-user-id"]
    assert [(r["name"], r["matched"]) for r in data["rules"]] == [("health", False), ("admin", True)]
    assert data["rules"][0]["conditions"] == [
        {"condition": "path '/admin/users/1' matches ['/healthz', '/public/*']", "holds": False}
    ]
    assert data["matched_rule"] == "admin"
    assert data["token"]["verified"] is True and data["token"]["provider"] == "idp"
    assert data["token"]["claims"]["sub"] == "alice" and data["token"]["error"] is None
    assert data["requirements"][:2] == [
        {"depth": 0, "requirement": "all of", "holds": True, "error": None},
        {"depth": 1, "requirement": "scopes ['admin']", "holds": True, "error": None},
    ]
    assert data["decision"] == {
        "allowed": True,
        "status": 200,
        "rule": "admin",
        "provider": "idp",
        "headers_to_set": [{"name": "x-user-id", "value": "alice"}],
        "headers_to_remove": ["x-user_id", "x_user-id", "x_user_id"],
        "query_parameters_to_remove": [],
    }


async def test_allow_removes_forged_identity_headers_on_anonymous_route(keys: Keys) -> None:
    e = await explained(keys, request("GET", "/public/../public/x", x_user_id="mallory"))
    text = render_text(e)
    assert "request   GET /public/../public/x  (judged as /public/x)" in text
    assert "token     none" in text
    assert 'requirements of rules[0] "health": none: the rule allows anonymous requests' in text
    assert text.endswith(
        'decision  ALLOW 200 (rule "health")\n'
        + "".join(
            f"          remove header {n}\n" for n in ("x-user-id", "x-user_id", "x_user-id", "x_user_id")
        )
    )


# ---- 401 ----


async def test_401_without_token(keys: Keys) -> None:
    e = await explained(keys, request("GET", "/orders"))
    text = render_text(e)
    assert "token     none" in text
    assert "requirements of rules[3]: not evaluated: no token" in text
    assert 'decision  DENY 401 missing_token (rule "rules[3]")' in text
    assert '          www-authenticate: Bearer realm="ext-authz"' in text
    data = json.loads(render_json(e))
    assert data["token"] == {
        "present": False,
        "locations": [],
        "verified": False,
        "provider": None,
        "claims": None,
        "checks": [],
        "error": None,
    }
    assert data["requirements"] is None
    assert data["decision"]["status"] == 401 and data["decision"]["code"] == "missing_token"
    assert data["decision"]["www_authenticate"] == 'Bearer realm="ext-authz"'
    assert data["decision"]["body"] == {
        "error": "missing_token",
        "error_description": "a bearer token is required",
    }


async def test_401_expired_token(keys: Keys, mint: Mint) -> None:
    token = mint(exp=int(NOW) - 3600)
    e = await explained(keys, request("GET", "/orders", token))
    text, output = render_text(e), render_json(e)
    assert_token_absent(token, text, output)
    assert "          not verified: token_expired (the token has expired)" in text
    assert "          its iss names provider idp" in text
    assert "requirements of rules[3]: not evaluated: the token was not verified" in text
    assert "decision  DENY 401 token_expired" in text
    data = json.loads(output)
    assert data["token"]["error"] == {
        "code": "token_expired",
        "description": "the token has expired",
        "status": 401,
        "claimed_provider": "idp",
    }
    assert data["decision"]["www_authenticate"] == (
        'Bearer realm="ext-authz", error="invalid_token", error_description="the token has expired"'
    )


async def test_401_forged_token_is_not_printed(keys: Keys, mint: Mint) -> None:
    token = mint(key=keys.other_rsa)  # a published kid, another private key
    e = await explained(keys, request("GET", "/orders", token))
    text, output = render_text(e), render_json(e)
    assert_token_absent(token, text, output)
    assert "not verified: bad_signature" in text
    assert json.loads(output)["decision"]["code"] == "bad_signature"


# ---- 403 ----


async def test_403_insufficient_scope(keys: Keys, mint: Mint) -> None:
    token = mint()
    e = await explained(keys, request("POST", "/admin/x", token))
    text, output = render_text(e), render_json(e)
    assert_token_absent(token, text, output)
    assert "      [ ] all of\n        [ ] scopes ['admin']\n        [x] any of" in text
    assert 'decision  DENY 403 insufficient_scope (rule "admin", provider idp)' in text
    data = json.loads(output)
    assert data["requirements"][0] == {"depth": 0, "requirement": "all of", "holds": False, "error": None}
    assert data["decision"]["status"] == 403
    assert data["decision"]["www_authenticate"].endswith('scope="admin"')
    assert data["decision"]["body"]["error"] == "insufficient_scope"


async def test_403_nested_requirement(keys: Keys, mint: Mint) -> None:
    e = await explained(keys, request("POST", "/admin/x", mint(scope="admin", suspended=True)))
    assert [(s.depth, s.text, s.holds) for s in e.requirements or ()] == [
        (0, "all of", False),
        (1, "scopes ['admin']", True),
        (1, "any of", True),
        (2, "claim sub = 'alice'", True),
        (2, "roles any of ['boss']", False),
        (1, "not", False),
        (2, "claim suspended = True", True),
    ]
    decision = json.loads(render_json(e))["decision"]
    assert (decision["status"], decision["code"], decision["www_authenticate"]) == (
        403,
        "requirement_not_met",
        None,
    )


async def test_403_rule_deny_answer_and_params(keys: Keys, mint: Mint) -> None:
    e = await explained(keys, request("GET", "/users/bob", mint()))
    text = render_text(e)
    assert '  rules[2] "owner": MATCHED  params: id=bob' in text
    assert "      [ ] all of\n        [ ] expression claims.sub == params.id" in text
    assert 'decision  DENY 404 requirement_not_met (rule "owner", provider idp)' in text
    assert "www-authenticate" not in text
    assert json.loads(render_json(e))["params"] == {"id": "bob"}


async def test_403_no_rule_matches(keys: Keys, mint: Mint) -> None:
    settings = settings_with(RULES[:2])
    e = await explained(keys, request("GET", "/orders", mint(), settings), settings)
    text = render_text(e)
    assert '  rules[1] "admin": no match' in text and "  no rule matches" in text
    assert "requirements: no rule matches the request" in text
    assert "decision  DENY 403 no_matching_rule\n" in text
    assert json.loads(render_json(e))["matched_rule"] is None


async def test_403_errors_are_shown_as_a_third_value(keys: Keys, mint: Mint) -> None:
    """An error is neither [x] nor [ ]: "[!]" with a short reason, which never quotes the request."""
    rules: list[Any] = [
        {
            "name": "staff",
            "require": {
                "not": {"expression": "claims.email.endsWith('@contractor.example')"},
                "any_of": [{"claims": {"team": "ops"}}, {"expression": "claims[claims.sub] == 1"}],
            },
        }
    ]
    settings = settings_with(rules)
    token = mint(sub="s3cret-sub")  # no email, no team; sub is not a claim name
    e = await explained(keys, request("GET", "/x", token, settings, x_key="s3cret-header"), settings)
    text, output = render_text(e), render_json(e)
    assert_token_absent(token, text, output)
    lines = text.splitlines()
    requirements = lines[lines.index('requirements of rules[0] "staff"') + 1 :][:6]
    assert requirements == [
        "      [!] all of  (error: a requirement below is an error)",
        "        [!] any of  (error: a requirement below is an error)",
        "          [!] claim team = 'ops'  (error: claim team is absent or null)",
        "          [!] expression claims[claims.sub] == 1  (error: Key not found in map)",
        "        [!] not  (error: a requirement below is an error)",
        "          [!] expression claims.email.endsWith('@contractor.example')"
        '  (error: Key not found in map "email")',
    ]
    assert 'decision  DENY 403 requirement_not_met (rule "staff", provider idp)' in text
    steps = json.loads(output)["requirements"]
    assert steps[5] == {
        "depth": 2,
        "requirement": "expression claims.email.endsWith('@contractor.example')",
        "holds": False,
        "error": 'Key not found in map "email"',
    }
    assert all(s["error"] is not None and s["holds"] is False for s in steps)
    requirements_only = json.dumps(steps) + "\n".join(requirements)
    assert "s3cret" not in requirements_only


# ---- dry run, other token places ----


async def test_dry_run_shows_the_would_be_denial(keys: Keys, mint: Mint) -> None:
    settings = settings_with(mode="dry_run")
    e = await explained(keys, request("POST", "/admin/x", mint(), settings), settings)
    text = render_text(e)
    assert "mode      dry_run: a denial is only logged; the request is let through" in text
    assert 'decision  ALLOW 200 (rule "admin", provider idp)' in text
    assert "          dry run: would have denied 403 insufficient_scope" in text
    data = json.loads(render_json(e))
    assert data["dry_run"] is True
    assert data["decision"]["dry_run_denial"] == {"status": 403, "code": "insufficient_scope"}


async def test_token_in_query_parameter_is_not_printed(keys: Keys, mint: Mint) -> None:
    settings = make_settings(
        provider={"from_headers": [], "from_params": ["access_token"], "forward_token": False},
        rules=RULES,
    )
    token = mint()
    req = request("GET", "/orders?page=2", token, settings)
    assert req.query == f"page=2&access_token={token}"
    e = await explained(keys, req, settings)
    text, output = render_text(e), render_json(e)
    assert_token_absent(token, text, output)
    assert "          query parameter names: page, access_token" in text
    assert "token     found in param access_token" in text
    assert "          remove query parameter access_token" in text


def test_token_in_cookie_joins_the_cookie_header() -> None:
    location = CookieToken("session")
    req = with_token(build_request("GET", "/", headers=[("cookie", "a=1")]), location, "t")
    assert req.headers["cookie"] == "a=1; session=t"


async def test_final_answer_is_the_pipelines_decision(keys: Keys, mint: Mint) -> None:
    """explain adapts decide()'s value; it never builds an answer of its own."""
    answer = Deny(418, 7, "teapot", (), "{}", rule="x")

    class Fixed(Pipeline):
        async def decide(self, request: Request, trace: Trace | None = None) -> Decision:
            return answer

    e = await explain.explain(
        Fixed(compile(settings_with()), static_keys(keys), clock=clock), request("GET", "/orders")
    )
    assert e.decision is answer
    assert "decision  DENY 418 teapot" in render_text(e)


async def test_agrees_with_decide(keys: Keys, mint: Mint) -> None:
    settings = settings_with()
    pipeline = Pipeline(compile(settings), static_keys(keys), clock=clock)
    for req in [
        request("GET", "/orders"),
        request("GET", "/orders", mint()),
        request("POST", "/admin/x", mint(scope="admin")),
        request("POST", "/admin/x", mint()),
        request("GET", "/users/alice", mint()),
        request("GET", "/public/x", "garbage"),
        request("GET", "/orders", authorization="Bearer a, Bearer b"),
    ]:
        e = await explain.explain(pipeline, req)
        assert e.decision == await pipeline.decide(req)
        assert e.decision.rule in (e.matched.name if e.matched else "", "")


async def test_inline_keys_without_jwks_file(keys: Keys, mint: Mint) -> None:
    """No --jwks: keys as the server has them (here inline, so nothing is fetched)."""
    provider = {"name": "idp", "issuer": ISSUER, "audiences": ["api"], "jwks": keys.jwks()}
    settings = parse({"providers": [provider], "rules": RULES})
    e = await explain.run(settings, request("GET", "/orders", mint(), settings), None, clock=clock)
    assert e.token.verified and "decision  ALLOW 200" in render_text(e)


async def test_multiple_tokens(keys: Keys) -> None:
    e = await explained(keys, request("GET", "/orders", authorization="Bearer a, Bearer b"))
    text = render_text(e)
    assert "token     present\n          not verified: multiple_tokens" in text
    assert "decision  DENY 400 multiple_tokens" in text


# ---- command-line helpers ----


def test_parse_header() -> None:
    assert explain.parse_header("X-Env:  prod ") == ("x-env", "prod")
    assert explain.parse_header("authorization: Bearer a:b") == ("authorization", "Bearer a:b")
    for bad in ("x-env", ": v", "bad name: v", ":path: /"):
        with pytest.raises(explain.UsageError, match="--header"):
            explain.parse_header(bad)


def test_parse_context() -> None:
    assert explain.parse_context("rule=admin=x") == ("rule", "admin=x")
    with pytest.raises(explain.UsageError, match="--context"):
        explain.parse_context("rule")


def test_build_request() -> None:
    req = build_request(
        "delete", "/a/b?x=1&y=2", host="h:8", headers=[("x", "1"), ("x", "2")], context={"rule": "r"}
    )
    assert req == Request("DELETE", "/a/b", "x=1&y=2", "h:8", {"x": "1,2"}, {"rule": "r"})


def test_provider_for_token(mint: Mint) -> None:
    base = {"audiences": ["api"], "jwks_uri": "https://idp.example.com/jwks"}
    providers = [
        {"name": "first", "issuer": "https://first.example.com/", **base},
        {"name": "idp", "issuer": ISSUER, **base},
    ]
    two = parse({"providers": providers})
    assert explain.provider_for_token(two, mint()).name == "idp"  # the one its iss names
    assert explain.provider_for_token(two, "garbage").name == "first"  # else the first
    assert explain.provider_for_token(two, mint(iss="https://other.example.com/")).name == "first"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{", "not JSON"),
        ('{"keys": {}}', "not a JWKS document"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable signature key"),
    ],
)
def test_load_jwks_file_errors(tmp_path: Path, content: str | None, message: str) -> None:
    file = tmp_path / "jwks.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(explain.UsageError, match=message):
        explain.load_jwks_file(str(file))


def test_load_jwks_file(tmp_path: Path, keys: Keys) -> None:
    file = tmp_path / "jwks.json"
    file.write_text(json.dumps(keys.jwks()))
    assert len(explain.load_jwks_file(str(file)).keys) == 3


# ---- paths a backend could read differently, malformed hosts ----

READING_RULES: list[Any] = [
    {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"},
    {
        "name": "api",
        "match": {"paths": ["/api/*"]},
        "require": {"expression": "!request.path.startsWith('/api/admin')"},
    },
    {"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
]


async def test_readings_that_pick_different_rules(keys: Keys) -> None:
    s = settings_with(READING_RULES)
    e = await explained(keys, request("GET", "/public/..;/admin/x"), s)
    assert [(r.how, r.path, r.rule) for r in e.readings] == [
        ("rfc3986", "/public/..;/admin/x", "public"),
        (";params stripped per segment", "/admin/x", "admin"),
        ("path cut at ';'", "/", None),
    ]
    assert isinstance(e.decision, Deny) and (e.decision.status, e.decision.code) == (400, "ambiguous_path")
    text = render_text(e)
    assert "backends may read the path as" in text
    assert '/admin/x  (;params stripped per segment) -> "admin"' in text
    assert "not evaluated: the request path can be read as different resources (400 ambiguous_path)" in text
    assert json.loads(render_json(e))["request"]["readings"][1] == {
        "how": ";params stripped per segment",
        "path": "/admin/x",
        "rule": "admin",
        "params": {},
        "requirements_hold": None,
    }


async def test_readings_of_one_rule_with_requirements_per_reading(keys: Keys, mint: Mint) -> None:
    s = settings_with(READING_RULES)
    e = await explained(keys, request("GET", "/api/x/..;/admin", mint(), s), s)
    assert [(r.path, r.rule, r.requirements_hold) for r in e.readings] == [
        ("/api/x/..;/admin", "api", True),
        ("/api/admin", "api", False),
        ("/api/", "api", True),  # cut at ';'
    ]
    assert isinstance(e.decision, Deny) and e.decision.status == 403
    assert '/api/admin  (;params stripped per segment) -> "api"  requirements fail' in render_text(e)


async def test_one_reading_lists_none(keys: Keys) -> None:
    e = await explained(keys, request("GET", "/public/%2e%2e/admin/x"), settings_with(READING_RULES))
    assert e.readings == () and "backends may read" not in render_text(e)


async def test_malformed_host(keys: Keys) -> None:
    req = build_request("GET", "/public/x", host="admin.example.com:443:443")
    e = await explained(keys, req, settings_with(READING_RULES))
    assert e.rules == () and isinstance(e.decision, Deny)
    assert (e.decision.status, e.decision.code) == (400, "invalid_host")
    assert "not evaluated: the request host is malformed (400 invalid_host)" in render_text(e)
