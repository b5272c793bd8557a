"""Lifecycle: start-up → serve (reloading the config on SIGHUP or when its file changes, see
reload.py) → graceful shutdown on SIGTERM or SIGINT.

Shutdown: health (gRPC and /readyz) turns NOT_SERVING at once; Checks are still answered for
``shutdown.drain_seconds`` so that Envoy and Kubernetes stop sending; then the server stops
accepting and waits for Checks in flight up to ``shutdown.grace_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ext_authz import linewriter, signals
from ext_authz.admin import AdminServer
from ext_authz.compiled import compile
from ext_authz.config.credentials import check_workers
from ext_authz.config.model import Settings
from ext_authz.decisionlog import DecisionLog
from ext_authz.dpop import NonceIssuer, RedisReplayCache, ReplayCache
from ext_authz.handoff import RequestThreads
from ext_authz.introspection import HttpIntrospector
from ext_authz.keys.cache import SharedKeyCache
from ext_authz.keys.fetch import HttpFetcher
from ext_authz.keys.store import KeyStore
from ext_authz.metrics import Metrics, TlsCollector
from ext_authz.model import Decision, Request
from ext_authz.pipeline import Pipeline
from ext_authz.reload import Current, Reloader, Runtime
from ext_authz.serveoptions import DEFAULT_THREADS, ServeOptions
from ext_authz.sessions.client import HttpLoginClient
from ext_authz.sessions.oidc import LoginUnavailable
from ext_authz.sessions.session import SessionEvents

if TYPE_CHECKING:  # loaded only with store: redis (see _session_store)
    from ext_authz.sessions.redisstore import RedisSessionStore
from ext_authz.tls import ServerTls
from ext_authz.tlsfiles import TlsFileError
from ext_authz.tokencache import CacheCounters
from ext_authz.tracing import Tracing
from ext_authz.transport.health import Health
from ext_authz.transport.http import HttpAuthorizer, HttpListener
from ext_authz.transport.servicer import AuthorizationServicer, register

log = logging.getLogger(__name__)

DPOP_NONCE_SECONDS = 300.0  # a server nonce is accepted this long, and up to as long again
SESSION_COUNT_SECONDS = 15.0  # how often the active-sessions gauge asks the Redis store


# How long stop() waits for request threads once grpc has stopped (Checks waiting for keys).
THREADS_JOIN_SECONDS = 10.0


class ServeError(Exception):
    """The server could not start (e.g. the address cannot be bound)."""


class Server:
    """One gRPC server with the Check and health services, and the optional admin listener."""

    def __init__(
        self,
        settings: Settings,
        *,
        listen: str | None = None,
        clock: Callable[[], float] = time.time,
        config_path: str | Path | None = None,
        drain_seconds: float | None = None,
        tracer_provider: object = None,
        reuse_port: bool = False,
        admin_listen: str | None = None,
        listen_http: str | None = None,
        admin_address_file: str | None = None,
        admin_plaintext: bool = False,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        self._clock = clock
        self._address = listen or settings.listen
        self._drain_override = drain_seconds
        self._fetcher = HttpFetcher()
        self._login = HttpLoginClient(self._fetcher)
        self._session_stores: dict[str, RedisSessionStore] = {}  # by URL: kept across reloads
        self._session_events = SessionEvents()
        self._cache = SharedKeyCache(settings.jwks_cache)
        self._token_counters = CacheCounters()
        self._introspector = HttpIntrospector(self._fetcher, clock=clock)
        # DPoP: proofs seen, shared by the replicas through the key cache's Redis; server nonces
        # that every worker and replica with the same jwks_cache secret accepts (else this
        # process's own). Both outlive reloads.
        self._replays = ReplayCache()
        redis = self._cache.redis_client()
        self._shared_replays = (
            RedisReplayCache(redis, timeout_seconds=settings.jwks_cache.timeout_seconds)
            if redis is not None
            else None
        )
        nonce_secret = (
            hmac.new(settings.jwks_cache.secret, b"ext-authz dpop nonce", hashlib.sha256).digest()
            if settings.jwks_cache.secret
            else secrets.token_bytes(32)
        )
        self._dpop_nonces = NonceIssuer(nonce_secret, DPOP_NONCE_SECONDS, clock)
        self.current = Current(self._build(settings, None))
        self.metrics = Metrics(
            lambda: self.keys.stats(),
            clock,
            token_cache=self._token_cache_state,
            session_events=self._session_events,
        )
        self._reloader = Reloader(
            Path(config_path) if config_path is not None else None,
            self.current,
            build=self._build,
            metrics=self.metrics,
            reloaded=self._reloaded,
            # A supervisor's worker (reuse_port) shares nothing with the others but Redis.
            check=(lambda s: check_workers(s, 2)) if reuse_port else (lambda _: None),
        )
        self.health = Health()
        tracing = (
            Tracing(settings.tracing.service_name, tracer_provider) if settings.tracing.enabled else None
        )
        self.servicer = AuthorizationServicer(self.current.get, observer=self._observe, tracing=tracing)
        # gRPC enables SO_REUSEPORT by default: a second server on a busy port would bind silently
        # and take half the connections. One process owns its port, unless it is one of a
        # supervisor's workers (serve --workers), which share it on purpose.
        # Checks are decided in grpc's request threads; their rare I/O waits go to the loop that
        # start() runs on (handoff.py). grpc's sync server calls only the executor's submit().
        self._threads = RequestThreads(threads)
        reuse = [("grpc.so_reuseport", 1 if reuse_port else 0)]
        self._grpc = grpc.server(self._threads, options=reuse)  # type: ignore[arg-type]
        register(self._grpc, self.servicer)
        self.health.register(self._grpc)
        # The files were checked at config load; this reads them again (they may have been renewed).
        try:
            self.tls = ServerTls(settings.tls) if settings.tls is not None else None
        except TlsFileError as exc:
            raise ServeError(f"tls.{exc.field}: {exc.message}") from None
        if self.tls is not None:
            self.metrics.registry.register(TlsCollector(self.tls.state))
        admin_address = self._admin_address = admin_listen or settings.admin
        # A supervisor's workers serve their admin listener to the supervisor alone, on loopback.
        admin_context = None
        if self.tls is not None and self.tls.settings.admin and admin_address and not admin_plaintext:
            try:
                admin_context = self.tls.admin_context()
            except (OSError, ssl.SSLError) as exc:
                raise ServeError(f"tls: the admin listener cannot load the certificate: {exc}") from None
        self.admin = (
            AdminServer(
                admin_address,
                ready=self.ready,
                metrics=self.metrics.exposition,
                backchannel_logout=self._backchannel_logout,
                providers=self.provider_status,
                address_file=admin_address_file,
                ssl_context=admin_context,
            )
            if admin_address
            else None
        )
        # The HTTP authorization listener (listen_http), beside the gRPC one, same TLS settings.
        http_address = self._http_address = listen_http or settings.listen_http
        self.http: HttpListener | None = None
        if http_address is not None:
            http_context = None
            if self.tls is not None:
                try:
                    http_context = self.tls.http_context()
                except (OSError, ssl.SSLError) as exc:
                    raise ServeError(f"tls: the HTTP listener cannot load the certificate: {exc}") from None
            self.http = HttpListener(
                http_address, HttpAuthorizer(self.servicer), ssl_context=http_context, reuse_port=reuse_port
            )
        self._serving: bool | None = None
        self._draining = False
        self._background: set[asyncio.Task[object]] = set()
        self._warming: asyncio.Task[None] | None = None

    @property
    def runtime(self) -> Runtime:
        return self.current.get()

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def keys(self) -> KeyStore:
        return self.runtime.keys

    @property
    def pipeline(self) -> Pipeline:
        return self.runtime.pipeline

    def _build(self, new: Settings, reuse: KeyStore | None) -> Runtime:
        """One config's runtime; ``reuse``: the store in force, whose unchanged providers' keys
        are handed over (a reload)."""
        keys = KeyStore(
            new.providers,
            fetcher=self._fetcher,
            cache=self._cache,
            readiness=new.readiness,
            clock=self._clock,
            on_change=self._keys_changed,
            reuse=reuse,
        )
        pipeline = Pipeline(
            compile(new, self._clock),
            keys,
            clock=self._clock,
            cache_counters=self._token_counters,
            login_client=self._login,
            session_store=self._session_store(new),
            session_events=self._session_events,
            introspector=self._introspector,
            replays=self._replays,
            shared_replays=self._shared_replays,
            dpop_nonces=self._dpop_nonces,
        )
        return Runtime(new, keys, pipeline, DecisionLog(new.log))

    def _session_store(self, settings: Settings) -> RedisSessionStore | None:
        sessions = settings.sessions
        if sessions is None or sessions.store != "redis" or sessions.redis_url is None:
            return None
        store = self._session_stores.get(sessions.redis_url)
        if store is None:
            # Imported here: the Redis client is loaded only when a config uses it (-10 MiB).
            from ext_authz.sessions.redisstore import RedisSessionStore

            store = self._session_stores[sessions.redis_url] = RedisSessionStore(sessions.redis_url)
        return store

    async def _count_sessions(self) -> None:
        """The active-sessions gauge of the Redis store in force, every SESSION_COUNT_SECONDS."""
        while True:
            store = self._session_store(self.settings)
            if store is None:
                self._session_events.active = None
            else:
                with contextlib.suppress(LoginUnavailable):
                    self._session_events.active = await store.count()
            await asyncio.sleep(SESSION_COUNT_SECONDS)

    def provider_status(self) -> dict[str, object]:
        """`GET /debug/providers`: the config in force's providers and readiness."""
        providers = self.keys.status()
        known = {p.name: p for p in self.settings.providers}
        for entry in providers:
            provider = known.get(str(entry["name"]))
            if provider is not None and provider.login is not None:
                entry["login_endpoints"] = self._login.endpoints_now(provider.name) is not None
        return {"ready": self.ready(), "readiness": self.settings.readiness, "providers": providers}

    async def _backchannel_logout(self, body: str) -> tuple[int, str]:
        """The admin listener's back-channel logout: the config in force answers it."""
        browsers = self.pipeline.browsers
        if browsers is None or browsers.settings.backchannel_logout_path is None:
            return 404, '{"error": "not_found"}'
        return await browsers.backchannel_logout(body)

    def _token_cache_state(self) -> tuple[int, int, int]:
        """Hits, misses and current size of the verified-token cache."""
        cache = self.runtime.pipeline.verifier.cache
        return self._token_counters.hits, self._token_counters.misses, len(cache) if cache else 0

    # ---- lifecycle ----

    async def start(self) -> str:
        """Bind and start serving; returns the bound HOST:PORT. Raises ServeError."""
        try:
            if self.tls is not None:
                port = self._grpc.add_secure_port(self._address, self.tls.grpc_credentials())
            else:
                port = self._grpc.add_insecure_port(self._address)
        except RuntimeError as exc:
            await self._close()
            raise ServeError(f"cannot listen on {self._address}: {exc}") from None
        self.health.set_serving(False)  # grpc's servicer starts as SERVING: not before keys are in
        self.health.set_alive()
        self.servicer.serve_from(asyncio.get_running_loop(), self._threads)
        self._grpc.start()
        if self.admin is not None:
            await self._start_listener(self.admin.start(), self._admin_address, "admin")
        if self.http is not None:
            await self._start_listener(self.http.start(), self._http_address, "listen_http")
        bound = f"{self._address.rpartition(':')[0]}:{port}"
        tls = "off" if self.tls is None else "mutual" if self.tls.mutual else "on"
        fields = {"address": bound, "providers": len(self.settings.providers), "tls": tls}
        log.info("serving", extra={"fields": fields})
        if self.tls is not None:
            self._spawn(self.tls.watch(), "tls-watch")
        self.keys.start()
        self._warm_logins()
        if self.settings.sessions is not None:
            self._spawn(self._count_sessions(), "session-count")
        self._keys_changed()  # providers with inline keys may be ready already
        if self._reloader.path is not None:
            self._spawn(self._reloader.watch(), "config-watch")
        return bound

    async def _start_listener(self, start: Coroutine[Any, Any, str], address: str | None, what: str) -> None:
        """Start one of the listeners beside gRPC; if it cannot bind, stop what is running."""
        try:
            await start
        except OSError as exc:
            await self._stop_grpc(0)
            await self._close()
            raise ServeError(f"cannot listen on {address} ({what}): {exc.strerror}") from None

    def ready(self) -> bool:
        return not self._draining and self.keys.ready() and self._login.ready(self.settings.providers)

    def _keys_changed(self) -> None:
        """Keys arrived, failed or went stale: bring gRPC health in line with the readiness policy."""
        ready = self.ready()
        if ready == self._serving:
            return
        self._serving = ready
        log.info("ready" if ready else "not ready", extra={"fields": {"readiness": self.settings.readiness}})
        self.health.set_serving(ready)

    def _warm_logins(self) -> None:
        """Fetch the login endpoints of the providers that sign browsers in (readiness waits);
        a reload's fetch replaces the one before it, which may still be retrying an outage."""
        if self._warming is not None:
            self._warming.cancel()
            self._warming = None
        if any(p.login is not None for p in self.settings.providers):
            warm = self._login.warm(self.settings.providers, self._keys_changed)
            self._warming = asyncio.get_running_loop().create_task(warm, name="login-endpoints")
            self._background.add(self._warming)
            self._warming.add_done_callback(self._background.discard)

    def _reloaded(self) -> None:
        self._warm_logins()
        self._keys_changed()

    def _spawn(self, coroutine: object, name: str) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coroutine, name=name)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self, drain_seconds: float | None = None, grace_seconds: float | None = None) -> None:
        """Drain, then stop accepting and wait for Checks in flight; see the module docstring."""
        shutdown = self.settings.shutdown
        if drain_seconds is None:
            drain_seconds = (
                self._drain_override if self._drain_override is not None else shutdown.drain_seconds
            )
        if grace_seconds is None:
            grace_seconds = shutdown.grace_seconds
        log.info(
            "draining", extra={"fields": {"drain_seconds": drain_seconds, "grace_seconds": grace_seconds}}
        )
        self._draining = True
        self._serving = False
        self.health.set_serving(False)
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
        if self.http is not None:
            await self.http.stop(grace_seconds)
        await self._stop_grpc(grace_seconds)
        # grpc has cancelled what was still in flight: Checks still waiting on the loop (for a key
        # fetch) stop waiting and end (as 500s nobody receives), their decision lines queued
        # before the flush below.
        self._threads.close()
        self._threads.cancel_waits()
        if not await asyncio.to_thread(self._threads.join, THREADS_JOIN_SECONDS):
            log.warning(
                "request threads still busy at exit", extra={"fields": {"threads": self._threads.alive}}
            )
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.keys.stop()
        await self._close()
        # Every Check has answered: its decision line is queued; it reaches stdout before exit.
        await asyncio.to_thread(linewriter.flush_stdout)
        log.info("stopped")

    async def _stop_grpc(self, grace_seconds: float) -> None:
        # The loop keeps running meanwhile: Checks in flight may be waiting on it for keys.
        stopped = self._grpc.stop(grace_seconds)
        await asyncio.to_thread(stopped.wait)

    async def _close(self) -> None:
        self._threads.close()
        if self.admin is not None:
            await self.admin.stop()
        await self._fetcher.close()
        for store in self._session_stores.values():
            await store.close()
        await self._cache.close()

    def _observe(self, request: Request, request_id: str, decision: Decision, seconds: float) -> None:
        # Metrics only: the decision line is the Check's own runtime's (Runtime.record), same config.
        self.metrics.record(decision, seconds)

    async def reload(self, reason: str = "signal") -> bool:
        """Load the config file again and switch to it if valid. True when the new config is in force."""
        return await self._reloader.reload(reason)


async def serve(loaded: Settings, options: ServeOptions) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the config."""
    stop = asyncio.Event()
    hangup = asyncio.Event()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: hangup.set}
    # Handlers go in before the "serving" line: a SIGTERM right after it must drain, not kill.
    with signals.handling(handlers):
        server = Server(
            loaded,
            listen=options.listen,
            config_path=options.config,
            drain_seconds=options.drain_seconds,
            reuse_port=options.reuse_port,
            admin_listen=options.admin_listen,
            listen_http=options.listen_http,
            admin_address_file=options.admin_address_file,
            admin_plaintext=options.admin_plaintext,
            threads=options.threads,
        )
        await server.start()
        while not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hangup.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if hangup.is_set() and not stop.is_set():
                hangup.clear()
                await server.reload("SIGHUP")
        await server.stop()
