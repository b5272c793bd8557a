"""`python -m tests.soak.run --seconds N --report PATH [--short]`: the soak of issue 18.

Starts the stack (tests/soak/stack.py), waits until every kind of request is answered, measures
the generator's closed-loop maximum and runs the mix at half of it for N seconds under the fault
schedule (tests/soak/faults.py; --short: compressed into about a minute), then SIGTERMs the server
under load and checks the drain's answers. Writes the report with its plots next to it and prints
the verdict; exits 0 on a clean verdict, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.soak.checker import Checker, Verdict
from tests.soak.faults import Faults, Schedule, Window
from tests.soak.load import Browsers, KeyBook, Load, Outcome, Sample, Sampler
from tests.soak.stack import Stack, Timings, retry_policy_validates, soak_stack
from tests.support.idp import DISCOVERY_PATH, JWKS_PATH

WORKERS = 2
GROWTH_LIMIT = 0.05
SHORT = Timings(
    refresh_seconds=5, refetch_min_seconds=5, fetch_timeout_seconds=3, token_lifetime=15, drain_seconds=3
)
LONG = Timings(
    refresh_seconds=30, refetch_min_seconds=30, fetch_timeout_seconds=3, token_lifetime=60, drain_seconds=5
)


@dataclass(frozen=True, slots=True)
class Line:
    """One verdict line: what is measured, the number, the limit, and whether it holds."""

    name: str
    value: str
    limit: str
    ok: bool


@dataclass
class Run:
    seconds: float
    short: bool
    timings: Timings
    schedule: Schedule
    retry: bool
    retry_validates: tuple[bool, str]
    max_rate: float = 0.0
    rate: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    sigterm_at: float = 0.0
    load_stopped_at: float = 0.0
    exit_code: int | None = None
    idp_requests: dict[str, int] = field(default_factory=dict)
    idp_bounds: dict[str, int] = field(default_factory=dict)
    reloads: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    envoy_stats: dict[str, int] = field(default_factory=dict)
    kills: list[tuple[float, int, float | None]] = field(default_factory=list)
    fault_errors: list[str] = field(default_factory=list)
    growth: list[tuple[str, str, float, float, float]] = field(
        default_factory=list
    )  # who, what, early, late, ratio
    verdict: Verdict = field(default_factory=Verdict)
    lines: list[Line] = field(default_factory=list)
    config_text: str = ""
    wall_seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return all(line.ok for line in self.lines)


def _metrics(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ext_authz_config_reloads_total") or line.startswith("ext_authz_worker_restarts"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def warm_up(load: Load, browsers_ok: bool, timeout: float) -> None:
    """Until the valid tokens of both providers are allowed (the fleet has keys)."""
    from tests.soak.load import plan

    deadline = time.monotonic() + timeout
    conn_outcomes: list[Outcome] = []
    while time.monotonic() < deadline:
        conn_outcomes.clear()
        for kind in ("rs_cached", "es_cached", "rs_new", "es_new"):
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", load.stack.envoy.port, timeout=5)
            outcome, conn = load._send(conn, plan(kind, load.keys))
            conn.close()
            conn_outcomes.append(outcome)
        if all(o.status == 200 for o in conn_outcomes):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the stack never allowed a valid token: {conn_outcomes}")


def resource_growth(run: Run, warmup: float) -> None:
    """Per process (a restarted worker's series starts anew): the median over the first and the
    last fifth after its warm-up, RSS and FDs; growth = late / early - 1."""
    series: dict[int, list[Sample]] = {}
    for sample in run.samples:
        if sample.at < run.sigterm_at:
            series.setdefault(sample.pid, []).append(sample)
    for pid, samples in series.items():
        begin = samples[0].at + warmup
        kept = [s for s in samples if s.at >= begin]
        if len(kept) < 10:
            run.growth.append((f"{samples[0].role} {pid}", "too short", 0, 0, 0))
            continue
        fifth = max(2, len(kept) // 5)
        for what, values in (("rss", [s.rss_mib for s in kept]), ("fds", [float(s.fds) for s in kept])):
            early, late = _median(values[:fifth]), _median(values[-fifth:])
            run.growth.append((f"{samples[0].role} {pid}", what, early, late, late / early - 1))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def idp_bound(run: Run, provider: str, restarts: int) -> int:
    """Discovery + JWKS requests one JWT provider may cost over the run (README "Keys"): each
    fetch reads discovery and JWKS (2 requests); routine refreshes ~ one per interval across the
    fleet (the Redis cache); unknown-kid refetches at most one per refetch interval per worker;
    while Redis is out (restarted, paused, then left alone 5 s) each worker refreshes itself; an
    IdP outage costs each worker its backoff retries (1 s, 2 s, 4 s, ...); a new worker fetches
    (or adopts) once."""
    t, w = run.timings, WORKERS
    seconds = run.seconds
    routine = math.ceil(seconds / t.refresh_seconds) + 1
    refetch = w * (math.ceil(seconds / t.refetch_min_seconds) + 1)
    redis_faults = sum(1 for x in run.windows if x.kind in ("redis restart", "redis paused"))
    redis = redis_faults * w * (math.ceil((5 + 2) / t.refresh_seconds) + 1)
    outages = [x for x in run.windows if x.kind == "idp down"]
    down = run.schedule.idp_down + run.schedule.idp_slow
    retries = len(outages) * w * (math.ceil(math.log2(down + 1)) + 2)
    del provider
    return 2 * (routine + refetch + redis + retries + restarts)


def soak(seconds: float, short: bool, report: Path, *, retry: bool = False) -> Run:
    started = time.monotonic()
    timings = SHORT if short else LONG
    schedule = Schedule.short() if short else Schedule.long()
    with tempfile.TemporaryDirectory(prefix="ext-authz-soak-") as tmp:
        workdir = Path(tmp)
        run = Run(seconds, short, timings, schedule, retry, retry_policy_validates(workdir))
        with soak_stack(workdir, timings, retry=retry) as stack:
            run.config_text = stack.configs["a"]
            _drive(run, stack)
    run.wall_seconds = time.monotonic() - started
    return run


def _drive(run: Run, stack: Stack) -> None:
    t = run.timings
    load = Load(stack, KeyBook(stack.rs, stack.es, time.monotonic, retired_grace=1.0), time.monotonic())
    warm_up(load, True, 60)
    run.max_rate = load.probe(3 if run.short else 10)
    run.rate = run.max_rate / 2
    print(f"soak: closed-loop maximum {run.max_rate:.0f}/s; running at {run.rate:.0f}/s", flush=True)
    admin = stack.admin
    load.t0 = time.monotonic()
    clock = load.now
    keys = load.keys
    keys.clock = clock
    keys.retired_grace = t.refresh_seconds + t.refetch_min_seconds
    for entry in keys.issuers.values():
        entry.published = {k: 0.0 for k in entry.published}
    for issuer in (stack.rs, stack.es):
        issuer.reset_counts()
    sampler = Sampler(stack, clock)
    browsers = Browsers(stack, stack.echo, clock, 2, interval=0.5, session_seconds=2.5 * t.token_lifetime)
    faults = Faults(stack, keys, run.schedule, clock, until=run.seconds - 2)
    sampler.start()
    load.start(run.rate)
    browsers.start()
    faults.start()
    try:
        time.sleep(max(0.0, run.seconds - clock()))
        run.metrics = _metrics(admin)
        run.envoy_stats = stack.envoy.stats("cluster.ext_authz.") | stack.envoy.stats(
            "http.ingress.ext_authz"
        )
        faults.stop()
        # The end: SIGTERM under load. Answers during the drain are checked; nothing is sent once
        # the server stops answering (the drain's end), so every answer sent is judged.
        run.sigterm_at = clock()
        stack.authz.process.popen.send_signal(signal.SIGTERM)
        time.sleep(max(0.0, t.drain_seconds - 0.5))
    finally:
        load.stop()
        browsers.stop()
        run.load_stopped_at = clock()
        faults.stop()
        sampler.stop()
    try:
        run.exit_code = stack.authz.process.popen.wait(30)
    except Exception:
        run.exit_code = None
    run.outcomes = sorted(load.outcomes + browsers.outcomes, key=lambda o: o.sent)
    run.samples, run.windows = sampler.samples, sorted(faults.windows, key=lambda w: w.start)
    run.reloads, run.kills, run.fault_errors = faults.reloads, faults.kills, faults.errors
    for name, issuer in (("rs", stack.rs), ("es", stack.es)):
        run.idp_requests[name] = issuer.request_count(DISCOVERY_PATH) + issuer.request_count(JWKS_PATH)


def judge(run: Run) -> None:
    t = run.timings
    margin = max(t.refresh_seconds, t.refetch_min_seconds) + t.fetch_timeout_seconds + 1
    v = run.verdict = Checker(run.windows, idp_margin=margin).judge(run.outcomes)
    resource_growth(run, warmup=15 if run.short else 180)
    restarts = int(run.metrics.get("ext_authz_worker_restarts_total", len(run.kills)))
    for name in run.idp_requests:
        run.idp_bounds[name] = idp_bound(run, name, restarts)
    worst = max((g[4] for g in run.growth if g[1] != "too short"), default=0.0)
    kinds = {k for k, _ in v.by_kind.items()}
    s = run.schedule
    expected_faults = {
        "rotation": 1, "key removed": 1, "idp down": 1, "idp slow": 1, "redis restart": 1,
        "redis paused": 1, "reload": 1, "reload (invalid)": 1, "worker SIGKILL": 1,
    }  # fmt: skip
    del s
    seen_faults = {w.kind for w in run.windows}
    missing = sorted(k for k in expected_faults if k not in seen_faults)
    ok_reloads = run.metrics.get('ext_authz_config_reloads_total{outcome="ok"}', 0)
    bad_reloads = run.metrics.get('ext_authz_config_reloads_total{outcome="invalid"}', 0)
    run.lines = [
        Line("requests judged (every answer checked)", f"{v.total}", "> 0", v.total > 0),
        Line("must-deny requests allowed", f"{len(v.wrong_allow)}", "0", not v.wrong_allow),
        Line(
            "allowed with the wrong identity (x-user-id)",
            f"{len(v.wrong_identity)}",
            "0",
            not v.wrong_identity,
        ),
        Line(
            "valid credentials refused outside the allowed windows",
            f"{len(v.valid_refused)}",
            "0",
            not v.valid_refused,
        ),
        Line("denials with the wrong status", f"{len(v.wrong_denial)}", "0", not v.wrong_denial),
        Line("5xx other than the documented 503s", f"{len(v.unexpected_5xx)}", "0", not v.unexpected_5xx),
        Line("Envoy status_on_error (510), outside SIGKILL windows", f"{len(v.status_on_error)}", "0",
             not v.status_on_error),
        Line("Envoy status_on_error (510), inside SIGKILL windows", f"{len(v.status_on_error_kill)}",
             "0 (retry_policy)", not v.status_on_error_kill),
        Line("requests without an HTTP answer", f"{len(v.transport_errors)}", "0", not v.transport_errors),
        Line("refusals inside allowed windows (documented)",
             ", ".join(f"{n} {r}" for r, n in v.in_window.items()) or "0", "any", True),
        Line("session refreshes seen (Set-Cookie on a navigation)", f"{v.refreshes}", "> 0", v.refreshes > 0),
        Line("kinds of request sent", f"{len(kinds)}", "all 13", len(kinds) == 13),
        Line("faults that happened", f"{len(seen_faults)} kinds, missing: {', '.join(missing) or 'none'}",
             "every kind", not missing and not run.fault_errors),
        Line("config reloads ok / invalid (server's counters)", f"{ok_reloads:g} / {bad_reloads:g}",
             f"{run.reloads.get('valid', 0)} / {run.reloads.get('invalid', 0)} written",
             ok_reloads >= run.reloads.get("valid", 0) and bad_reloads >= run.reloads.get("invalid", 0) > 0),
        Line(
            "killed workers replaced",
            f"{sum(1 for k in run.kills if k[2] is not None)} of {len(run.kills)}",
            "all",
            all(k[2] is not None for k in run.kills) and bool(run.kills),
        ),
        Line("RSS and FDs, worst growth after warm-up (per process)", f"{worst * 100:+.1f} %",
             f"< {GROWTH_LIMIT * 100:g} %", worst < GROWTH_LIMIT),
        *(
            Line(f"IdP requests (discovery + JWKS), provider {name}", f"{n}", f"<= {run.idp_bounds[name]}",
                 n <= run.idp_bounds[name])
            for name, n in run.idp_requests.items()
        ),
        Line("server exit code after SIGTERM under load", f"{run.exit_code}", "0", run.exit_code == 0),
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.run", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1800)
    parser.add_argument("--report", type=Path, default=Path("tests/soak/REPORT.md"))
    parser.add_argument("--short", action="store_true", help="faults compressed into about a minute")
    # Off by default: with GrpcService.retry_policy Envoy 1.40 gave each try a shorter timeout
    # (upstream_rq_per_try_timeout in its stats) and answered status_on_error where one try
    # waiting the whole deadline answered in time (tests/soak/NOTES.md).
    parser.add_argument("--retry", action="store_true", help="with Envoy's GrpcService.retry_policy")
    args = parser.parse_args(argv)
    run = soak(args.seconds, args.short, args.report, retry=args.retry)
    judge(run)
    from tests.soak.report import write_report

    write_report(run, args.report)
    print_verdict(run)
    return 0 if run.clean else 1


def print_verdict(run: Run) -> None:
    width = max(len(line.name) for line in run.lines)
    for line in run.lines:
        print(f"{'ok ' if line.ok else 'BAD'} {line.name:<{width}}  {line.value}  (limit {line.limit})")
    v = run.verdict
    for title, items in (
        ("wrong allows", v.wrong_allow), ("wrong identity", v.wrong_identity),
        ("valid refused", v.valid_refused), ("wrong denial", v.wrong_denial), ("5xx", v.unexpected_5xx),
        ("status_on_error", v.status_on_error), ("status_on_error (kill)", v.status_on_error_kill),
        ("no answer", v.transport_errors), ("fault errors", run.fault_errors),
    ):  # fmt: skip
        for item in items[:8]:
            print(f"  {title}: {item}")
    print(f"soak: verdict {'CLEAN' if run.clean else 'NOT CLEAN'} ({run.wall_seconds:.0f} s wall)")


if __name__ == "__main__":
    sys.exit(main())
