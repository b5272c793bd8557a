"""Issue 11 item 13, black box: rotations placed right after a fetch, two workers sharing Redis.

The chaos run that found it: `serve --workers 2` sharing a real redis-server, the IdP rotating
just after a fetch, one worker adopting the set the other had stored before the rotation. Every
token signed by the new key got 401 for 10 s. Here each round first spends the workers'
unknown-kid refetch allowance on junk kids (so a refetch for the new key is held back by the rate
limit), waits for the IdP to serve a key set, rotates ``offset`` seconds later and sends tokens
signed by the new key on fresh connections (the kernel spreads them over both workers). Every
answer must be 200, or 503 with Retry-After while the new key is being fetched, never 401; and
within a refresh period (plus margin) every answer is 200.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from tests.support.authz import (
    AUDIENCE,
    CheckResult,
    _result,
    check_request,
    config,
    provider,
    random_kid_token,
    write_config,
)
from tests.support.idp import JWKS_PATH, TestIssuer
from tests.support.processes import ExtAuthzProcess, json_log_line, start_ext_authz
from tests.support.redis import RedisServer

REFRESH = 1.0
SECRET = "rotation-fleet-test-secret-0123456789abcdef"
# Envoy's ext_authz timeout is the call's deadline; the server must answer within it.
CALL_TIMEOUT = 1.0
CONNECTIONS = 6
OFFSETS = (0.0, 0.01, 0.05, 0.2, 0.5)


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer(audience=AUDIENCE) as running:
        yield running


@pytest.fixture
def fleet(tmp_path: Path, issuer: TestIssuer) -> Iterator[ExtAuthzProcess]:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        (tmp_path / "secret").write_text(SECRET + "\n")
        document = config(
            provider(
                issuer,
                refresh_interval_seconds=REFRESH,
                fetch_timeout_seconds=2,
                max_stale_seconds=60,
                refetch_min_interval_seconds=30,
            ),
            jwks_cache={"backend": "redis", "url": redis.url, "secret_file": "secret"},
        )
        path = write_config(tmp_path, document)
        server = stack.enter_context(start_ext_authz(path, extra_args=["--workers", "2"]))
        line = server.process.wait_for_line(
            lambda text: '"event": "supervising"' in text, timeout=20, what="supervising"
        )
        assert json_log_line(line) is not None
        yield server


def check(address: str, token: str) -> CheckResult:
    # A new channel each time: a new connection, which the kernel may hand to either worker.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
        started = time.monotonic()
        response: external_auth_pb2.CheckResponse = stub.Check(check_request(token), timeout=CALL_TIMEOUT)
        return _result(response, time.monotonic() - started)


def burst(pool: ThreadPoolExecutor, address: str, tokens: list[str]) -> list[CheckResult]:
    return list(pool.map(lambda token: check(address, token), tokens))


def pending(result: CheckResult) -> bool:
    return (
        result.http_status == 503
        and re.fullmatch(r"[1-9][0-9]*", result.headers.get("retry-after", "")) is not None
        and result.error == "temporarily_unavailable"
    )


def test_rotations_right_after_a_fetch_never_get_a_401(fleet: ExtAuthzProcess, issuer: TestIssuer) -> None:
    address = fleet.address
    with ThreadPoolExecutor(max_workers=CONNECTIONS) as pool:
        deadline = time.monotonic() + 20
        while not all(r.http_status == 200 for r in burst(pool, address, [issuer.mint()] * CONNECTIONS)):
            assert time.monotonic() < deadline, f"the fleet never accepted a token\n{fleet.process.tail()}"
            time.sleep(0.1)
        for offset in OFFSETS:
            # Spend the refetch allowance: a refetch for the new key is held back by the limit.
            for result in burst(pool, address, [random_kid_token(issuer) for _ in range(CONNECTIONS)]):
                assert result.http_status == 401 or pending(result), result.describe()
            issuer.wait_for_count(JWKS_PATH, issuer.request_count(JWKS_PATH) + 1, timeout=REFRESH + 3)
            time.sleep(offset)
            token = issuer.mint(kid=issuer.rotate())
            rotated = time.monotonic()
            while True:
                results = burst(pool, address, [token] * CONNECTIONS)
                wrong = [r.describe() for r in results if r.http_status != 200 and not pending(r)]
                assert not wrong, f"offset {offset}: {wrong}\n{fleet.process.tail()}"
                if all(r.http_status == 200 for r in results):
                    break
                assert time.monotonic() - rotated < REFRESH + 5, f"offset {offset}: still 503\n{results}"
                time.sleep(0.05)
