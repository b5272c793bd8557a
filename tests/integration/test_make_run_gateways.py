"""`make run GATEWAY=envoy-http|nginx|caddy` end to end: the stack comes up with that gateway in
front of ext-authz's HTTP listener, every printed curl command answers as its `# expect <status>`
line says (alice's token reaches the echo backend with her identity, no token gets 401), a forged
identity header on an anonymous route never reaches the backend, and Ctrl-C stops every process
it started. Browser sign-in through each gateway: test_browser_signin.py's walk (sign in at /app/,
the identity at the backend, logout), against the stack with that gateway. Plus
`envoy --mode validate` of deploy/envoy/envoy-http.yaml.

As tests/integration/test_make_run.py: ephemeral ports on 127.0.0.1 (RUN_*, with
RUN_AUTHZ_HTTP_PORT for the HTTP listener), the keys in a temporary directory, make told (`-o`)
not to rebuild the venv.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ext_authz.dev.plan import (
    SHIPPED_CONFIGS,
    StackPlan,
    render_envoy_config,
    render_shipped_config,
    shipped_gateway_plan,
    stack_plan,
)
from ext_authz.dev.stack import READY_MARKER
from tests.integration import test_browser_signin as signin
from tests.integration.test_make_run import (
    REPO_ROOT,
    STAMP,
    STARTUP_TIMEOUT,
    free_ports,
    printed_expectations,
    run_curl_command,
    stack_env,
    started_pids,
    wait_until_gone,
)
from tests.support.envoy import validate_config
from tests.support.gateways import render_caddyfile, render_nginx
from tests.support.processes import ManagedProcess

ENVOY_HTTP = REPO_ROOT / "deploy" / "envoy" / "envoy-http.yaml"
# The gateway's child process in the stack's `[run] started NAME` lines.
CHILD = {"envoy-http": "envoy", "nginx": "nginx", "caddy": "caddy"}


def test_envoy_http_yaml_passes_envoy_validate() -> None:
    result = validate_config(ENVOY_HTTP)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_renders_the_shipped_configs_as_the_gateway_tests_do() -> None:
    """One substitution: the stack's nginx.conf and Caddyfile are tests/support/gateways.py's."""
    authz = yaml.safe_load((REPO_ROOT / "deploy/local/ext-authz.yaml").read_text())
    defaults = shipped_gateway_plan(authz, {})
    assert (defaults.envoy_port, defaults.authz_http_port, defaults.backend_port) == (8000, 9003, 8080)
    plan = StackPlan("127.0.0.1", 18000, 0, 19001, 18080, 18999, authz_http_port=19003, http_authz=True)
    for gateway, render in (("nginx", render_nginx), ("caddy", render_caddyfile)):
        source = REPO_ROOT / SHIPPED_CONFIGS[gateway]
        text = source.read_text()
        assert render_shipped_config(gateway, text, defaults, source) == text
        assert render_shipped_config(gateway, text, plan, source) == render(
            "127.0.0.1:19003", 18080, 18000, ()
        )
    envoy = yaml.safe_load(ENVOY_HTTP.read_text())
    http_plan = stack_plan(envoy, authz, {})
    assert (http_plan.http_authz, http_plan.authz_http_port, http_plan.authz_port) == (True, 9003, 9001)
    assert render_envoy_config(envoy, http_plan) == envoy  # defaults: the file as it is


def request(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def echoed_headers(body: str | bytes) -> dict[str, Any]:
    seen = json.loads(body)
    headers: dict[str, Any] = {name.lower(): value for name, value in seen["headers"].items()}
    return headers


def start_make_run(gateway: str, key_dir: Path) -> tuple[ManagedProcess, dict[str, str]]:
    (http_port,) = free_ports(1)
    env = {**stack_env(key_dir), "RUN_AUTHZ_HTTP_PORT": str(http_port)}
    argv = ["make", "--no-print-directory", "-o", STAMP, "run", f"GATEWAY={gateway}", f"PY={sys.executable}"]
    process = ManagedProcess(
        f"make run GATEWAY={gateway}", argv, env=env, cwd=REPO_ROOT, separate_stdout=True, keep_lines=2000
    )
    return process, env


@pytest.fixture(params=sorted(CHILD))
def gateway_stack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, ManagedProcess, int]]:
    gateway: str = request.param
    process, env = start_make_run(gateway, tmp_path / "keys")
    try:
        yield gateway, process, int(env["RUN_ENVOY_PORT"])
    finally:
        process.stop()


@pytest.mark.parametrize("gateway", sorted(CHILD))
def test_browser_sign_in_and_logout_through_the_gateway(gateway: str, tmp_path: Path) -> None:
    process, env = start_make_run(gateway, tmp_path / "keys")
    try:
        lines = process.wait_for_stdout(
            lambda seen: READY_MARKER in seen, timeout=STARTUP_TIMEOUT, what="ready"
        )
        assert set(started_pids(process)) == {"ext-authz", CHILD[gateway]}, process.tail()
        base = f"http://127.0.0.1:{env['RUN_ENVOY_PORT']}"
        assert any(line.startswith(f"Browser: open {base}/app/") for line in lines), lines
        stack = signin.Stack(process, base, f"http://127.0.0.1:{env['RUN_ISSUER_PORT']}")
        signin.test_sign_in_at_app_shows_the_identity_and_logout_ends_the_session(stack)
    finally:
        process.stop()


def test_make_run_with_a_gateway_behaves_as_printed_and_ctrl_c_stops_it_all(
    gateway_stack: tuple[str, ManagedProcess, int],
) -> None:
    gateway, stack, port = gateway_stack
    lines = stack.wait_for_stdout(lambda seen: READY_MARKER in seen, timeout=STARTUP_TIMEOUT, what="ready")
    expectations = printed_expectations(lines)
    pids = started_pids(stack)

    assert set(pids) == {"ext-authz", CHILD[gateway]}, stack.tail()
    assert sorted(e.status for e in expectations) == [200, 200, 401, 401, 403]
    assert any(line.startswith(f"Browser: open http://127.0.0.1:{port}/app/") for line in lines), lines
    for expectation in expectations:
        assert f"http://127.0.0.1:{port}/" in expectation.command  # the gateway's port
        status, body = run_curl_command(expectation.command)
        assert status == expectation.status, f"{gateway}: {expectation}\n{body}\n{stack.tail()}"
        if "x-user-id: alice" in expectation.what:
            # ext-authz's identity header reached the backend, through this gateway
            assert echoed_headers(body)["x-user-id"] == ["alice"], body

    # A forged identity on an anonymous route: allowed, and the backend never sees it.
    answer_status, answer = request(port, "/public/hello", {"X-User-Id": "mallory", "X-User-Scopes": "admin"})
    assert answer_status == 200, answer
    headers = echoed_headers(answer)
    assert "x-user-id" not in headers and "x-user-scopes" not in headers, (gateway, headers)
    # ...nor on a protected one, under alice's token: the backend sees ext-authz's value only.
    header = shlex.split(next(e.command for e in expectations if "x-user-id: alice" in e.what))[-1]
    authorization = header.removeprefix("Authorization:").strip()
    answer_status, answer = request(
        port, "/orders/1", {"Authorization": authorization, "X-User-Id": "mallory"}
    )
    assert (answer_status, echoed_headers(answer)["x-user-id"]) == (200, ["alice"]), answer

    os.killpg(stack.pid, signal.SIGINT)  # what a terminal's Ctrl-C does

    wait_until_gone(stack, pids)
