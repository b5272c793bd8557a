"""The admin HTTP listener: /healthz (alive), /readyz (config loaded and keys ready), /metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from ext_authz.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


class AdminServer:
    def __init__(self, address: str, *, ready: Callable[[], bool], metrics: Callable[[], bytes]) -> None:
        self._address = address
        self._ready = ready
        self._metrics = metrics
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_handler)
        self._runner = web.AppRunner(app, access_log=None)
        self.bound: str | None = None

    async def start(self) -> str:
        await self._runner.setup()
        host, _, port = self._address.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        addresses = self._runner.addresses
        bound_port = addresses[0][1] if addresses else int(port)
        self.bound = f"{host}:{bound_port}"
        log.info("admin listening", extra={"fields": {"address": self.bound}})
        return self.bound

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        return web.Response(body=self._metrics(), headers={"Content-Type": CONTENT_TYPE})
