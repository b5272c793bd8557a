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
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.store import KeyStore
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
        self._cache = SharedKeyCache(settings.jwks_cache) if needs_fetch else None
        self.keys = KeyStore(
            settings.providers,
            fetcher=self._fetcher,
            cache=self._cache,
            readiness=settings.readiness,
            clock=clock,
            on_change=self._keys_changed,
        )
        self.pipeline = Pipeline(settings, self.keys, clock=clock)
        self.health = Health()
        # gRPC enables SO_REUSEPORT by default: a second server on a busy port would bind silently
        # and take half the connections. One process owns its port.
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_servicer = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
        add_servicer(AuthorizationServicer(self.pipeline), self._grpc)  # type: ignore[no-untyped-call]
        self.health.register(self._grpc)
        self._serving: bool | None = None
        self._health_updates: set[asyncio.Task[None]] = set()

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
        self.keys.start()
        self._keys_changed()  # providers with inline keys may be ready already
        return bound

    def _keys_changed(self) -> None:
        """Keys arrived, failed or went stale: bring gRPC health in line with the readiness policy."""
        ready = self.keys.ready()
        if ready == self._serving:
            return
        self._serving = ready
        log.info("ready" if ready else "not ready", extra={"fields": {"readiness": self.settings.readiness}})
        task = asyncio.get_running_loop().create_task(self.health.set_serving(ready))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        log.info("shutting down", extra={"fields": {"grace_seconds": grace_seconds}})
        self._serving = False
        await self.health.set_serving(False)
        await self._grpc.stop(grace_seconds)
        await self.keys.stop()
        await self._close_fetcher()
        log.info("stopped")

    async def _close_fetcher(self) -> None:
        if self._fetcher is not None:
            await self._fetcher.close()
        if self._cache is not None:
            await self._cache.close()


async def serve(settings: Settings, *, listen: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    # Handlers go in before the "serving" line: a SIGTERM right after it must drain, not kill.
    with _signals_set(stop):
        server = Server(settings, listen=listen)
        await server.start()
        await stop.wait()
        await server.stop()


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
