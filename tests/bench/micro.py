"""In-process micro-benchmarks of the decision pipeline, with the raw cryptography cost beside them.

No gRPC and no Envoy: ext-authz's real Pipeline and KeyStore over inline keys, timed in one
coroutine (so the event loop's own cost per call is not in the numbers), the cases taking turns
batch by batch. "New token" cycles through
more distinct tokens than the verified-token cache holds, so every call parses and verifies. The raw
rows call cryptography's ``public_key.verify`` directly on the same signature and signing input:
the floor any verifier pays. Run alone with ``python -m tests.bench.micro``.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz.compiled import compile
from ext_authz.config.parse import parse
from ext_authz.keys.store import KeyStore
from ext_authz.model import Credential, Request
from ext_authz.pipeline import Pipeline
from ext_authz.sources import HeaderToken
from ext_authz.transport.adapter import serialized_response, to_request
from tests.bench import fixtures
from tests.support.idp import SigningKey, b64url_decode, tamper_signature

ALGORITHMS = ("RS256", "ES256", "EdDSA")
POOL = 256  # distinct tokens per algorithm for "new token" rows
SMALL_CACHE = 64  # < POOL: cycling through the pool never hits
BATCHES = 7
BATCH_SECONDS = 0.08

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    us: float  # median microseconds per call
    note: str = ""


@dataclass(frozen=True, slots=True)
class Case:
    """One thing to time: a plain call, or a coroutine function awaited inside one coroutine."""

    name: str
    sync: Callable[[], object] | None = None
    coro: Callable[[], Awaitable[object]] | None = None
    note: str = ""


def _calls_per_batch(once: float) -> int:
    return max(20, int(BATCH_SECONDS / max(once, 1e-7)))


async def _batch(case: Case, calls: int) -> float:
    """Microseconds per call over ``calls`` calls."""
    start = time.perf_counter()
    if case.coro is not None:
        coro = case.coro
        for _ in range(calls):
            await coro()
    else:
        assert case.sync is not None
        sync = case.sync
        for _ in range(calls):
            sync()
    return (time.perf_counter() - start) / calls * 1e6


async def time_interleaved(cases: Sequence[Case]) -> list[Row]:
    """The median over batches of each case's time per call; the cases take turns batch by batch,
    so that a slow spell of a shared machine touches every case alike."""
    calls = {case.name: _calls_per_batch(await _batch(case, 20) / 1e6) for case in cases}
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(BATCHES):
        for case in cases:
            samples[case.name].append(await _batch(case, calls[case.name]))
    return [Row(case.name, statistics.median(samples[case.name]), case.note) for case in cases]


def raw_verifier(key: SigningKey, token: str) -> Callable[[], None]:
    """cryptography's own verify of this token's signature, prepared outside the timed call."""
    header, payload, signature_segment = token.split(".")
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = b64url_decode(signature_segment)
    public = key.public_key
    if isinstance(public, rsa.RSAPublicKey):
        rsa_key, pkcs1, sha256 = public, padding.PKCS1v15(), hashes.SHA256()
        return lambda: rsa_key.verify(signature, signing_input, pkcs1, sha256)
    if isinstance(public, ec.EllipticCurvePublicKey):
        half = len(signature) // 2
        der = encode_dss_signature(int.from_bytes(signature[:half]), int.from_bytes(signature[half:]))
        ec_key, ecdsa = public, ec.ECDSA(hashes.SHA256())
        return lambda: ec_key.verify(der, signing_input, ecdsa)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    ed_key = public
    return lambda: ed_key.verify(signature, signing_input)


def _request(token: str | None) -> Request:
    headers = {
        ":method": "GET",
        ":path": fixtures.PATH,
        ":authority": "api.example.com",
        "x-request-id": "r1",
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return Request("GET", fixtures.PATH, host="api.example.com", headers=headers)


def _check_bytes(token: str) -> bytes:
    """A serialized CheckRequest as Envoy sends it for the benchmark's request."""
    headers = {
        ":method": "GET",
        ":path": fixtures.PATH,
        ":authority": "127.0.0.1",
        ":scheme": "http",
        "user-agent": "wrk",
        "x-forwarded-proto": "http",
        "x-request-id": "8a3c5c1e-6a0e-4f5e-9b7a-2f1f0c9d7e11",
        "authorization": f"Bearer {token}",
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1234567890", method="GET", path=fixtures.PATH, host="127.0.0.1", scheme="http", headers=headers
    )
    check = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    return check.SerializeToString()


def _cycling(call: Callable[[T], Awaitable[object]], values: Sequence[T]) -> Callable[[], Awaitable[object]]:
    """``call`` on the next value each time, round-robin."""
    following = itertools.cycle(values).__next__
    return lambda: call(following())


def _pipeline(config: dict[str, Any]) -> Pipeline:
    settings = parse(config)
    return Pipeline(compile(settings), KeyStore(settings.providers, fetcher=None, cache=None))


async def _measure(keys: dict[str, SigningKey]) -> list[Row]:
    key_list = list(keys.values())
    rs256 = keys["RS256"]
    cached = _pipeline(fixtures.authz_config(key_list))
    token = fixtures.mint(rs256)
    request = _request(token)
    first = await cached.decide(request)
    assert type(first).__name__ == "Allow", first
    wire = _check_bytes(token)

    async def whole_check() -> bytes:
        check = external_auth_pb2.CheckRequest.FromString(wire)
        decision = await cached.decide(to_request(check))
        return serialized_response(decision, "r1")

    cases = [
        Case("decision, cached token (RS256)", coro=lambda: cached.decide(request)),
        Case(
            "Check without gRPC, cached token",
            coro=whole_check,
            note="parse CheckRequest, adapt, decide, build and serialize CheckResponse",
        ),
    ]
    fresh = _pipeline(fixtures.authz_config(key_list, token_cache_entries=SMALL_CACHE))
    location = (HeaderToken("authorization", "Bearer "),)
    for alg in ALGORITHMS:
        pool = fixtures.mint_pool(keys[alg], POOL)
        requests = [_request(t) for t in pool]
        credentials = [Credential(t, location) for t in pool]
        assert type(await fresh.decide(requests[0])).__name__ == "Allow"
        cases += [
            Case(f"decision, new token ({alg})", coro=_cycling(fresh.decide, requests)),
            Case(
                f"verification stage, new token ({alg})",
                coro=_cycling(fresh.verifier.verify, credentials),
                note="Verifier.verify: parse, key, signature, claims, cache put",
            ),
            Case(
                f"raw cryptography verify ({alg})",
                sync=raw_verifier(keys[alg], pool[0]),
                note="public_key.verify on prepared inputs",
            ),
        ]
    public = rs256.public_key
    cases.append(
        Case(
            "PyJWT jwt.decode (RS256), for reference",
            sync=lambda: jwt.decode(token, key=public, algorithms=["RS256"], audience=fixtures.AUDIENCE),
            note="what a straightforward server pays",
        )
    )
    no_token = _request(None)
    assert type(await cached.decide(no_token)).__name__ == "Deny"
    forged = _request(tamper_signature(fixtures.mint(rs256, "mallory")))
    assert type(await cached.decide(forged)).__name__ == "Deny"
    cases += [
        Case("denial: no token (401)", coro=lambda: cached.decide(no_token)),
        Case("denial: forged RS256 signature (401)", coro=lambda: cached.decide(forged)),
    ]
    return await time_interleaved(cases)


def run() -> list[Row]:
    keys = {alg: fixtures.signing_key(alg) for alg in ALGORITHMS}
    return asyncio.run(_measure(keys))


def value(rows: Sequence[Row], name: str) -> float:
    return next(r.us for r in rows if r.name == name)


def main() -> None:
    rows = run()
    print("| in-process | µs per call | |")
    print("|---|---:|---|")
    for row in rows:
        print(f"| {row.name} | {row.us:.1f} | {row.note} |")


if __name__ == "__main__":
    main()
