"""gRPC clients, configs and assertions for the key-handling tests (test_keys, test_keys_envoy,
test_shared_cache)."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from tests.support.idp import TestIssuer
from tests.support.lifecycle import StopOnExit
from tests.support.processes import ExtAuthzProcess

AUDIENCE = "api"


AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


SERVING = health_pb2.HealthCheckResponse.SERVING


NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


FETCH_TIMEOUT = 0.5


# What a Check may take beyond the fetch timeout: gRPC round trip, verification, a busy CI box.
CHECK_MARGIN = 0.75


CHECK_BOUND = FETCH_TIMEOUT + CHECK_MARGIN


# A Check whose key is cached waits for no fetch: far below FETCH_TIMEOUT, with room for noise.
ROUTINE_CHECK_BOUND = 0.25


READY_TIMEOUT = 10.0


# The refresh period of the rotation tests: long enough to act between two refreshes.
REFRESH = 1.5


def fast(**overrides: Any) -> dict[str, Any]:
    """Key settings with short intervals, for tests that watch refreshes happen."""
    return {
        "refresh_interval_seconds": 1,
        "fetch_timeout_seconds": FETCH_TIMEOUT,
        "max_stale_seconds": 60,
        **overrides,
    }


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One Check answer, as Envoy would turn it into HTTP, with how long the call took."""

    http_status: int  # 200 for OK, else the denied_response status
    headers: Mapping[str, str]  # lower-cased names
    body: str
    seconds: float

    @property
    def error(self) -> str | None:
        """The `error` member of a denial's JSON body (None for OK)."""
        if self.http_status == 200:
            return None
        value = json.loads(self.body).get("error")
        return value if isinstance(value, str) else None

    def describe(self) -> str:
        return f"HTTP {self.http_status} in {self.seconds:.3f}s headers={dict(self.headers)} body={self.body}"


def check_request(token: str | None, path: str = "/orders") -> external_auth_pb2.CheckRequest:
    headers = {":method": "GET", ":path": path, ":authority": "api.test"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path=path, headers=headers)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def _result(response: external_auth_pb2.CheckResponse, seconds: float) -> CheckResult:
    if response.status.code == 0:
        headers = {h.header.key.lower(): h.header.value for h in response.ok_response.headers}
        return CheckResult(200, headers, "", seconds)
    denied = response.denied_response
    headers = {h.header.key.lower(): h.header.value for h in denied.headers}
    return CheckResult(int(denied.status.code), headers, denied.body, seconds)


class AuthzClient:
    """A synchronous gRPC client for one ext-authz address: Check and grpc.health.v1."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._check = external_auth_pb2_grpc.AuthorizationStub(self._channel)  # type: ignore[no-untyped-call]
        self.health = health_pb2_grpc.HealthStub(self._channel)

    def check(self, token: str | None, *, timeout: float = 10.0) -> CheckResult:
        request = check_request(token)
        started = time.monotonic()
        response: external_auth_pb2.CheckResponse = self._check.Check(request, timeout=timeout)
        return _result(response, time.monotonic() - started)

    def check_all(self, tokens: Sequence[str], *, timeout: float = 30.0) -> list[CheckResult]:
        """Send every Check at once (one burst on one channel), then collect the answers."""
        started = time.monotonic()
        futures = [self._check.Check.future(check_request(t), timeout=timeout) for t in tokens]
        results = []
        for future in futures:
            response: external_auth_pb2.CheckResponse = future.result()
            results.append(_result(response, time.monotonic() - started))
        return results

    def health_status(self, service: str = "") -> int:
        response = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.health_status()
            if status == SERVING:
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"health not SERVING within {timeout:g}s (last status {status})")
            time.sleep(0.05)

    def close(self) -> None:
        self._channel.close()


class HealthWatch(StopOnExit):
    """Every status the health Watch stream reports for `service`, with when it arrived.

    A stream, not polling: a SERVING that lasted a millisecond is still recorded.
    """

    def __init__(self, client: AuthzClient, service: str = "") -> None:
        self._stream = client.health.Watch(health_pb2.HealthCheckRequest(service=service))
        self._lock = threading.Lock()
        self._seen: list[tuple[float, int]] = []
        self._error: str | None = None
        self._thread = threading.Thread(target=self._read, name="health-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for update in self._stream:
                with self._lock:
                    self._seen.append((time.monotonic(), int(update.status)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                with self._lock:
                    self._error = f"{exc.code()}: {exc.details()}"

    @property
    def seen(self) -> list[tuple[float, int]]:
        with self._lock:
            if self._error is not None:
                raise AssertionError(f"health Watch stream failed: {self._error}")
            return list(self._seen)

    def statuses(self) -> list[int]:
        return [status for _, status in self.seen]

    def serving_since(self) -> float | None:
        """When SERVING was first reported, or None."""
        return next((at for at, status in self.seen if status == SERVING), None)

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5)

    def stop(self) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Authz:
    """A running ext-authz process and a client connected to it."""

    process: ExtAuthzProcess
    client: AuthzClient

    def log(self, lines: int = 60) -> str:
        return f"--- ext-authz log ---\n{self.process.process.tail(lines)}"

    def check(self, token: str | None, *, timeout: float = 10.0) -> CheckResult:
        return self.client.check(token, timeout=timeout)

    def wait_serving(self, timeout: float = READY_TIMEOUT) -> None:
        try:
            self.client.wait_serving(timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None

    def close(self) -> None:
        self.client.close()
        code = self.process.stop()
        assert code == 0, f"ext-authz exited with {code}\n{self.log()}"


def provider(issuer: TestIssuer, name: str = "test", **keys: Any) -> dict[str, Any]:
    """A provider using OIDC discovery (no jwks_uri) for `issuer`, plus any key-cache settings."""
    return {"name": name, "issuer": issuer.url, "audiences": [AUDIENCE], **keys}


def config(*providers: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "providers": list(providers), **top}


def write_config(directory: Path, document: Mapping[str, Any], name: str = "ext-authz.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False))
    return path


def random_kid_token(issuer: TestIssuer) -> str:
    """A token signed by the issuer's real key but naming a kid it never published."""
    return issuer.mint(headers={"kid": f"random-{secrets.token_hex(8)}"})


def assert_unavailable(result: CheckResult, authz: Authz) -> None:
    """503 with a whole-number Retry-After >= 1 and error temporarily_unavailable."""
    context = f"{result.describe()}\n{authz.log()}"
    assert result.http_status == 503, context
    retry_after = result.headers.get("retry-after", "")
    assert re.fullmatch(r"[0-9]+", retry_after), context
    assert int(retry_after) >= 1, context
    assert result.error == "temporarily_unavailable", context


def assert_invalid_token(result: CheckResult, authz: Authz) -> None:
    context = f"{result.describe()}\n{authz.log()}"
    assert result.http_status == 401, context
    assert result.error == "invalid_token", context
    assert 'error="invalid_token"' in result.headers.get("www-authenticate", ""), context


def assert_refused_or_pending(result: CheckResult, authz: Authz) -> None:
    """A token whose kid the IdP may not have published yet: 401, or 503 with Retry-After while
    no fetch since the kid was first seen has come back (never an allow)."""
    if result.http_status == 503:
        assert_unavailable(result, authz)
    else:
        assert_invalid_token(result, authz)


def assert_ok(result: CheckResult, authz: Authz) -> None:
    assert result.http_status == 200, f"{result.describe()}\n{authz.log()}"


def assert_prompt(result: CheckResult, authz: Authz, bound: float = CHECK_BOUND) -> None:
    assert result.seconds <= bound, f"Check took {result.seconds:.3f}s > {bound:g}s\n{authz.log()}"
