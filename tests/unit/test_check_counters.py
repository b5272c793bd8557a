"""The Check counters: plain per-thread counts, summed at scrape time, in the exposition
prometheus_client's own Counter and Histogram would give."""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ext_authz.metrics import DURATION_BUCKETS, CheckCollector, CheckLabels, Metrics
from ext_authz.model import Allow, Deny

LABELS: list[CheckLabels] = [
    ("allow", "200", "token", "idp", "rules[0]"),
    ("deny", "401", "token_expired", "idp", "rules[0]"),
    ("deny", "403", "rule_denied", "", "rules[2]"),
]


def exposition(collector: CheckCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_same_text_as_prometheus_client() -> None:
    """Every sample prometheus_client's Counter and Histogram write (but _created) is the same."""
    registry = CollectorRegistry()
    checks = Counter(
        "ext_authz_checks", "Check calls by decision", ["decision", "status", "reason", "provider", "rule"],
        registry=registry,
    )  # fmt: skip
    duration = Histogram(
        "ext_authz_check_duration_seconds", "Time to decide one Check", buckets=DURATION_BUCKETS,
        registry=registry,
    )  # fmt: skip
    ours = CheckCollector()
    rng = random.Random(7)  # noqa: S311  # reproducible, not secret
    values = [*DURATION_BUCKETS, 0.0, 2.0, 1e-9]  # exactly on a bound counts in that bound's bucket
    for _ in range(2000):
        labels = rng.choice(LABELS)
        seconds = rng.choice(values) if rng.random() < 0.3 else rng.random() * 0.3
        checks.labels(*labels).inc()
        duration.observe(seconds)
        ours.record(labels, seconds)
    theirs = generate_latest(registry).decode()

    def samples(text: str) -> list[str]:
        return sorted(line for line in text.splitlines() if line and "_created" not in line)

    assert samples(exposition(ours)) == samples(theirs)


def test_no_count_lost_across_threads() -> None:
    ours = CheckCollector()
    start = threading.Barrier(4)

    def work(labels: CheckLabels) -> None:
        start.wait()
        for _ in range(20_000):
            ours.record(labels, 0.0003)
            ours.record(LABELS[0], 0.02)

    threads = [threading.Thread(target=work, args=(LABELS[i % 3],)) for i in range(4)]
    for thread in threads:
        thread.start()
    scraped = [exposition(ours) for _ in range(20)]  # scrapes while the threads count
    for thread in threads:
        thread.join()
    text = exposition(ours)
    assert (
        'ext_authz_checks_total{decision="allow",provider="idp",reason="token",rule="rules[0]",'
        'status="200"} 120000.0' in text
    )
    assert "ext_authz_check_duration_seconds_count 160000.0" in text
    assert 'ext_authz_check_duration_seconds_bucket{le="0.0005"} 80000.0' in text
    assert all("ext_authz_checks_total" in page for page in scraped)


def test_metrics_record_decisions() -> None:
    metrics = Metrics(lambda: {})
    metrics.record(Allow(rule="r", provider=None, subject="s"), 0.001)
    metrics.record(Deny(status=403, grpc_code=7, code="rule_denied", headers=(), body="", rule="r"), 5.0)
    text = metrics.exposition().decode()
    assert (
        'ext_authz_checks_total{decision="allow",provider="",reason="token",rule="r",status="200"} 1.0'
        in text
    )
    assert 'ext_authz_check_duration_seconds_bucket{le="0.001"} 1.0' in text
    assert 'ext_authz_check_duration_seconds_bucket{le="1.0"} 1.0' in text
    assert 'ext_authz_check_duration_seconds_bucket{le="+Inf"} 2.0' in text
    assert "ext_authz_check_duration_seconds_sum 5.001" in text


def test_decision_log_losses_are_exported() -> None:
    text = Metrics(lambda: {}, decision_log=lambda: (2, 7)).exposition().decode()
    assert "ext_authz_decision_log_write_failures_total 2.0" in text
    assert "ext_authz_decision_log_dropped_lines_total 7.0" in text
