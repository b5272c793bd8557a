"""Rule evaluation cost: 1 rule against 100 rules, small and large tokens, measured in one run.

Run with `make bench`. Prints a Markdown table; the numbers that matter are the ratios and the
per-rule cost, since absolute times drift on shared machines.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import jwt

from ext_authz.authorization import Rules
from ext_authz.compiled import compile
from ext_authz.config.parse import parse
from ext_authz.keys.jwks import parse_jwks
from ext_authz.keys.static import StaticKeys
from ext_authz.model import Credential, Principal, Request
from ext_authz.paths import RequestView
from ext_authz.pipeline import Pipeline
from ext_authz.sources import HeaderToken
from tests.support.idp import SigningKey, generate_key

ISSUER = "https://idp.example.com/"


def filler_rules(n: int) -> list[dict[str, Any]]:
    """n rules that a request to /orders/42 does not match, of every matcher kind."""
    kinds: list[dict[str, Any]] = [
        {"match": {"paths": ["/admin/*"], "methods": ["POST"]}, "require": {"scopes": ["admin"]}},
        {"match": {"paths": ["/users/{id}"]}, "require": {"expression": "claims.sub == params.id"}},
        {"match": {"hosts": ["*.internal.example.com"]}, "require": {"roles": ["ops"]}},
        {"match": {"headers": {"x-env": {"regex": "staging|dev"}}}, "require": {}},
        {
            "match": {"paths": ["/reports/{year}/{month}/*"]},
            "require": {"claims": {"tier": {"any_of": ["a", "b"]}}},
        },
        {"match": {"context": {"rule": "billing"}}, "require": {"groups": ["billing"]}},
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


TARGET = {
    "match": {"paths": ["/orders/{id}"], "methods": ["GET"]},
    "require": {
        "scopes": ["orders:read"],
        "claims": {"tenant": "t1"},
        "expression": "claims.sub != params.id",
    },
}


def config(n_rules: int, jwk: dict[str, Any]) -> Any:
    return parse(
        {
            "providers": [
                {
                    "name": "idp",
                    "issuer": ISSUER,
                    "audiences": ["api"],
                    "jwks": {"keys": [jwk]},
                    "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
                }
            ],
            "rules": [*filler_rules(n_rules - 1), TARGET],
        }
    )


def claims(pad: int) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": "api",
        "sub": "alice",
        "exp": now + 3600,
        "iat": now,
        "scope": "orders:read",
        "tenant": "t1",
        "groups": [f"group-{i}" for i in range(pad)],
    }


def per_call_us(fn: Callable[[], object], seconds: float = 0.4) -> float:
    """Median over 5 batches of the time per call, in microseconds."""
    batch = 200
    samples = []
    deadline = time.perf_counter() + seconds * 5
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
        if time.perf_counter() > deadline:
            break
    return statistics.median(samples)


def main() -> None:
    key = SigningKey("k1", "ES256", generate_key("ES256"))
    jwk = key.jwk()
    request = Request("GET", "/orders/42", host="api.example.com", headers={"x-env": "prod"})
    view = RequestView.of(request)
    rows = []
    loop = asyncio.new_event_loop()
    results: dict[tuple[int, int], float] = {}
    for pad in (0, 200):
        token = jwt.encode(claims(pad), key.private_key, algorithm="ES256", headers={"kid": "k1"})
        principal = Principal("idp", claims(pad), "", Credential(token, (HeaderToken("authorization"),)))
        for n in (1, 100):
            s = config(n, jwk)
            rules = Rules(s.rules, s.providers)

            def evaluate(rules: Rules = rules, principal: Principal = principal) -> None:
                matched = rules.match(view)
                assert matched is not None
                rules.check(matched, rules.context(matched, principal, view))

            results[(n, pad)] = per_call_us(evaluate)
            pipeline = Pipeline(compile(s), StaticKeys(keys=parse_jwks({"keys": [jwk]})))
            full_request = Request(
                request.method,
                request.path,
                host=request.host,
                headers={**request.headers, "authorization": f"Bearer {token}"},
            )

            async def decide_batch(p: Pipeline = pipeline, r: Request = full_request) -> float:
                await p.decide(r)  # warm: the first decision verifies, later ones hit the token cache
                start = time.perf_counter()
                for _ in range(2000):
                    await p.decide(r)
                return (time.perf_counter() - start) / 2000 * 1e6

            decide_us = loop.run_until_complete(decide_batch())
            rows.append((n, pad, len(token), results[(n, pad)], decide_us))
    loop.close()
    print("| rules | token bytes | match + check (us) | whole decision, cached token (us) |")
    print("|---:|---:|---:|---:|")
    for n, _pad, size, rules_us, decide_us in rows:
        print(f"| {n} | {size} | {rules_us:.1f} | {decide_us:.1f} |")
    for pad in (0, 200):
        per_rule = (results[(100, pad)] - results[(1, pad)]) / 99
        print(f"\nper extra rule (token of {'small' if pad == 0 else 'large'} claims): {per_rule:.2f} us")
    growth = results[(100, 200)] / results[(100, 0)]
    print(f"100 rules, token with 200 more claims / small token: {growth:.2f}x")


if __name__ == "__main__":
    main()
