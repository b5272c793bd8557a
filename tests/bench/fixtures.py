"""Keys, tokens and configs shared by the benchmark scenarios, and a running ext-authz.

One issuer with one key per algorithm family; tokens carry what X3's last rule requires (scope
``orders:read``, tenant ``t1``, a subject that is not the path's id), so every scenario sends the
same request, ``GET /orders/42``, and every answer is an allow.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
import yaml

from tests.bench.bench_rules import TARGET, filler_rules
from tests.bench.procs import BenchProcess, events
from tests.support.idp import SigningKey, generate_key

ISSUER = "https://idp.example.com/"
AUDIENCE = "api"
PATH = "/orders/42"
TOKEN_LIFETIME = 4 * 3600  # far beyond the whole suite
READY_TIMEOUT = 30.0


def signing_key(alg: str) -> SigningKey:
    return SigningKey(f"bench-{alg.lower()}", alg, generate_key(alg))


def claims(subject: str = "alice") -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "exp": now + TOKEN_LIFETIME,
        "iat": now,
        "jti": uuid.uuid4().hex,
        "scope": "orders:read profile",
        "tenant": "t1",
        "email": f"{subject}@example.com",
    }


def mint(key: SigningKey, subject: str = "alice") -> str:
    return jwt.encode(claims(subject), key.private_key, algorithm=key.alg, headers={"kid": key.kid})


def mint_pool(key: SigningKey, count: int) -> list[str]:
    """``count`` distinct valid tokens (each its own subject and jti)."""
    return [mint(key, f"user-{i}") for i in range(count)]


def jwks(keys: Sequence[SigningKey]) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def authz_config(
    keys: Sequence[SigningKey], *, rules: int = 0, token_cache_entries: int | None = None
) -> dict[str, Any]:
    """ext-authz's config: its defaults, inline keys, and ``rules`` rules (0: no ``rules`` key,
    so every request needs a valid token) whose last one is the one the request matches."""
    document: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "providers": [
            {
                "name": "idp",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "jwks": jwks(keys),
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-user-email", "claim": "email"},
                ],
            }
        ],
    }
    if rules:
        document["rules"] = [*filler_rules(rules - 1), TARGET]
    if token_cache_entries is not None:
        document["token_cache"] = {"max_entries": token_cache_entries}
    return document


class ExtAuthz:
    """``python -m ext_authz serve`` (one process, or a supervisor and its workers)."""

    def __init__(
        self, process: BenchProcess, address: str, admin: str | None, http: str | None = None
    ) -> None:
        self.process = process
        self.address = address
        self.admin = admin
        self.http = http  # the HTTP listener (listen_http), when started with one

    @property
    def pid(self) -> int:
        return self.process.pid

    def token_cache(self) -> dict[str, float]:
        """hit, miss and size of the verified-token cache, from /metrics."""
        if self.admin is None:
            return {}
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5.0) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for name, pattern in (
            ("hit", r'^ext_authz_token_cache_requests_total\{result="hit"\} (\S+)$'),
            ("miss", r'^ext_authz_token_cache_requests_total\{result="miss"\} (\S+)$'),
            ("size", r"^ext_authz_token_cache_size (\S+)$"),
        ):
            found = re.search(pattern, text, re.MULTILINE)
            if found:
                values[name] = float(found.group(1))
        return values

    def stop(self) -> None:
        self.process.stop()


def start_ext_authz(
    config: dict[str, Any],
    workdir: Path,
    name: str,
    *,
    workers: int | None = None,
    extra: Sequence[str] = (),
    http: bool = False,
) -> ExtAuthz:
    """Start ext-authz and wait until every process is serving with its keys ready."""
    path = workdir / f"{name}-ext-authz.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "ext_authz", "serve", "--config", str(path), "--drain-seconds", "0"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    argv += list(extra)
    if http:
        argv += ["--listen-http", "127.0.0.1:0"]
    # Standard output is the decision log: written by ext-authz as usual, discarded here.
    process = BenchProcess(f"ext-authz ({name})", argv, workdir / f"{name}-ext-authz.log")
    expected = workers or 1
    try:

        def ready(records: list[dict[str, object]]) -> list[dict[str, object]] | None:
            serving = events(records, "serving")
            if len(serving) >= expected and len(events(records, "ready")) >= expected:
                return serving
            return None

        serving = process.wait_for(ready, timeout=READY_TIMEOUT, what="serving with keys ready")
        assert isinstance(serving, list)
        address = str(serving[0]["address"])
        admin = None
        if workers is None:
            listening = events(process.json_lines(), "admin listening")
            admin = str(listening[0]["address"]) if listening else None
        http_address = None
        if http:
            found = events(process.json_lines(), "http listening")
            http_address = str(found[0]["address"]) if found else None
    except BaseException:
        process.stop()
        raise
    return ExtAuthz(process, address, admin, http_address)


def start_noop(workdir: Path, sync_threads: int = 0) -> tuple[BenchProcess, str]:
    """E2's no-op authorizer (E2s's with ``sync_threads``); returns it and its address."""
    argv = [sys.executable, "-m", "tests.bench.noop_server", "--listen", "127.0.0.1:0"]
    if sync_threads:
        argv += ["--sync", str(sync_threads)]
    name = f"noop-sync{sync_threads}" if sync_threads else "noop"
    process = BenchProcess("noop authorizer", argv, workdir / f"{name}.log")
    try:
        serving = process.wait_for(
            lambda records: events(records, "serving"), timeout=READY_TIMEOUT, what="serving"
        )
    except BaseException:
        process.stop()
        raise
    assert isinstance(serving, list)
    return process, str(serving[0]["address"])
