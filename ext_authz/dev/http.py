"""What the development servers share: listening sockets, aiohttp sites, stopping on signals."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket

from aiohttp import web

from ext_authz import signals
from ext_authz.dev.errors import DevIssuerError

DEFAULT_HOST = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as it goes into a URL: an unspecified bind address is reached on loopback."""
    bare = host.strip("[]")
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "[::1]"
    return f"[{bare}]" if address.version == 6 else bare


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, so the port (even port 0) is known before anything is served."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bare, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DevIssuerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bound_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


async def start_site(app: web.Application, sock: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def check_bind(host: str, allow_non_loopback: bool) -> None:
    if not is_loopback(host) and not allow_non_loopback:
        raise DevIssuerError(
            f"--host {host}: not a loopback address; this is a development tool, pass "
            "--allow-non-loopback to expose it anyway (e.g. inside a container network)"
        )


def stop_on_signals(stop: asyncio.Event) -> contextlib.AbstractContextManager[None]:
    return signals.handling({signal.SIGINT: stop.set, signal.SIGTERM: stop.set})
