"""``serve --workers N``: a supervisor process and N worker processes sharing one port.

Workers are fresh interpreters (``python -m ext_authz serve ... --reuse-port``), so no gRPC object,
thread or event loop is ever inherited across a fork: the supervisor itself runs an event loop for
the admin listener and restarts workers at any time. Each worker binds the same port with
SO_REUSEPORT and the kernel spreads connections over them; Envoy must open several connections for
that to spread load (see envoy.yaml's ext_authz cluster).

The supervisor forwards SIGTERM/SIGINT (drain, then stop) and SIGHUP (reload) to every worker,
restarts a worker that dies (giving up when they keep dying), and serves the admin listener for the
whole fleet: /readyz is ready when every worker is, /metrics adds up the workers' metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ext_authz import signals
from ext_authz.admin import AdminServer
from ext_authz.config.model import Settings
from ext_authz.serveoptions import ServeOptions
from ext_authz.tls import ServerTls
from ext_authz.tlsfiles import TlsFileError

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 30.0
# Gauges whose sum over workers means nothing: the fleet value is the largest.
_MAX_ACROSS_WORKERS = {
    "ext_authz_key_age_seconds",
    "ext_authz_build_info",
    "ext_authz_tls_certificate_expiry_timestamp_seconds",  # one file: the same in every worker
    "ext_authz_key_max_stale_seconds",  # one config: the same in every worker
}
# Gauges where the fleet is only as good as its worst worker.
_MIN_ACROSS_WORKERS = {"ext_authz_provider_ready"}


def reserve_port(address: str) -> tuple[str, socket.socket | None]:
    """Resolve port 0 to a concrete port every worker can share; keep it reserved meanwhile."""
    host, _, port = address.rpartition(":")
    if port != "0":
        return address, None
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), 0))  # bound, never listening: it takes no connections
    return f"{host}:{sock.getsockname()[1]}", sock


class Worker:
    def __init__(self, index: int, argv: Sequence[str], admin_file: Path | None) -> None:
        self.index = index
        self.argv = list(argv)
        self.admin_file = admin_file
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        if self.admin_file is not None:
            self.admin_file.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(*self.argv)
        log.info("worker started", extra={"fields": {"worker": self.index, "pid": self.process.pid}})

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def admin_address(self) -> str | None:
        if self.admin_file is None:
            return None
        try:
            return self.admin_file.read_text().strip() or None
        except OSError:
            return None


class Supervisor:
    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.settings = settings
        self.options = options
        self._listen = options.listen or settings.listen
        self._workers: list[Worker] = []
        self._stopping = False
        self.worker_restarts = 0  # for ext_authz_worker_restarts_total
        self._rundir = Path(tempfile.mkdtemp(prefix="ext-authz-"))
        self._session: aiohttp.ClientSession | None = None

    def worker_options(self, index: int, address: str) -> ServeOptions:
        """The supervisor's own options, for one worker on the shared port."""
        # Loopback, read by this supervisor only: plaintext even with tls.admin (the fleet's admin
        # listener below is the one that serves TLS). Each worker's gRPC listener serves TLS from
        # the same config file.
        admin = self.settings.admin is not None
        return dataclasses.replace(
            self.options,
            listen=address,
            workers=1,
            reuse_port=True,
            admin_listen="127.0.0.1:0" if admin else None,
            admin_address_file=str(self._admin_file(index)) if admin else None,
            admin_plaintext=admin,
        )

    def worker_argv(self, index: int, address: str) -> list[str]:
        return [sys.executable, "-m", "ext_authz", "serve", *self.worker_options(index, address).to_argv()]

    def _admin_file(self, index: int) -> Path:
        return self._rundir / f"worker-{index}.admin"

    async def run(self) -> int:
        tls = self.settings.tls
        try:
            admin_tls = ServerTls(tls) if tls is not None and tls.admin and self.settings.admin else None
            admin_context = admin_tls.admin_context() if admin_tls is not None else None
        except (TlsFileError, OSError, ssl.SSLError) as exc:
            log.error("cannot serve the admin listener over TLS", extra={"fields": {"error": str(exc)}})
            return 1
        address, reservation = reserve_port(self._listen)
        stop = asyncio.Event()
        hangup: signals.Handler = functools.partial(self._forward, signal.SIGHUP)
        handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: hangup}
        admin = None
        watcher: asyncio.Future[None] | None = None
        with signals.handling(handlers):
            try:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
                for index in range(self.options.workers):
                    admin_file = self._admin_file(index) if self.settings.admin else None
                    worker = Worker(index, self.worker_argv(index, address), admin_file)
                    await worker.start()
                    self._workers.append(worker)
                if self.settings.admin is not None:
                    admin = AdminServer(
                        self.settings.admin,
                        ready=self._ready,
                        metrics=self._metrics,
                        ssl_context=admin_context,
                        providers=self._providers,
                    )
                    await admin.start()
                    if admin_tls is not None:
                        watcher = asyncio.ensure_future(admin_tls.watch())
                count = self.options.workers
                fields = {"address": address, "workers": count, "admin": admin.bound if admin else None}
                log.info("supervising", extra={"fields": fields})
                code = await self._supervise(stop)
            finally:
                if watcher is not None:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                if admin is not None:
                    await admin.stop()
                if self._session is not None:
                    await self._session.close()
                if reservation is not None:
                    reservation.close()
                shutil.rmtree(self._rundir, ignore_errors=True)
        return code

    def _forward(self, sig: int) -> None:
        for worker in self._workers:
            worker.signal(sig)

    async def _supervise(self, stop: asyncio.Event) -> int:
        restarts: list[float] = []
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            waits = {
                asyncio.ensure_future(w.process.wait()): w for w in self._workers if w.process is not None
            }
            done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
            for pending in waits:
                pending.cancel()
            if stopper in done:
                return await self._stop_all()
            for finished in done:
                worker = waits[finished]
                code = worker.process.returncode if worker.process else None
                log.error(
                    "worker exited; restarting it", extra={"fields": {"worker": worker.index, "code": code}}
                )
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_SECONDS] + [now]
                if len(restarts) > MAX_RESTARTS:
                    log.error("workers keep dying; stopping", extra={"fields": {"restarts": len(restarts)}})
                    await self._stop_all()
                    return 1
                self.worker_restarts += 1
                await worker.start()

    async def _stop_all(self) -> int:
        self._stopping = True
        self._forward(signal.SIGTERM)
        shutdown = self.settings.shutdown
        drain = shutdown.drain_seconds if self.options.drain_seconds is None else self.options.drain_seconds
        bound = drain + shutdown.grace_seconds + 5
        procs = [w.process for w in self._workers if w.process is not None]
        try:
            async with asyncio.timeout(bound):
                codes = await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            log.error("workers did not stop in time; killing them")
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
            return 1
        log.info("stopped", extra={"fields": {"workers": len(procs)}})
        return 0 if all(code == 0 for code in codes) else 1

    # ---- the fleet's admin endpoints ----

    async def _fetch(self, address: str, path: str) -> tuple[int, str]:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{address}{path}") as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""

    async def _ready(self) -> bool:
        if self._stopping:
            return False
        addresses = [w.admin_address() for w in self._workers]
        if any(a is None for a in addresses):
            return False
        statuses = await asyncio.gather(*(self._fetch(a, "/readyz") for a in addresses if a))
        return all(status == 200 for status, _ in statuses)

    async def _providers(self) -> object:
        """Each worker's provider status (they fetch keys on their own)."""
        addresses = [a for a in (w.admin_address() for w in self._workers) if a]
        answers = await asyncio.gather(*(self._fetch(a, "/debug/providers") for a in addresses))
        workers = []
        for index, (status, text) in enumerate(answers):
            try:
                workers.append(
                    {"worker": index, **json.loads(text)}
                    if status == 200
                    else {"worker": index, "ready": False}
                )
            except ValueError:
                workers.append({"worker": index, "ready": False})
        ready = bool(workers) and all(w.get("ready") for w in workers) and len(workers) == len(self._workers)
        return {"ready": ready, "workers": workers}

    async def _metrics(self) -> bytes:
        addresses = [a for a in (w.admin_address() for w in self._workers) if a]
        texts = await asyncio.gather(*(self._fetch(a, "/metrics") for a in addresses))
        return aggregate(
            [text for status, text in texts if status == 200],
            workers=len(self._workers),
            restarts=self.worker_restarts,
        )


def aggregate(texts: Sequence[str], *, workers: int, restarts: int = 0) -> bytes:
    """The workers' Prometheus texts as one: samples with equal names and labels add up."""
    kinds: dict[str, tuple[str, str]] = {}
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            kinds.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    order.setdefault(family.name, []).append(key)
                    values[key] = sample.value
                elif family.name in _MAX_ACROSS_WORKERS:
                    values[key] = max(values[key], sample.value)
                elif family.name in _MIN_ACROSS_WORKERS:
                    values[key] = min(values[key], sample.value)
                else:
                    values[key] += sample.value
    lines = [
        "# HELP ext_authz_workers Worker processes",
        "# TYPE ext_authz_workers gauge",
        f"ext_authz_workers {workers}",
        "# HELP ext_authz_worker_restarts_total Workers that exited and were started again",
        "# TYPE ext_authz_worker_restarts_total counter",
        f"ext_authz_worker_restarts_total {restarts}",
    ]
    for name, (kind, doc) in kinds.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for sample_name, labels in order.get(name, []):
            rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{rendered}}} {values[(sample_name, labels)]!r}"
                if labels
                else f"{sample_name} {values[(sample_name, labels)]!r}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
