"""Lifecycle: start-up → serve → graceful shutdown on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator

import grpc

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.store import RETRY_AFTER_SECONDS, KeyStore
from ext_authz.pipeline import Pipeline
from ext_authz.settings import Settings
from ext_authz.transport.health import Health
from ext_authz.transport.servicer import AuthorizationServicer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0


class ServeError(Exception):
    """The server could not start (e.g. the address cannot be bound)."""


class Server:
    """One gRPC server with the Check and health services. ``start`` → ``stop``."""

    def __init__(
        self, settings: Settings, *, listen: str | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self._address = listen or settings.listen
        needs_fetch = any(p.static_keys is None for p in settings.providers)
        self._fetcher = HttpFetcher() if needs_fetch else None
        self.keys = KeyStore(settings.providers, self._fetcher, clock)
        self.pipeline = Pipeline(settings, self.keys, clock=clock)
        self.health = Health()
        # gRPC enables SO_REUSEPORT by default: a second server on a busy port would bind silently
        # and take half the connections. One process owns its port.
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_servicer = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
        add_servicer(AuthorizationServicer(self.pipeline), self._grpc)  # type: ignore[no-untyped-call]
        self.health.register(self._grpc)
        self._readiness: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Bind and start serving; returns the bound HOST:PORT. Raises ServeError."""
        try:
            port = self._grpc.add_insecure_port(self._address)
        except RuntimeError as exc:
            await self._close_fetcher()
            raise ServeError(f"cannot listen on {self._address}: {exc}") from None
        await self.health.set_serving(False)  # grpc's servicer starts as SERVING: not before keys are in
        await self._grpc.start()
        bound = f"{self._address.rpartition(':')[0]}:{port}"
        log.info("serving", extra={"fields": {"address": bound, "providers": len(self.settings.providers)}})
        self._readiness = asyncio.create_task(_become_ready(self.keys, self.health), name="readiness")
        return bound

    async def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        log.info("shutting down", extra={"fields": {"grace_seconds": grace_seconds}})
        if self._readiness is not None:
            self._readiness.cancel()
        await self.health.set_serving(False)
        await self._grpc.stop(grace_seconds)
        await self._close_fetcher()
        log.info("stopped")

    async def _close_fetcher(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()


async def serve(settings: Settings, *, listen: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    # Handlers go in before the "serving" line: a SIGTERM right after it must drain, not kill.
    with _signals_set(stop):
        server = Server(settings, listen=listen)
        await server.start()
        await stop.wait()
        await server.stop()


async def _become_ready(keys: KeyStore, health: Health) -> None:
    """SERVING once every provider has keys; until then keep fetching the missing ones."""
    await keys.prefetch()
    while not keys.ready():
        await asyncio.sleep(RETRY_AFTER_SECONDS)
        await keys.prefetch()
    await health.set_serving(True)
    log.info("ready")


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
