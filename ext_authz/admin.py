"""The admin HTTP listener: /healthz (alive), /readyz (config loaded and keys ready), /metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ext_authz.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

BACKCHANNEL_LOGOUT_PATH = "/backchannel_logout"
PROVIDERS_PATH = "/debug/providers"
MAX_LOGOUT_BODY = 16 * 1024


class AdminServer:
    def __init__(
        self,
        address: str,
        *,
        ready: Callable[[], bool | Awaitable[bool]],
        metrics: Callable[[], bytes | Awaitable[bytes]],
        address_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        backchannel_logout: Callable[[str], Awaitable[tuple[int, str]]] | None = None,
        providers: Callable[[], Awaitable[object] | object] | None = None,
    ) -> None:
        self._address_file = address_file
        self._ssl_context = ssl_context
        self._address = address
        self._ready = ready
        self._metrics = metrics
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        self._backchannel_logout = backchannel_logout
        self._providers = providers
        app.router.add_get(PROVIDERS_PATH, self._providers_handler)
        app.router.add_post(BACKCHANNEL_LOGOUT_PATH, self._backchannel)
        self._runner = web.AppRunner(app, access_log=None)
        self.bound: str | None = None

    async def start(self) -> str:
        await self._runner.setup()
        host, _, port = self._address.rpartition(":")
        site = web.TCPSite(
            self._runner, host.strip("[]"), int(port), reuse_address=True, ssl_context=self._ssl_context
        )
        await site.start()
        addresses = self._runner.addresses
        bound_port = addresses[0][1] if addresses else int(port)
        self.bound = f"{host}:{bound_port}"
        if self._address_file is not None:
            # A supervisor reads the bound address from here (the port may have been 0).
            await asyncio.to_thread(_write_atomically, Path(self._address_file), self.bound + "\n")
        fields = {"address": self.bound, "tls": self._ssl_context is not None}
        log.info("admin listening", extra={"fields": fields})
        return self.bound

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ready = self._ready()
        if inspect.isawaitable(ready):
            ready = await ready
        if ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _backchannel(self, request: web.Request) -> web.Response:
        """OIDC Back-Channel Logout for IdPs that reach ext-authz directly (README: Browser sign-in)."""
        headers = {"Cache-Control": "no-store"}
        if self._backchannel_logout is None:
            return web.json_response({"error": "not_found"}, status=404, headers=headers)
        if request.content_length is not None and request.content_length > MAX_LOGOUT_BODY:
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        try:
            body = await request.content.read(MAX_LOGOUT_BODY + 1)
        except (OSError, ValueError):
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        if len(body) > MAX_LOGOUT_BODY:
            return web.json_response({"error": "invalid_request"}, status=400, headers=headers)
        status, answer = await self._backchannel_logout(body.decode("utf-8", "replace"))
        return web.Response(status=status, text=answer, content_type="application/json", headers=headers)

    async def _providers_handler(self, _: web.Request) -> web.Response:
        """Each provider's keys (ids and algorithms only), last fetch, age, staleness, readiness."""
        if self._providers is None:
            return web.json_response({"error": "not_found"}, status=404)
        status = self._providers()
        if inspect.isawaitable(status):
            status = await status
        return web.json_response(status, headers={"Cache-Control": "no-store"})

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        body = self._metrics()
        if inspect.isawaitable(body):
            body = await body
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
