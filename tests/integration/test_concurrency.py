"""The request threads under load, while the config reloads and the issuer rotates its keys.

A real Server (grpc's sync server, 4 request threads) and eight client threads, each sending
Checks back to back with tokens of every kind: valid ones (the newest key's, a moment after
the issuer published it, so that some Checks wait for a refetch on the loop), forged, expired,
for another audience, with too few scopes, and none. Meanwhile the test reloads the config
(two equivalent configs in turn) and rotates the issuer's signing key; Health Watch streams stay
open throughout. Every Check must get exactly the answer its token deserves (no 500, no 503, no
gRPC error, never an allow that should be a denial), and the Check counter must count them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz._proto.envoy.service.auth.v3 import (
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.config.parse import load
from ext_authz.server import Server
from tests.support.idp import TestIssuer, tamper_signature
from tests.support.inprocess import check_request

CLIENTS = 8
SECONDS = 5.0
RELOAD_EVERY = 0.25
ROTATE_EVERY = 0.7
WATCH_STREAMS = 20


def write_config(path: Path, issuer: TestIssuer, audiences: list[str]) -> None:
    provider = {
        "name": "idp",
        "issuer": issuer.url,
        "audiences": audiences,
        "refetch_min_interval_seconds": 0,
        "allow_insecure_http": True,
    }
    rules = [
        {"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}},
        {"name": "api", "match": {"paths": ["/*"]}, "require": {}},
    ]
    document = {
        "listen": "127.0.0.1:0",
        "providers": [provider],
        "rules": rules,
        "log": {"decisions": "none"},
    }
    path.write_text(yaml.safe_dump(document))


@dataclass
class Tokens:
    """The tokens clients send; replaced (under the lock) each time the issuer rotates."""

    issuer: TestIssuer
    lock: threading.Lock = field(default_factory=threading.Lock)
    current: dict[str, str] = field(default_factory=dict)

    def mint(self) -> None:
        issuer = self.issuer
        minted = {
            "valid": issuer.mint({"scope": "read"}),
            "admin": issuer.mint({"scope": "read admin"}),
            "forged": tamper_signature(issuer.mint({"scope": "read admin"})),
            "expired": issuer.mint({"scope": "read admin"}, ttl=-120),
            "audience": issuer.mint({"aud": "someone-else", "scope": "read admin"}),
        }
        with self.lock:
            self.current = minted

    def pick(self, kind: str) -> str:
        with self.lock:
            return self.current[kind]


# (token kind or None, path) -> the HTTP status it must get (200: allowed).
CASES: dict[tuple[str | None, str], int] = {
    ("valid", "/orders"): 200,
    ("valid", "/admin/users"): 403,
    ("admin", "/admin/users"): 200,
    ("forged", "/orders"): 401,
    ("expired", "/orders"): 401,
    ("audience", "/orders"): 401,
    (None, "/orders"): 401,
}


def http_status(response: external_auth_pb2.CheckResponse) -> int:
    if response.status.code == 0:
        return 200
    return int(response.denied_response.status.code)


def client(address: str, tokens: Tokens, stop: threading.Event, seed: int, results: list[Any]) -> None:
    chance = random.Random(seed)  # noqa: S311 - which case to send next, not a secret
    cases = list(CASES)
    with grpc.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            kind, path = chance.choice(cases)
            token = tokens.pick(kind) if kind is not None else None
            try:
                response = stub.Check(check_request(path, token, host="api.test"), timeout=5)
                results.append((kind, path, http_status(response), response.status.message))
            except grpc.RpcError as error:
                results.append((kind, path, -1, str(error.code())))


def watcher(address: str, stop: threading.Event, seen: list[int]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=""))

        def cancel_on_stop() -> None:
            stop.wait()
            stream.cancel()

        threading.Thread(target=cancel_on_stop, daemon=True).start()
        with contextlib.suppress(grpc.RpcError):
            for update in stream:
                seen.append(int(update.status))


def checks_counted(server: Server) -> float:
    total = 0.0
    body = server.metrics.exposition()
    text = body.decode() if isinstance(body, bytes) else body[1].decode()
    for line in text.splitlines():
        if line.startswith("ext_authz_checks_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_checks_stay_right_through_reloads_and_rotations(tmp_path: Path) -> None:
    with TestIssuer(audience="api") as issuer:
        path = tmp_path / "ext-authz.yaml"
        write_config(path, issuer, ["api"])
        server = Server(load(path), config_path=path, threads=4)
        address = await server.start()
        tokens = Tokens(issuer)
        tokens.mint()
        stop = threading.Event()
        results: list[Any] = []
        watched: list[list[int]] = [[] for _ in range(WATCH_STREAMS)]
        threads = [
            threading.Thread(target=client, args=(address, tokens, stop, seed, results), daemon=True)
            for seed in range(CLIENTS)
        ] + [threading.Thread(target=watcher, args=(address, stop, seen), daemon=True) for seen in watched]
        reloads = rotations = 0
        try:
            for _ in range(100):  # keys in: the first fetch
                if server.ready():
                    break
                await asyncio.sleep(0.05)
            for thread in threads:
                thread.start()
            started = time.monotonic()
            next_rotation = started + ROTATE_EVERY
            while time.monotonic() - started < SECONDS:
                await asyncio.sleep(RELOAD_EVERY)
                write_config(path, issuer, ["api"] if reloads % 2 else ["api", "other"])
                assert await server.reload("test")
                reloads += 1
                if time.monotonic() >= next_rotation:
                    # A new kid: the next Checks with these tokens wait for a refetch on the loop.
                    await asyncio.to_thread(issuer.rotate)
                    await asyncio.to_thread(tokens.mint)
                    rotations += 1
                    next_rotation += ROTATE_EVERY
        finally:
            stop.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 10)
            counted = checks_counted(server)
            await server.stop(0)

    assert reloads >= 10 and rotations >= 5
    assert len(results) > 500, f"only {len(results)} Checks answered"
    wrong = Counter(
        (kind, path, status, message)
        for kind, path, status, message in results
        if status != CASES[(kind, path)]
    )
    assert not wrong, f"wrong answers (kind, path, status, reason): {dict(wrong)}"
    assert counted == len(results), f"{counted} Checks counted, {len(results)} answered"
    statuses = {kind: {status for k, _, status, _ in results if k == kind} for kind, _ in CASES}
    assert statuses["valid"] == {200, 403} and statuses["admin"] == {200}
    # The Watch streams held no request thread and saw the server come up.
    assert all(seen and seen[-1] == health_pb2.HealthCheckResponse.SERVING for seen in watched)
