"""The echo backend: an HTTP server that answers every request with what reached it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from aiohttp import web

from ext_authz.dev.http import (
    DEFAULT_HOST,
    bound_port,
    check_bind,
    listen_socket,
    start_site,
    stop_on_signals,
    url_host,
)

DEFAULT_ECHO_PORT = 8080


def echo_app(log: Callable[[str], None] | None = None) -> web.Application:
    """Answers every request with 200 and JSON: method, path (with query) and each header line."""

    async def echo(request: web.Request) -> web.Response:
        headers: dict[str, list[str]] = {}
        for raw_name, raw_value in request.raw_headers:
            name = raw_name.decode("latin-1").lower()
            headers.setdefault(name, []).append(raw_value.decode("latin-1"))
        await request.read()
        if log is not None:
            user = ",".join(headers.get("x-user-id", [])) or "-"
            log(f"{request.method} {request.raw_path} x-user-id={user}")
        seen = {"method": request.method, "path": request.raw_path, "headers": headers}
        return web.json_response(seen)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve_echo(
    *, host: str = DEFAULT_HOST, port: int = DEFAULT_ECHO_PORT, allow_non_loopback: bool = False
) -> None:
    check_bind(host, allow_non_loopback)
    sock = listen_socket(host, port)

    def log(line: str) -> None:
        print(f"echo: {line}", file=sys.stderr, flush=True)

    runner = await start_site(echo_app(log), sock)
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop):
            print(f"echo: serving http://{url_host(host)}:{bound_port(sock)}", file=sys.stderr, flush=True)
            await stop.wait()
    finally:
        await runner.cleanup()
