"""The fault schedule: key rotations, IdP outages (down, then slow), Redis restarts and a pause,
config reloads (two valid configs alternating, an invalid one now and then) and worker SIGKILLs,
overlapping. Each fault is a window [start, end] the checker and the plots read."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.soak.load import KeyBook
from tests.soak.stack import Stack
from tests.support.idp import DISCOVERY_PATH, JWKS_PATH
from tests.support.redis import inline_command


@dataclass(frozen=True, slots=True)
class Schedule:
    """Periods and durations in seconds (`first_*`: the first occurrence, from the run's start)."""

    rotation_period: float
    first_rotation: float
    idp_period: float
    first_idp: float
    idp_down: float
    idp_slow: float
    idp_slow_delay: float
    redis_restart_period: float
    first_redis_restart: float
    redis_pause_at: float
    redis_pause: float
    reload_period: float
    invalid_every: int  # every n-th reload writes the invalid config (the next one repairs it)
    kill_period: float
    first_kill: float

    @classmethod
    def long(cls) -> Schedule:
        """Issue 18, as written."""
        return cls(
            rotation_period=60, first_rotation=45, idp_period=300, first_idp=150, idp_down=20,
            idp_slow=20, idp_slow_delay=2, redis_restart_period=420, first_redis_restart=210,
            redis_pause_at=500, redis_pause=3, reload_period=30, invalid_every=4, kill_period=600,
            first_kill=330,
        )  # fmt: skip

    @classmethod
    def short(cls) -> Schedule:
        """The same faults compressed into about a minute, each at least once."""
        return cls(
            rotation_period=10, first_rotation=8, idp_period=1000, first_idp=20, idp_down=5,
            idp_slow=5, idp_slow_delay=2, redis_restart_period=1000, first_redis_restart=14,
            redis_pause_at=36, redis_pause=2, reload_period=5, invalid_every=3, kill_period=1000,
            first_kill=27,
        )  # fmt: skip


@dataclass
class Window:
    kind: str
    start: float
    end: float
    detail: str = ""


@dataclass
class Faults:
    stack: Stack
    keys: KeyBook
    schedule: Schedule
    clock: Callable[[], float]
    until: float  # no fault starts after this (the SIGTERM comes then)
    windows: list[Window] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reloads: dict[str, int] = field(default_factory=lambda: {"valid": 0, "invalid": 0})
    kills: list[tuple[float, int, float | None]] = field(default_factory=list)  # (at, pid, replaced after)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _every(self, first: float, period: float, action: Callable[[], None], name: str) -> None:
        def run() -> None:
            at = first
            while at < self.until:
                if self._stop.wait(max(0.0, at - self.clock())):
                    return
                try:
                    action()
                except Exception as exc:  # a fault that failed to happen is a harness error
                    self.errors.append(f"{name} at {self.clock():.1f}s: {type(exc).__name__}: {exc}")
                at += period

        self._threads.append(threading.Thread(target=run, name=f"soak-fault-{name}", daemon=True))

    def start(self) -> None:
        s = self.schedule
        for offset, provider in ((0.0, "rs"), (s.rotation_period / 2, "es")):
            self._every(
                s.first_rotation + offset,
                s.rotation_period,
                functools.partial(self.rotate, provider),
                f"rotate-{provider}",
            )
        self._every(s.first_idp, s.idp_period, self.idp_outage, "idp")
        self._every(s.first_redis_restart, s.redis_restart_period, self.redis_restart, "redis-restart")
        self._every(s.redis_pause_at, 10**9, self.redis_pause, "redis-pause")
        self._every(s.reload_period, s.reload_period, self.reload, "reload")
        self._every(s.first_kill, s.kill_period, self.kill_worker, "kill")
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for issuer in (self.stack.rs, self.stack.es):
            issuer.heal()
        self.stack.redis.resume()

    # ---- the faults --------------------------------------------------------------------------

    def rotate(self, provider: str) -> None:
        """A new key, signing from now on; the previous one removed a period later."""
        old = self.keys.issuers[provider].issuer.default_kid
        at = self.clock()
        kid = self.keys.rotate(provider)
        self.windows.append(Window("rotation", at, at, f"{provider}: {old} -> {kid}"))

        def remove() -> None:
            if not self._stop.wait(self.schedule.rotation_period):
                self.keys.remove(provider, old)
                now = self.clock()
                self.windows.append(Window("key removed", now, now, f"{provider}: {old}"))

        threading.Thread(target=remove, name=f"soak-remove-{old}", daemon=True).start()

    def idp_outage(self) -> None:
        """Both JWT IdPs down (503 on discovery and JWKS), then slow (every JWKS answer late)."""
        s = self.schedule
        issuers = (self.stack.rs, self.stack.es)
        start = self.clock()
        for issuer in issuers:
            issuer.fail_path(DISCOVERY_PATH, 503)
            issuer.fail_path(JWKS_PATH, 503)
        self._stop.wait(s.idp_down)
        for issuer in issuers:
            issuer.heal()
        middle = self.clock()
        self.windows.append(Window("idp down", start, middle))
        for issuer in issuers:
            issuer.delay_path(JWKS_PATH, s.idp_slow_delay)
        self._stop.wait(s.idp_slow)
        for issuer in issuers:
            issuer.heal()
        self.windows.append(Window("idp slow", middle, self.clock(), f"{s.idp_slow_delay:g}s per JWKS"))

    def redis_restart(self) -> None:
        start = self.clock()
        self.stack.redis.restart()
        self.windows.append(Window("redis restart", start, self.clock()))

    def redis_pause(self) -> None:
        start = self.clock()
        seconds = self.schedule.redis_pause
        reply = inline_command(self.stack.redis.port, f"DEBUG SLEEP {seconds:g}", timeout=seconds + 5)
        if reply != b"+OK\r\n":
            raise RuntimeError(f"DEBUG SLEEP answered {reply!r}")
        self.windows.append(Window("redis paused", start, self.clock(), f"DEBUG SLEEP {seconds:g}"))

    def reload(self) -> None:
        count = self.reloads["valid"] + self.reloads["invalid"] + 1
        at = self.clock()
        if count % self.schedule.invalid_every == 0:
            self.stack.write_config("invalid")
            self.reloads["invalid"] += 1
            self.windows.append(Window("reload (invalid)", at, at))
        else:
            variant = "a" if self.reloads["valid"] % 2 else "b"
            self.stack.write_config(variant)
            self.reloads["valid"] += 1
            self.windows.append(Window("reload", at, at, f"config {variant}"))

    def kill_worker(self) -> None:
        workers = self.stack.workers()
        if not workers:
            raise RuntimeError("no worker to kill")
        victim = workers[0]
        start = self.clock()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        replaced: float | None = None
        while time.monotonic() < deadline and not self._stop.is_set():
            now = self.stack.workers()
            if len(now) == 2 and victim not in now:
                replaced = self.clock() - start
                break
            time.sleep(0.05)
        self.kills.append((start, victim, replaced))
        self.windows.append(Window("worker SIGKILL", start, self.clock(), f"pid {victim}"))
