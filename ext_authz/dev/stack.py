"""`make run`: the issuer and the echo backend in this process, ext-authz and the gateway (Envoy
over gRPC or HTTP, nginx or Caddy: `make run GATEWAY=...`) as children.

Prints curl commands with fresh tokens once everything answers, and stops it all on
SIGINT/SIGTERM/SIGHUP or when a child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import grpc
import yaml
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz import signals
from ext_authz.dev.echo import echo_app
from ext_authz.dev.errors import DevIssuerError
from ext_authz.dev.http import listen_socket, start_site, url_host
from ext_authz.dev.issuer import LoginConfig, issuer_app
from ext_authz.dev.keys import DEFAULT_ALG, DEFAULT_AUDIENCE, DEFAULT_KEY_DIR, IssuerSettings, KeyDir
from ext_authz.dev.login import LoginSettings
from ext_authz.dev.plan import (
    DEFAULT_GATEWAY,
    ENV_PREFIX,
    SHIPPED_CONFIGS,
    SIGNED_OUT_PATH,
    StackPlan,
    envoy_binary,
    gateway_binary,
    load_yaml,
    render_authz_config,
    render_envoy_config,
    render_shipped_config,
    shipped_gateway_plan,
    stack_plan,
)
from ext_authz.dev.tokens import mint

READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
READY_MARKER = "# Ctrl-C stops everything."
# Of the dev issuer's access and ID tokens: short, so that a browser session's refresh can be watched.
DEV_TOKEN_LIFETIME = 120
SESSION_SECRET_FILE = "session-keys"  # noqa: S105 -- a file name; beside the rendered config, in the run's own directory
WATCH_INTERVAL = 0.5


def curl_command(url: str, token: str | None = None) -> str:
    argv = ["curl", "-i", url]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    return shlex.join(argv)


class Child:
    """A child process whose output is copied, line by line and prefixed with its name, to `out`."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, copier: asyncio.Task[None]) -> None:
        self.name = name
        self.process = process
        self._copier = copier

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], out: TextIO, env: Mapping[str, str] | None = None
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert process.stdout is not None
        copier = asyncio.create_task(_copy_lines(name, process.stdout, out))
        print(f"[run] started {name} pid={process.pid}", file=out, flush=True)
        return cls(name, process, copier)

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds; returns the exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(self._copier, 2.0)
        return self.process.returncode if self.process.returncode is not None else -1


async def _copy_lines(name: str, stream: asyncio.StreamReader, out: TextIO) -> None:
    while line := await stream.readline():
        print(f"[{name}] {line.decode('utf-8', 'replace').rstrip()}", file=out, flush=True)


async def _first_of(
    stop: asyncio.Event, children: Sequence[Child], work: Awaitable[None] | None = None
) -> Child | None:
    """Wait until `work` completes (None), a stop is requested (None) or a child exits (it)."""
    waits: dict[asyncio.Task[Any], Child | None] = {asyncio.create_task(stop.wait()): None}
    for child in children:
        waits[asyncio.create_task(child.process.wait())] = child
    work_task = asyncio.ensure_future(work) if work is not None else None
    if work_task is not None:
        waits[work_task] = None
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    if work_task is not None and work_task in done:
        work_task.result()  # re-raise a readiness failure
    exited = [waits[task] for task in done if waits[task] is not None]
    return exited[0] if exited and not stop.is_set() else None


async def _wait_ready(plan: StackPlan, gateway: Gateway, deadline: float) -> None:
    """ext-authz SERVING (keys fetched), Envoy LIVE, and one anonymous request through the gateway
    (through ext-authz's HTTP listener too, when the gateway asks over HTTP)."""
    waiting_for = "ext-authz gRPC health SERVING (it has fetched the issuer's keys)"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plan.authz_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                await _pause(deadline)
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if gateway.envoy:
                waiting_for = "Envoy's admin /ready to answer LIVE"
                while not await _get_ok(session, f"http://127.0.0.1:{plan.admin_port}/ready", b"LIVE"):
                    await _pause(deadline)
            waiting_for = f"an anonymous request through {gateway.title} (GET /public/) to answer 200"
            base = f"http://{url_host(plan.listener_host)}:{plan.envoy_port}"
            while not await _get_ok(session, f"{base}/public/"):
                await _pause(deadline)
    except TimeoutError:
        raise DevIssuerError(f"not ready within {READY_TIMEOUT:g}s: waited for {waiting_for}") from None


async def _get_ok(session: aiohttp.ClientSession, url: str, body: bytes | None = None) -> bool:
    try:
        async with session.get(url) as response:
            text = await response.read()
            return response.status == 200 and (body is None or text.strip() == body)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _pause(deadline: float) -> None:
    if time.monotonic() >= deadline:
        raise TimeoutError
    await asyncio.sleep(0.1)


@dataclass(frozen=True, slots=True)
class StackOptions:
    envoy_config: Path  # the Envoy gateways' config (unused by nginx and caddy)
    authz_config: Path
    key_dir: Path
    gateway: str = DEFAULT_GATEWAY  # plan.GATEWAYS


@dataclass(frozen=True, slots=True)
class Gateway:
    """The gateway as it runs: its child's name, how it is called in the printed text, its config
    file (rendered for the plan, or the source itself), its command line and its environment."""

    name: str
    title: str
    config: Path
    argv: list[str]
    env: dict[str, str]

    @property
    def envoy(self) -> bool:
        return self.name == "envoy"


def _prepare_gateway(options: StackOptions, plan: StackPlan, workdir: Path) -> Gateway:
    """Render the gateway's config into `workdir` (Envoy's only if the plan moved a port) and
    return how to start it."""
    if options.gateway in SHIPPED_CONFIGS:
        source = SHIPPED_CONFIGS[options.gateway]
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise DevIssuerError(f"{source}: {exc}") from None
        rendered = render_shipped_config(options.gateway, text, plan, source)
        own = workdir / options.gateway
        own.mkdir()
        config = own / source.name
        config.write_text(rendered, encoding="utf-8")
        if options.gateway == "nginx":
            # nginx's workers (`nobody` when it runs as root) keep their temporary files in their
            # prefix: they must be able to get there. The directory lists nothing to them.
            workdir.chmod(0o711)
            argv = [gateway_binary("nginx"), "-p", str(own), "-c", str(config), "-e", "stderr"]
            return Gateway("nginx", "nginx", config, [*argv, "-g", "daemon off;"], {})
        # Caddy's state (autosave, storage) in its directory, never the user's home.
        env = {"HOME": str(own), "XDG_CONFIG_HOME": str(own / "config"), "XDG_DATA_HOME": str(own / "data")}
        argv = [gateway_binary("caddy"), "run", "--config", str(config), "--adapter", "caddyfile"]
        return Gateway("caddy", "Caddy", config, argv, env)
    envoy_config = load_yaml(options.envoy_config)
    config = options.envoy_config
    rendered_envoy = render_envoy_config(envoy_config, plan)
    if rendered_envoy != envoy_config:
        config = workdir / "envoy.yaml"
        config.write_text(yaml.safe_dump(rendered_envoy, sort_keys=False), encoding="utf-8")
    argv = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "-l", "warning"]
    return Gateway("envoy", "Envoy", config, argv, {})


def _commands(plan: StackPlan, key_dir: KeyDir) -> list[str]:
    base = f"http://{url_host(plan.listener_host)}:{plan.envoy_port}"
    reader = mint(key_dir, subject="alice", scope="read")
    expired = mint(key_dir, subject="alice", scope="read", ttl=-300)
    return [
        "# expect 200: an anonymous route (rule `public`): no token needed",
        curl_command(f"{base}/public/hello"),
        "",
        "# expect 200: alice's token (scope read) passes; the echo shows x-user-id: alice, set by ext-authz",
        curl_command(f"{base}/orders/42", reader),
        "",
        '# expect 403: the same token lacks scope "admin" (WWW-Authenticate: error="insufficient_scope")',
        curl_command(f"{base}/admin/users", reader),
        "",
        '# expect 401: a token that expired 5 minutes ago (error="invalid_token", "the token has expired")',
        curl_command(f"{base}/orders/42", expired),
        "",
        '# expect 401: no token on a route that needs one (WWW-Authenticate: Bearer realm="ext-authz")',
        curl_command(f"{base}/orders/42"),
    ]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_stack(options: StackOptions, env: Mapping[str, str], out: TextIO, log: TextIO) -> int:
    """Run the stack until SIGINT/SIGTERM (exit 0) or until a part of it fails (exit 1)."""
    stop = asyncio.Event()
    on_signals = contextlib.ExitStack()  # closed last: the previous handlers come back
    on_signals.enter_context(signals.handling(dict.fromkeys(STOP_SIGNALS, stop.set)))
    authz_config = load_yaml(options.authz_config)
    if options.gateway in SHIPPED_CONFIGS:
        plan = shipped_gateway_plan(authz_config, env)
    else:
        plan = stack_plan(load_yaml(options.envoy_config), authz_config, env)
    key_dir = KeyDir(options.key_dir)
    key_dir.ensure_key(DEFAULT_ALG)
    issuer_url = f"http://127.0.0.1:{plan.issuer_port}"
    key_dir.write_settings(IssuerSettings(issuer_url, key_dir.saved_audience() or DEFAULT_AUDIENCE))
    runners: list[web.AppRunner] = []
    children: list[Child] = []
    watcher: asyncio.Task[None] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="ext-authz-run-"))
    try:
        issuer_sock = _stack_socket(plan.issuer_port, "ISSUER_PORT")
        login = LoginConfig(
            LoginSettings(token_lifetime=DEV_TOKEN_LIFETIME),
            key_dir.saved_audience() or DEFAULT_AUDIENCE,
            err=log,
        )
        runners.append(await start_site(issuer_app(key_dir, issuer_url, login), issuer_sock))
        backend_sock = _stack_socket(plan.backend_port, "BACKEND_PORT")
        runners.append(
            await start_site(
                echo_app(lambda line: print(f"[backend] {line}", file=log, flush=True)), backend_sock
            )
        )
        print(f"[run] dev issuer {issuer_url} (DEVELOPMENT ONLY; keys in {key_dir.path})", file=log)
        print(f"[run] echo backend http://127.0.0.1:{plan.backend_port}", file=log, flush=True)

        # A fresh session secret every run, readable by this user only; it goes with the directory.
        secret = workdir / SESSION_SECRET_FILE
        secret.touch(mode=0o600)
        secret.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
        authz_file = workdir / "ext-authz.yaml"
        _write_authz_config(authz_file, authz_config, issuer_url)
        watcher = asyncio.create_task(_rerender_on_change(options.authz_config, authz_file, issuer_url, log))
        gateway = _prepare_gateway(options, plan, workdir)

        authz_argv = [sys.executable, "-m", "ext_authz", "serve", "--config", str(authz_file)]
        authz_argv += ["--listen", f"127.0.0.1:{plan.authz_port}", "--drain-seconds", "0"]
        if plan.http_authz:
            authz_argv += ["--listen-http", f"127.0.0.1:{plan.authz_http_port}"]
        children.append(await Child.start("ext-authz", authz_argv, log))
        children.append(await Child.start(gateway.name, gateway.argv, log, gateway.env))

        deadline = time.monotonic() + READY_TIMEOUT
        failed = await _first_of(stop, children, _wait_ready(plan, gateway, deadline))
        if failed is None and not stop.is_set():
            print(_ready_text(plan, options, key_dir, authz_file, gateway), file=out, flush=True)
            failed = await _first_of(stop, children)
        if failed is not None:
            # A terminal's Ctrl-C reaches the children too; give our own signal a moment to land.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if not stop.is_set():
                print(
                    f"[run] {failed.name} exited with status {failed.process.returncode}; stopping", file=log
                )
                return 1
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for child in reversed(children):  # the gateway first: stop taking requests, then its authorizer
            await child.stop()
        for runner in reversed(runners):
            await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        on_signals.close()
        print("[run] stopped", file=log, flush=True)


def _write_authz_config(target: Path, config: Mapping[str, Any], issuer_url: str) -> None:
    """The config with the browser route (plan.render_authz_config), replaced whole: ext-authz
    never reads half a file."""
    rendered = render_authz_config(config, issuer_url, SESSION_SECRET_FILE)
    partial = target.with_name(target.name + ".new")
    partial.write_text(yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
    os.replace(partial, target)


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def _rerender_on_change(source: Path, target: Path, issuer_url: str, log: TextIO) -> None:
    """Keep `target` rendered from `source` as it is edited; ext-authz reloads `target` on change."""
    seen = _file_digest(source)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        digest = _file_digest(source)
        if digest is None or digest == seen:
            continue
        seen = digest
        try:
            _write_authz_config(target, load_yaml(source), issuer_url)
        except DevIssuerError as exc:
            print(f"[run] {exc}: the config in force stays", file=log, flush=True)
        else:
            print(f"[run] {source} changed: rendered {target} again", file=log, flush=True)


def _stack_socket(port: int, variable: str) -> socket.socket:
    try:
        return listen_socket("127.0.0.1", port)
    except DevIssuerError as exc:
        raise DevIssuerError(f"{exc} (choose another port with {ENV_PREFIX}{variable}=...)") from None


def _ready_text(
    plan: StackPlan, options: StackOptions, key_dir: KeyDir, authz_file: Path, gateway: Gateway
) -> str:
    key_dir_flag = "" if key_dir.path == DEFAULT_KEY_DIR else f" --key-dir {shlex.quote(str(key_dir.path))}"
    admin = f" (admin 127.0.0.1:{plan.admin_port})" if gateway.envoy else ""
    listeners = f"127.0.0.1:{plan.authz_port}"
    if plan.http_authz:
        listeners += f" (gRPC), 127.0.0.1:{plan.authz_http_port} (HTTP, asked by {gateway.title})"
    header = [
        "",
        "ext-authz local stack is up (DEVELOPMENT ONLY: the issuer mints any token asked of it).",
        f"  {gateway.title:<10}  http://{url_host(plan.listener_host)}:{plan.envoy_port}"
        f"   config {gateway.config}{admin}",
        f"  ext-authz   {listeners}   config {authz_file}"
        f" (from {options.authz_config}: edit that one, it reloads on save)",
        f"  dev issuer  http://127.0.0.1:{plan.issuer_port}   keys {key_dir.path}",
        f"  backend     http://127.0.0.1:{plan.backend_port}   echoes what reached it",
        f"More tokens: .venv/bin/ext-authz dev-issuer mint{key_dir_flag} --sub bob --scope 'read admin'",
        "",
    ]
    base = f"http://{url_host(plan.listener_host)}:{plan.envoy_port}"
    browser = [
        f"Browser: open {base}/app/ (a `login:` rule): sign in on the dev issuer's page, see your identity",
        f"  headers; tokens live {DEV_TOKEN_LIFETIME // 60} min, so wait 2 min for a refresh;"
        f" log out at {base}/oauth2/logout (back at {SIGNED_OUT_PATH})",
    ]
    if url_host(plan.listener_host) not in ("127.0.0.1", "localhost", "[::1]"):
        browser.append("  (the session cookie is Secure: over plain http browsers keep it for loopback only)")
    return "\n".join([*header, *_commands(plan, key_dir), "", *browser, "", READY_MARKER])
