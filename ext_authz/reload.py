"""Config reload: the runtime in force, the file watch, and the reload procedure.

A reload validates the new file; keys of new or changed providers are fetched first (bounded by
their fetch timeout); then the new runtime replaces the old one in one step (keys of unchanged
providers are handed over). An invalid file leaves the old config in force. Each Check reads the
runtime once (see transport/servicer.py), so it is decided and recorded under one config.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ext_authz import logs
from ext_authz.config.model import Settings
from ext_authz.config.parse import load
from ext_authz.config.values import ConfigError
from ext_authz.decisionlog import DecisionLog
from ext_authz.keys.store import KeyStore
from ext_authz.metrics import Metrics
from ext_authz.model import Decision, Request
from ext_authz.pipeline import Pipeline

# The reload lines keep the logger name they have always had: operators filter on it.
log = logging.getLogger("ext_authz.server")

WATCH_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything built from one config; replaced as a whole on reload."""

    settings: Settings
    keys: KeyStore
    pipeline: Pipeline
    decisions: DecisionLog

    def record(self, request: Request, request_id: str, decision: Decision, seconds: float) -> None:
        """One Check's decision line, under this config's log settings."""
        self.decisions.record(request, request_id, decision, round(seconds * 1e6))


class Current:
    """The one holder of the runtime in force: the servicer, the metrics and the server read it;
    only :class:`Reloader` replaces it."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def get(self) -> Runtime:
        return self._runtime

    def replace(self, runtime: Runtime) -> Runtime:
        """Put ``runtime`` in force; returns the one it replaces."""
        old, self._runtime = self._runtime, runtime
        return old


Build = Callable[[Settings, KeyStore], Runtime]


class Reloader:
    """Reloads ``path`` on request (SIGHUP, tests) and when its contents change; one at a time."""

    def __init__(
        self,
        path: Path | None,
        current: Current,
        *,
        build: Build,
        metrics: Metrics,
        reloaded: Callable[[], None],
        check: Callable[[Settings], None] = lambda _: None,
    ) -> None:
        """``check``: what this process needs of a config beyond its validity (raises ConfigError)."""
        self.path = path
        self._current = current
        self._build = build
        self._check = check
        self._metrics = metrics
        self._reloaded = reloaded
        self._digest = digest(path)
        self._lock = asyncio.Lock()

    async def reload(self, reason: str) -> bool:
        """Load the config file again and switch to it if valid. True when the new config is in force."""
        if self.path is None:
            return False
        async with self._lock:
            self._digest = digest(self.path)
            try:
                new = load(self.path)
                self._check(new)
            except ConfigError as exc:
                self._metrics.reloads.labels("invalid").inc()
                log.error(
                    "config reload rejected: the old config stays in force",
                    extra={"fields": {"reason": reason, "file": str(self.path), "error": str(exc)}},
                )
                return False
            old = self._current.get()
            _warn_restart_needed(old.settings, new)
            runtime = self._build(new, old.keys)
            try:
                runtime.keys.start()  # only new or changed providers fetch
                await runtime.keys.first_fetches()
            except BaseException:
                # Abandoned (the server stops meanwhile): the old store keeps what it handed over;
                # the loops only the new store started stop with it.
                await runtime.keys.stop(keep=old.keys)
                raise
            self._current.replace(runtime)
            await old.keys.stop(keep=runtime.keys)  # all but the providers the new store took over
            logs.set_level(new.log.level)
            self._metrics.reloads.labels("ok").inc()
            log.info("config reloaded", extra={"fields": {"reason": reason, "providers": len(new.providers)}})
            self._reloaded()
            return True

    async def watch(self) -> None:
        """Notice a changed file (an edit, or Kubernetes' symlink swap of a ConfigMap) within seconds."""
        assert self.path is not None
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            changed = await asyncio.to_thread(digest, self.path)
            if changed is not None and changed != self._digest:
                await self.reload("file changed")


def _warn_restart_needed(old: Settings, new: Settings) -> None:
    for key, old_value, new_value in (
        ("listen", old.listen, new.listen),
        ("admin", old.admin, new.admin),
        ("jwks_cache", old.jwks_cache, new.jwks_cache),
        # Renewed file contents need no restart (see tls.py); other files or options do.
        ("tls", old.tls, new.tls),
    ):
        if old_value != new_value:
            log.warning("a changed setting needs a restart", extra={"fields": {"key": key}})


def digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
