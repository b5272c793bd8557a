"""The Grafana dashboard against a real Prometheus scraping a real ext-authz.

A known load (30 allowed, 10 without a token, 5 expired) goes to the server by gRPC Check
calls; Debian's `prometheus` scrapes the admin listener every second; then every panel target of
deploy/grafana/ext-authz.json, with its template variables filled in, runs through Prometheus'
HTTP API and must answer without error, and with data unless the panel is allowlisted below. The
ConfigMap for the Grafana sidecar must embed exactly that JSON.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from tests.support.idp import TestIssuer
from tests.support.processes import ExtAuthzProcess, start_ext_authz
from tests.support.prometheus import Prometheus

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "ext-authz.json"
CONFIGMAP = GRAFANA / "configmap.yaml"

JOB = "ext-authz"
ALLOWED, MISSING, EXPIRED = 30, 10, 5

# Panels whose metrics legitimately have no samples here; their queries still run and must not
# fail. Workers: ext_authz_workers exists only under `serve --workers` (the supervisor adds it).
# Sessions: ext_authz_sessions_active needs the Redis session store, and the session event
# counter has no samples until a browser signs in (this config has no browser sign-in at all).
NO_DATA_HERE = {"Workers", "Active sessions", "Sign-ins and refreshes by outcome"}

# Grafana's built-in variables, as a Grafana at a 1-minute step would fill them in.
BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "__interval_ms": "15000",
    "__range_s": "300",
}


def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    found = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Fill in $name, ${name} and ${name:format} as Grafana would for single values."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for ${name} in {expr}"
        return values[name]

    filled = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)
    assert "$" not in filled, filled
    return filled


def check(stub: external_auth_pb2_grpc.AuthorizationStub, token: str | None) -> int:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/x", headers=headers)
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    return int(stub.Check(request, timeout=5).status.code)


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        yield running


@pytest.fixture
def server(issuer: TestIssuer, tmp_path: Path) -> Iterator[tuple[ExtAuthzProcess, str]]:
    # The keys come from the issuer's JWKS endpoint (not inline) so that the key age and key
    # fetch panels have data too.
    config = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "providers": [
            {"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks_uri": issuer.jwks_uri}
        ],
    }
    path = tmp_path / "ext-authz.yaml"
    path.write_text(yaml.safe_dump(config))
    with start_ext_authz(path) as running:
        yield running, running.logged_address("admin listening")


def test_the_configmap_embeds_exactly_the_dashboard_json() -> None:
    (configmap,) = list(yaml.safe_load_all(CONFIGMAP.read_text()))
    assert configmap["apiVersion"] == "v1" and configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {"ext-authz.json": DASHBOARD.read_text()}


def test_the_dashboard_declares_its_variables() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert "label_values(ext_authz_checks_total, job)" in variables["job"]["definition"]
    assert "label_values(ext_authz_checks_total{" in variables["instance"]["definition"]
    assert 36 <= board["schemaVersion"] <= 41
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles)) and set(titles) >= NO_DATA_HERE
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_every_panel_query_answers_from_a_real_prometheus(
    server: tuple[ExtAuthzProcess, str], issuer: TestIssuer
) -> None:
    ext_authz, admin = server
    # A reload before the load, so that the reload panel has a sample (counters survive it).
    ext_authz.process.popen.send_signal(signal.SIGHUP)
    ext_authz.process.wait_for_line(lambda text: '"config reloaded"' in text, timeout=10, what="reloaded")

    with Prometheus(admin, job=JOB) as prometheus:
        prometheus.wait_for(prometheus.targets_up, timeout=15, what="the ext-authz target up")
        token = issuer.mint()  # one token: the first Check misses the token cache, the rest hit
        expired = issuer.mint(ttl=-600)
        with grpc.insecure_channel(ext_authz.address) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
            results = (
                [check(stub, token) for _ in range(ALLOWED)]
                + [check(stub, None) for _ in range(MISSING)]
                + [check(stub, expired) for _ in range(EXPIRED)]
            )
        assert results.count(0) == ALLOWED and results.count(16) == MISSING + EXPIRED

        def by(label: str, extra: str = "") -> dict[str, float]:
            return prometheus.values(
                f'sum by ({label}) (ext_authz_checks_total{{job="{JOB}"{extra}}})', label
            )

        want_decisions = {"allow": float(ALLOWED), "deny": float(MISSING + EXPIRED)}
        prometheus.wait_for(
            lambda: by("decision") == want_decisions, timeout=15, what="the final counts scraped"
        )
        assert by("reason", ', decision="deny"') == {"missing_token": MISSING, "token_expired": EXPIRED}

        # The variables' own queries: label_values(ext_authz_checks_total, job) and instance.
        jobs = prometheus.api("label/job/values", {"match[]": "ext_authz_checks_total"})
        instances = prometheus.api(
            "label/instance/values", {"match[]": f'ext_authz_checks_total{{job="{JOB}"}}'}
        )
        assert jobs == [JOB] and instances == [admin]
        values = BUILTINS | {
            "datasource": "prometheus",
            "job": JOB,
            "instance": admin,
        }  # a regex matching itself

        # A rate over [1m] needs two samples with the load between them: one more scrape.
        scrapes = prometheus.values(f'count_over_time(up{{job="{JOB}"}}[1m])', "instance")[admin]
        prometheus.wait_for(
            lambda: prometheus.values(f'count_over_time(up{{job="{JOB}"}}[1m])', "instance")[admin] > scrapes,
            timeout=10,
            what="one more scrape",
        )

        empty = []
        for title, expr in targets(dashboard()):
            result = prometheus.query(substitute(expr, values))  # raises on any query error
            if not result:
                empty.append(title)
        assert set(empty) <= NO_DATA_HERE, f"panels without data: {sorted(set(empty) - NO_DATA_HERE)}"

        # A few values the load fixes, through the panels' own queries.
        panel: dict[str, str] = {}
        for title, expr in targets(dashboard()):
            panel.setdefault(title, expr)  # a panel's first query (the key-age panel has two)
        ratio = prometheus.query(substitute(panel["Token-cache hit ratio"], values))
        assert 0 < float(ratio[0]["value"][1]) <= 1
        ages = prometheus.values(
            substitute(panel["Key age per provider, against its max_stale_seconds"], values), "provider"
        )
        assert set(ages) == {"test"} and 0 <= ages["test"] < 86400
