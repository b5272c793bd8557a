"""Fetches from the IdP, single-flight, and what they prove about the ``kid``s they lacked.

A token whose ``kid`` is not in the cached set may be signed by a key the IdP published a moment
ago, after the set in use was fetched, or by no key at all. The two cannot be told apart without
asking the IdP, so:

- A ``(kid, alg)`` is *unknown* (401) only when an IdP fetch that **started after it was first
  seen** completed without it. A fetch that was already under way, a set adopted from the shared
  cache (fetched by another process at some earlier moment) and the set in use prove nothing.
- Until then its tokens wait for such a fetch within their deadline, or get 503 with
  ``Retry-After``: a 503 for a junk token is not a wrong decision; a 401 for a valid one is.
- Fetches are single-flight (one at a time, every waiter shares it) and, when started for unknown
  kids, rate-limited to one per ``refetch_min_interval_seconds``. A fetch the limit holds back is
  not dropped: it runs as soon as the limit allows. A flood of random kids therefore costs the IdP
  at most one fetch per interval, and every such token gets 401 or 503.
- A key the IdP removed is unknown from the first fetch without it (it was seen before that fetch).
- A verdict "unknown" stands for one interval after the fetch that made it; after that, the
  ``kid`` counts as seen anew. A ``kid`` someone sent before the IdP published it (a predictable
  name, say) therefore costs its real tokens at most that long, never until the next refresh.

Memory is bounded: at most ``MAX_TRACKED`` pending and as many unknown entries, and only short
``kid``s are remembered at all; a request whose ``kid`` is not remembered keeps its own first
sighting and is answered by the same rule.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from ext_authz.keys.jwks import KeySet

log = logging.getLogger(__name__)

MAX_TRACKED = 10_000
MAX_TRACKED_KID_CHARS = 256

KidAlg = tuple[str, str]
Verdict = Literal["fetched", "unknown", "pending", "failed"]


@dataclass(frozen=True, slots=True)
class Wait:
    """What waiting for a ``kid`` came to, and (unless fetched/unknown) when to retry."""

    verdict: Verdict
    retry_after_seconds: int = 1


class IdpFetches:
    """One provider's IdP fetches: single-flight, rate-limited for unknown kids, and their verdicts.

    ``fetch`` fetches from the IdP and installs what it got, returning the new set (None when the
    fetch failed). "Started after first seen" is decided by counting fetch starts, not by clock
    readings, so a wall clock stepped back cannot make every fetch look too early. ``clock`` (the
    wall clock the policy is measured on, injectable in tests) only times the rate limit and how
    long a verdict stands.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[KeySet | None]],
        *,
        clock: Callable[[], float],
        min_interval_seconds: float,
        on_kid_fetch: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._min_interval = min_interval_seconds
        self._on_kid_fetch = on_kid_fetch  # "fetched" when one starts, "suppressed" when held back
        self._task: asyncio.Task[KeySet | None] | None = None
        self._starts = 0  # fetches started (running) so far; fetch n is the n-th
        self._task_number = 0  # the fetch under way
        self._last_number = 0  # the last completed fetch ...
        self._last_ok = False  # ... and whether it succeeded
        self._last_ok_number = 0  # the last successful fetch
        self._last_kid_fetch = -math.inf  # when (clock) the last fetch for unknown kids started
        self._wanted_after: int | None = None  # a kid waits for a fetch numbered above this
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()  # set (and replaced) whenever a fetch starts or ends
        self._first_seen: dict[KidAlg, int] = {}  # -> fetches started before it was first seen
        self._unknown: dict[KidAlg, float] = {}  # -> when (clock) a fetch found it missing
        self._previous: KeySet | None = None  # what the last successful fetch brought

    # ---- fetching ----

    def run(self) -> asyncio.Future[KeySet | None]:
        """The fetch under way, else a new one (a routine refresh: no rate limit)."""
        task = self._task if self._task is not None else self._start()
        # shield: a waiter that gives up must not cancel the fetch others are waiting on.
        return asyncio.shield(task)

    def _start(self) -> asyncio.Task[KeySet | None]:
        # Numbered now, counted as started when it runs: a kid first seen in between is answered.
        number = self._starts + 1
        task = asyncio.create_task(self._run(number), name="keys-idp-fetch")
        task.add_done_callback(self._done)
        self._task, self._task_number = task, number
        if self._wanted_after is not None and self._wanted_after < number:
            self._wanted_after = None  # this fetch answers everyone waiting so far
        self._notify()
        return task

    async def _run(self, number: int) -> KeySet | None:
        self._starts = number
        keys: KeySet | None = None
        try:
            keys = await self._fetch()
            return keys
        except Exception:  # a bug: the fetch failed, as far as anyone waiting is concerned
            log.exception("key fetch crashed")
            return None
        finally:
            self._task = None
            self._last_number, self._last_ok = number, keys is not None
            if keys is not None:
                self._last_ok_number = number
                self._settle(keys, number)
            self._notify()
            if self._wanted_after is not None:
                self._schedule()

    def _done(self, task: asyncio.Task[KeySet | None]) -> None:
        # Only a task cancelled before it ran gets here still current (_run clears it otherwise).
        if self._task is task:
            self._task = None
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _schedule(self) -> float:
        """Start the wanted fetch now if the limit allows, else arrange it; return when (clock)."""
        now = self._clock()
        at = max(now, self._last_kid_fetch + self._min_interval)
        if self._task is not None:
            return at  # started (or arranged) when the one under way ends
        if at <= now:
            self._last_kid_fetch = now
            self._on_kid_fetch("fetched")
            self._start()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(at - now, self._fire)
        return at

    def _fire(self) -> None:
        self._timer = None
        if self._wanted_after is not None:
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wanted_after = None
        if self._task is not None:
            self._task.cancel()

    # ---- verdicts ----

    def _settle(self, keys: KeySet, number: int) -> None:
        """Fetch ``number`` succeeded: decide every kid first seen before it started, and every
        key the previous fetch had (seen before this one started, so removed: unknown)."""
        now = self._clock()
        unknown = {k: t for k, t in self._unknown.items() if now - t < self._min_interval}
        previous, self._previous = self._previous, keys
        for key in previous.keys if previous is not None else ():
            for alg in key.algorithms:
                if key.kid is not None and not keys.candidates(key.kid, alg) and len(unknown) < MAX_TRACKED:
                    unknown[(key.kid, alg)] = now
        for entry, seen in list(self._first_seen.items()):
            if seen < number:
                del self._first_seen[entry]
                if not keys.candidates(*entry) and len(unknown) < MAX_TRACKED:
                    unknown[entry] = now
        self._unknown = {k: t for k, t in unknown.items() if not keys.candidates(*k)}

    async def wait_for(self, kid: str, alg: str, budget_seconds: float) -> Wait:
        """Wait (at most ``budget_seconds``) until an IdP fetch that started after this ``kid``
        was first seen has completed; the caller then looks the key up again.

        "fetched": such a fetch succeeded (a key still missing now is unknown: 401).
        "unknown": a fetch found it missing less than an interval ago (401 without waiting).
        "failed": such a fetch failed. "pending": none completed in time.
        """
        entry = (kid, alg)
        judged = self._unknown.get(entry)
        if judged is not None:
            if self._clock() - judged < self._min_interval:
                return Wait("unknown")
            del self._unknown[entry]  # stale: seen anew
        seen = self._first_seen.get(entry)
        if seen is None:
            seen = self._starts
            if len(kid) <= MAX_TRACKED_KID_CHARS and len(self._first_seen) < MAX_TRACKED:
                self._first_seen[entry] = seen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_seconds
        held_back = False
        while True:
            if self._last_ok_number > seen:
                return Wait("fetched")
            task = self._task
            if task is not None and self._task_number > seen:
                try:
                    async with asyncio.timeout_at(deadline):
                        await asyncio.shield(task)
                except TimeoutError:
                    return Wait("pending", self._retry_after(self._clock()))
                except asyncio.CancelledError:
                    if task.cancelled() and not _current_task_cancelling():
                        return Wait("failed", self._retry_after(self._clock()))
                    raise
                continue
            if self._last_number > seen and not self._last_ok:
                # A fetch after this kid was seen failed: retry once the limit allows another.
                retry_at = self._last_kid_fetch + self._min_interval
                if self._clock() < retry_at:
                    return Wait("failed", self._retry_after(retry_at))
            if self._wanted_after is None or self._wanted_after < seen:
                self._wanted_after = seen
            starts_at = self._schedule()
            if self._task is not None and self._task_number > seen:
                continue
            if starts_at > self._clock() and not held_back:
                held_back = True
                self._on_kid_fetch("suppressed")
            # Held back by the rate limit, or behind a fetch that started too early: wait for the
            # next start or end, unless the next start is beyond this request's deadline.
            if starts_at - self._clock() >= deadline - loop.time():
                return Wait("pending", self._retry_after(starts_at))
            changed = self._changed
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                return Wait("pending", self._retry_after(starts_at))

    def _retry_after(self, at: float) -> int:
        """Whole seconds until ``at`` (clock) plus a little for the fetch itself; at least 1."""
        return max(1, math.ceil(at - self._clock() + 0.5))


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
