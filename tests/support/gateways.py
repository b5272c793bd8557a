"""Run the shipped nginx and Caddy configs (deploy/nginx, deploy/caddy) for a test.

One source of truth: the config a test runs is the shipped file itself, with only its documented
addresses replaced (ext-authz's HTTP listener 127.0.0.1:9003, the backend 127.0.0.1:8080, the
gateway's 127.0.0.1:8000) by ephemeral ones. Each replaced text must occur exactly once, and
every identity header a test relies on must be cleared by the shipped file, or the render fails:
a test can never pass against a config that differs from what is shipped.

Each gateway runs the real binary in a temporary directory (nginx's prefix; Caddy's HOME and
XDG dirs), is ready when its port accepts connections, and is stopped (SIGTERM, then SIGKILL to
its process group) and its directory removed on ``stop()`` / leaving the ``with`` block.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.deploy import DEPLOY
from tests.support.lifecycle import StopOnExit
from tests.support.processes import ExtAuthzProcess, ManagedProcess, ProcessError

NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
TRAEFIK_STATIC = DEPLOY / "traefik" / "traefik.yml"
TRAEFIK_DYNAMIC = DEPLOY / "traefik" / "dynamic.yml"

# The addresses the shipped files document.
SHIPPED_AUTHZ = "127.0.0.1:9003"
SHIPPED_BACKEND = "127.0.0.1:8080"
SHIPPED_LISTEN = "127.0.0.1:8000"

READY_TIMEOUT = 10.0
STOP_GRACE = 5.0
REQUEST_TIMEOUT = 10.0


class RenderError(AssertionError):
    """The shipped file no longer has what the test renders it from."""


def replace_once(text: str, old: str, new: str, *, source: Path) -> str:
    count = text.count(old)
    if count != 1:
        raise RenderError(f"{source}: expected {old!r} exactly once, found it {count} times")
    return text.replace(old, new)


def free_port() -> int:
    """A port nothing listens on now (the gateway binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_cleared(
    text: str, source: Path, patterns: Sequence[str], identity_headers: Sequence[str]
) -> None:
    """Every identity header appears in each of ``patterns`` ({name} is the header, any case)."""
    for header in identity_headers:
        for pattern in patterns:
            regex = pattern.format(name=re.escape(header))
            if not re.search(regex, text, re.IGNORECASE | re.MULTILINE):
                raise RenderError(
                    f"{source}: identity header {header} is not handled (no match for {regex!r})"
                )


# nginx: the auth_request_set of the header and the proxy_set_header that replaces the client's.
NGINX_CLEARS = (
    r"^\s*auth_request_set\s+\$\w+\s+\$upstream_http_{snake};",
    r"^\s*proxy_set_header\s+{name}\s+\$\w+;",
)
# Caddy: deleted before forward_auth, copied from its answer, and the 2.6 placeholder deleted.
CADDY_CLEARS = (
    r"^\s*request_header\s+-{name}\s*$",
    r"^\s*copy_headers\s.*\b{name}\b",
    r"^\s*@\w+\s+header_regexp\s+{name}\s+\^\\\{{http\\\.reverse_proxy\\\.\s*$",
)


def render_nginx(
    authz_http: str, backend_port: int, listen_port: int, identity_headers: Sequence[str]
) -> str:
    text = NGINX_CONF.read_text()
    for header in identity_headers:
        snake = header.lower().replace("-", "_")
        require_cleared(
            text, NGINX_CONF, [p.replace("{snake}", re.escape(snake)) for p in NGINX_CLEARS], [header]
        )
    text = replace_once(text, f"server {SHIPPED_AUTHZ};", f"server {authz_http};", source=NGINX_CONF)
    text = replace_once(
        text, f"server {SHIPPED_BACKEND};", f"server 127.0.0.1:{backend_port};", source=NGINX_CONF
    )
    return replace_once(
        text, f"listen {SHIPPED_LISTEN};", f"listen 127.0.0.1:{listen_port};", source=NGINX_CONF
    )


def render_caddyfile(
    authz_http: str, backend_port: int, listen_port: int, identity_headers: Sequence[str]
) -> str:
    text = CADDYFILE.read_text()
    require_cleared(text, CADDYFILE, CADDY_CLEARS, identity_headers)
    listen_port_text = SHIPPED_LISTEN.rsplit(":", 1)[1]
    text = replace_once(
        text, f"forward_auth {SHIPPED_AUTHZ} {{", f"forward_auth {authz_http} {{", source=CADDYFILE
    )
    text = replace_once(
        text,
        f"reverse_proxy {SHIPPED_BACKEND}\n",
        f"reverse_proxy 127.0.0.1:{backend_port}\n",
        source=CADDYFILE,
    )
    return replace_once(text, f"http://:{listen_port_text} {{", f"http://:{listen_port} {{", source=CADDYFILE)


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        lines = [
            f"HTTP {self.status}",
            *(f"{k}: {v}" for k, v in self.headers),
            self.body[:2000].decode("latin-1"),
        ]
        return "\n".join(lines)


class GatewayProcess(StopOnExit):
    """A running gateway: ``base_url``, ``request()``, ``stop()``."""

    def __init__(self, name: str, process: ManagedProcess, workdir: Path, port: int) -> None:
        self.name = name
        self.process = process
        self.workdir = workdir
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def request(self, path: str, headers: Sequence[tuple[str, str]] = (), *, method: str = "GET") -> Response:
        """One request on a fresh connection; never follows redirects, never raises on a status."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            connection.putrequest(method, path)
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders()
            answer = connection.getresponse()
            return Response(answer.status, tuple(answer.getheaders()), answer.read())
        finally:
            connection.close()

    def stop(self) -> int:
        try:
            return self.process.stop(grace=STOP_GRACE)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_until_accepting(process: ManagedProcess, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        process.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ProcessError(
                    process.describe_failure(f"not listening on {port} within {timeout:g}s")
                ) from None
            time.sleep(0.05)


def _start(
    name: str, argv: Sequence[str], workdir: Path, port: int, env: dict[str, str] | None
) -> GatewayProcess:
    process = ManagedProcess(name, argv, env=env, cwd=workdir)
    try:
        _wait_until_accepting(process, port, READY_TIMEOUT)
    except BaseException:
        process.stop(grace=STOP_GRACE)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return GatewayProcess(name, process, workdir, port)


def start_nginx(authz_http: str, backend_port: int, *, identity_headers: Sequence[str]) -> GatewayProcess:
    """The shipped nginx.conf on an ephemeral port, ``authz_http`` its ext-authz (HOST:PORT)."""
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-nginx-"))
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(render_nginx(authz_http, backend_port, port, identity_headers))
    argv = ["nginx", "-p", str(workdir), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
    return _start("nginx", argv, workdir, port, None)


def caddy_env(workdir: Path) -> dict[str, str]:
    """Caddy's state (autosave, storage) in ``workdir``, never the user's home."""
    return {
        "HOME": str(workdir),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "XDG_DATA_HOME": str(workdir / "data"),
    }


def start_caddy(
    authz_http: str,
    backend_port: int,
    *,
    identity_headers: Sequence[str],
    edit: Callable[[str], str] | None = None,
) -> GatewayProcess:
    """The shipped Caddyfile on an ephemeral port (admin off, as shipped).

    ``edit`` changes the rendered text (only to show what a line of the shipped file is for).
    """
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-caddy-"))
    port = free_port()
    config = workdir / "Caddyfile"
    text = render_caddyfile(authz_http, backend_port, port, identity_headers)
    config.write_text(edit(text) if edit is not None else text)
    argv = ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"]
    return _start("caddy", argv, workdir, port, caddy_env(workdir))


GATEWAY_AUDIENCE = "gateways"
GATEWAY_IDENTITY = ("x-user-id", "x-user-email", "x-user-groups", "x-jwt-payload")


def gateway_authz_config(issuer: str, *, admin_rule: bool = True) -> dict[str, Any]:
    """The ext-authz config the gateway tests put behind every proxy: both listeners, the identity
    headers the shipped proxy configs carry, an anonymous route, a scoped one and a token one."""
    rules: list[dict[str, Any]] = [
        {"name": "public", "match": {"paths": ["/public/*"]}, "allow": "anonymous"}
    ]
    if admin_rule:
        rules.append({"name": "admin", "match": {"paths": ["/admin/*"]}, "require": {"scopes": ["admin"]}})
    rules.append({"name": "orders", "match": {"paths": ["/orders", "/orders/*"]}, "require": {}})
    return {
        "listen": "127.0.0.1:0",
        "listen_http": "127.0.0.1:0",
        "providers": [
            {
                "name": "test",
                "issuer": issuer,
                "audiences": [GATEWAY_AUDIENCE],
                "claim_to_headers": [
                    {"header": "x-user-id", "claim": "sub"},
                    {"header": "x-user-email", "claim": "email"},
                    {"header": "x-user-groups", "claim": "groups"},
                ],
                "payload_header": "x-jwt-payload",
            }
        ],
        "rules": rules,
    }


def http_listener_address(authz: ExtAuthzProcess) -> str:
    """The bound address of an ext-authz process's HTTP listener."""
    return authz.logged_address("http listening")
