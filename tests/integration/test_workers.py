"""serve --workers: a supervisor and worker processes sharing one port."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.supervisor import aggregate
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, json_log_line, start_ext_authz
from tests.support.redis import free_port


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        yield running


@pytest.fixture
def fleet(issuer: TestIssuer, tmp_path: Path) -> Iterator[tuple[ExtAuthzProcess, str]]:
    config = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "providers": [{"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}],
    }
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(config))
    with start_ext_authz(path, extra_args=["--workers", "2"]) as server:
        line = server.process.wait_for_line(
            lambda text: '"event": "supervising"' in text, timeout=20, what="supervising"
        )
        record = json_log_line(line)
        assert record is not None and isinstance(record["admin"], str)
        yield server, record["admin"]


def check(address: str, token: str | None) -> int:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/x", headers=headers)
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    # A new channel each time: a new connection, which the kernel may hand to either worker.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
        response = stub.Check(request, timeout=5)
    return int(response.status.code)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def wait_ready(admin: str) -> None:
    deadline = time.monotonic() + 20
    while get(f"http://{admin}/readyz")[0] != 200:
        assert time.monotonic() < deadline, "the fleet never became ready"
        time.sleep(0.1)


def test_workers_share_the_port_and_metrics_add_up(
    fleet: tuple[ExtAuthzProcess, str], issuer: TestIssuer
) -> None:
    server, admin = fleet
    wait_ready(admin)
    assert len(children(server.process.pid)) == 2
    token = issuer.mint()
    results = [check(server.address, token) for _ in range(20)] + [
        check(server.address, None) for _ in range(5)
    ]
    assert results.count(0) == 20 and results.count(16) == 5
    status, text = get(f"http://{admin}/metrics")
    assert status == 200
    assert "ext_authz_workers 2" in text
    assert "ext_authz_worker_restarts_total 0" in text

    def total(decision: str) -> float:
        prefix = f'ext_authz_checks_total{{decision="{decision}"'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    assert total("allow") == 20
    assert total("deny") == 5


def test_a_dead_worker_is_replaced(fleet: tuple[ExtAuthzProcess, str], issuer: TestIssuer) -> None:
    server, admin = fleet
    wait_ready(admin)
    before = children(server.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = children(server.process.pid)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement worker: {now}"
        time.sleep(0.1)
    wait_ready(admin)
    assert all(check(server.address, issuer.mint()) == 0 for _ in range(10))
    assert "ext_authz_worker_restarts_total 1" in get(f"http://{admin}/metrics")[1]


def test_sigterm_stops_every_worker_and_exits_0(fleet: tuple[ExtAuthzProcess, str]) -> None:
    server, admin = fleet
    wait_ready(admin)
    workers = children(server.process.pid)
    assert server.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_aggregate_adds_counters_and_keeps_the_largest_age() -> None:
    def worker(checks: float, age: float) -> str:
        return (
            f'# TYPE ext_authz_checks counter\next_authz_checks_total{{decision="allow"}} {checks}\n'
            f'# TYPE ext_authz_key_age_seconds gauge\next_authz_key_age_seconds{{provider="p"}} {age}\n'
        )

    text = aggregate([worker(2.0, 5.0), worker(3.0, 9.0)], workers=2).decode()
    assert 'ext_authz_checks_total{decision="allow"} 5.0' in text
    assert 'ext_authz_key_age_seconds{provider="p"} 9.0' in text


def test_workers_share_the_http_listener(issuer: TestIssuer, tmp_path: Path) -> None:
    port = free_port()
    config = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "listen_http": f"127.0.0.1:{port}",
        "providers": [{"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}],
    }
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(config))
    with start_ext_authz(path, extra_args=["--workers", "2"]) as server:
        listening = [0]

        def both_listen(line: str) -> bool:
            listening[0] += '"http listening"' in line
            return listening[0] >= 2

        server.process.wait_for_line(both_listen, timeout=20, what="two workers' HTTP listeners")
        token = issuer.mint()
        statuses = []
        for i in range(20):  # a new connection each time: the kernel hands them to either worker
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/nginx",
                headers={"X-Original-URI": "/x", "X-Original-Method": "GET"}
                | ({"Authorization": f"Bearer {token}"} if i % 2 else {}),
            )
            statuses.append(get_request(request))
        assert statuses.count(200) == 10 and statuses.count(401) == 10


def get_request(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
