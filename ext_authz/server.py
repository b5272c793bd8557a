"""Lifecycle: start-up → serve → graceful shutdown on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

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


async def serve(
    settings: Settings,
    *,
    listen: str | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve until ``stop`` is set (by default: until SIGTERM or SIGINT)."""
    address = listen or settings.listen
    needs_fetch = any(p.static_keys is None for p in settings.providers)
    fetcher = HttpFetcher() if needs_fetch else None
    keys = KeyStore(settings.providers, fetcher, clock)
    pipeline = Pipeline(settings, keys, clock=clock)
    health = Health()

    server = grpc.aio.server()
    add_servicer = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
    add_servicer(AuthorizationServicer(pipeline), server)  # type: ignore[no-untyped-call]
    health.register(server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        if fetcher:
            await fetcher.close()
        raise ServeError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    bound = f"{address.rpartition(':')[0]}:{port}"
    log.info("serving", extra={"fields": {"address": bound, "providers": len(settings.providers)}})

    if stop is None:
        stop = asyncio.Event()
    readiness = asyncio.create_task(_become_ready(keys, health), name="readiness")
    with _signals_set(stop):
        await stop.wait()

    log.info("shutting down", extra={"fields": {"grace_seconds": SHUTDOWN_GRACE_SECONDS}})
    readiness.cancel()
    await health.set_serving(False)
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    if fetcher:
        await fetcher.close()
    log.info("stopped")


async def _become_ready(keys: KeyStore, health: Health) -> None:
    """SERVING once every provider has keys; until then keep fetching the missing ones."""
    await keys.prefetch()
    while not keys.ready():
        await asyncio.sleep(RETRY_AFTER_SECONDS)
        await keys.prefetch()
    await health.set_serving(True)
    log.info("ready")


@contextlib.contextmanager
def _signals_set(stop: asyncio.Event):  # type: ignore[no-untyped-def]
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
