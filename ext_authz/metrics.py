"""Prometheus metrics. Label values are bounded: decisions, status codes, reason codes, and the
provider and rule names of the config; never a subject, a path or a token."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ext_authz import __version__, linewriter
from ext_authz.keys.provider import KeyStats
from ext_authz.model import Allow, Decision
from ext_authz.sessions.session import SessionEvents

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class KeyCollector(Collector):
    """Key fetch counters and key ages, read from the key store at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, KeyStats]], clock: Callable[[], float]) -> None:
        self._stats = stats
        self._clock = clock

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        fetches = CounterMetricFamily(
            "ext_authz_key_fetches",
            "Key set fetches by outcome (rejected_shared: a shared key set that failed verification)",
            labels=["provider", "outcome"],
        )
        refetches = CounterMetricFamily(
            "ext_authz_kid_refetches",
            "Unknown-kid refetches: fetched (started), or suppressed (a request held back by the rate limit)",
            labels=["provider", "outcome"],
        )
        age = GaugeMetricFamily(
            "ext_authz_key_age_seconds", "Seconds since the keys in use were fetched", labels=["provider"]
        )
        max_stale = GaugeMetricFamily(
            "ext_authz_key_max_stale_seconds",
            "The provider's max_stale_seconds: key age beyond it means no usable keys",
            labels=["provider"],
        )
        ready = GaugeMetricFamily(
            "ext_authz_provider_ready",
            "1 when the provider has usable keys (not stale), else 0",
            labels=["provider"],
        )
        now = self._clock()
        for provider, stats in self._stats().items():
            max_stale.add_metric([provider], stats.max_stale_seconds)
            ready.add_metric([provider], 1.0 if stats.ready(now) else 0.0)
            for outcome, count in stats.fetches.items():
                fetches.add_metric([provider, outcome], count)
            for outcome in ("fetched", "suppressed"):
                refetches.add_metric([provider, outcome], stats.kid_refetches.get(outcome, 0))
            if stats.fetched_at is not None:
                age.add_metric([provider], max(0.0, now - stats.fetched_at))
        yield fetches
        yield refetches
        yield age
        yield max_stale
        yield ready


class TokenCacheCollector(Collector):
    """Verified-token cache lookups and size, read at scrape time."""

    def __init__(self, state: Callable[[], tuple[int, int, int]]) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits, misses, size = self._state()
        requests = CounterMetricFamily(
            "ext_authz_token_cache_requests", "Verified-token cache lookups", labels=["result"]
        )
        requests.add_metric(["hit"], hits)
        requests.add_metric(["miss"], misses)
        yield requests
        yield GaugeMetricFamily("ext_authz_token_cache_size", "Verified tokens cached", value=size)


class SessionCollector(Collector):
    """Browser sign-ins, refreshes and logouts by outcome; sessions in the Redis store."""

    def __init__(self, events: SessionEvents) -> None:
        self._events = events

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counts = CounterMetricFamily(
            "ext_authz_session_events",
            "Browser sign-ins, refreshes and logouts by outcome",
            labels=["event", "outcome"],
        )
        for (event, outcome), value in sorted(self._events.snapshot().items()):
            counts.add_metric([event, outcome], value)
        yield counts
        if self._events.active is not None:
            yield GaugeMetricFamily(
                "ext_authz_sessions_active",
                "Sessions in the Redis store (not logged out, not past max age)",
                value=self._events.active,
            )


class TlsCollector(Collector):
    """The served certificate's expiry and its renewals, read at scrape time (alert before expiry)."""

    def __init__(self, state: Callable[[], tuple[float, int, int]]) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        not_after, renewed, refused = self._state()
        yield GaugeMetricFamily(
            "ext_authz_tls_certificate_expiry_timestamp_seconds",
            "When the certificate served to new connections expires (POSIX seconds)",
            value=not_after,
        )
        renewals = CounterMetricFamily(
            "ext_authz_tls_renewals",
            "Changed certificate files: renewed (now served) or refused (not a usable pair; old one kept)",
            labels=["outcome"],
        )
        renewals.add_metric(["renewed"], renewed)
        renewals.add_metric(["refused"], refused)
        yield renewals


DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_LE = (*(repr(bound) for bound in DURATION_BUCKETS), "+Inf")  # bucket labels, as Prometheus writes them

CheckLabels = tuple[str, str, str, str, str]  # decision, status, reason, provider, rule


class _Counts:
    """One thread's Check counts: written only by that thread, summed by the scrape."""

    __slots__ = ("buckets", "checks", "seconds")

    def __init__(self) -> None:
        self.checks: dict[CheckLabels, int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: above every bound (+Inf)
        self.seconds = 0.0

    def add(self, other: _Counts) -> None:
        for labels, count in other.checks.copy().items():  # copy(): one step under the GIL
            self.checks[labels] = self.checks.get(labels, 0) + count
        for i, count in enumerate(other.buckets):
            self.buckets[i] += count
        self.seconds += other.seconds


class CheckCollector(Collector):
    """``ext_authz_checks_total`` and ``ext_authz_check_duration_seconds``: plain counters per
    thread on the Check path (no label lookup, no lock), aggregated at scrape time."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live: list[tuple[threading.Thread, _Counts]] = []
        self._retired = _Counts()  # the counts of threads that have ended (request threads come and go)

    def record(self, labels: CheckLabels, seconds: float) -> None:
        try:
            counts: _Counts = self._local.counts
        except AttributeError:
            counts = self._local.counts = _Counts()
            with self._lock:  # a new thread (rare): the ended ones' counts are folded now
                self._fold_ended()
                self._live.append((threading.current_thread(), counts))
        checks = counts.checks
        checks[labels] = checks.get(labels, 0) + 1
        counts.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts.seconds += seconds

    def _fold_ended(self) -> None:
        """A thread that has ended writes no more: its counts move to the retired sum for good.
        With the lock held."""
        live = []
        for thread, counts in self._live:
            if thread.is_alive():
                live.append((thread, counts))
            else:
                self._retired.add(counts)
        self._live = live

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        summed = _Counts()
        with self._lock:
            self._fold_ended()
            live = list(self._live)
            summed.add(self._retired)
        for _, counts in live:
            summed.add(counts)
        checks, buckets, seconds = summed.checks, summed.buckets, summed.seconds
        family = CounterMetricFamily(
            "ext_authz_checks",
            "Check calls by decision",
            labels=["decision", "status", "reason", "provider", "rule"],
        )
        for labels, count in sorted(checks.items()):
            family.add_metric(list(labels), count)
        yield family
        cumulative, total = [], 0
        for bound, count in zip(_LE, buckets, strict=True):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily(
            "ext_authz_check_duration_seconds",
            "Time to decide one Check",
            buckets=cumulative,
            sum_value=seconds,
        )


class DecisionLogCollector(Collector):
    """What the decision log's writer could not write, read at scrape time (alert on any)."""

    def __init__(self, state: Callable[[], tuple[int, int]]) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily]:
        failed, dropped = self._state()
        yield CounterMetricFamily(
            "ext_authz_decision_log_write_failures",
            "Batches of decision-log lines the stream refused (closed, full, absent): their lines are lost",
            value=failed,
        )
        yield CounterMetricFamily(
            "ext_authz_decision_log_dropped_lines",
            "Decision-log lines dropped because the stream stopped taking them (queue full)",
            value=dropped,
        )


class Metrics:
    def __init__(
        self,
        key_stats: Callable[[], Mapping[str, KeyStats]],
        clock: Callable[[], float] = time.time,
        token_cache: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0),
        decision_log: Callable[[], tuple[int, int]] = linewriter.stdout_stats,
        session_events: SessionEvents | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._checks = CheckCollector()
        self.registry.register(self._checks)
        self.reloads = Counter(
            "ext_authz_config_reloads",
            "Configuration reloads by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("ok", "invalid"):  # at zero from the start: a first failure shows as a rise
            self.reloads.labels(outcome)
        build = Gauge("ext_authz_build_info", "Build information", ["version"], registry=self.registry)
        build.labels(__version__).set(1)
        self.registry.register(KeyCollector(key_stats, clock))
        self.registry.register(TokenCacheCollector(token_cache))
        self.registry.register(DecisionLogCollector(decision_log))
        if session_events is not None:
            self.registry.register(SessionCollector(session_events))

    def record(self, decision: Decision, seconds: float) -> None:
        if isinstance(decision, Allow):
            labels: CheckLabels = ("allow", "200", decision.reason, decision.provider or "", decision.rule)
        else:
            labels = ("deny", str(decision.status), decision.code, decision.provider or "", decision.rule)
        self._checks.record(labels, seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
