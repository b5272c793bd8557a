"""`make bench`: every scenario of issues 6 and 13 through a real Envoy, in one run, and a Markdown report.

    python -m tests.bench.suite [--report tests/bench/REPORT.md] [--seconds 10] [--rounds 5]

Scenarios (Envoy 1.40, ``--concurrency 1``, a ``direct_response`` route, so no backend):
  E0 Envoy alone; E1 Envoy's jwt_authn with its token cache; E2 Envoy -> the no-op grpc.aio
  authorizer (noop_server.py); E2s the same no-op on grpc's sync server, 4 threads (the second
  floor); X1 Envoy -> ext-authz, one cached token; X2 -> ext-authz, a pool of
  distinct tokens (every request a new verification); X3 -> ext-authz with 100 rules, the request
  matching the last; X4 -> ext-authz ``--workers 2`` behind envoy.yaml's ext_authz cluster
  settings (and X4b with a low max_concurrent_streams, when envoy.yaml's differs).
Every Envoy and authorizer is started first and stays up; each scenario is warmed up, then the
scenarios take turns in rounds of wrk load (fixed connections; the duration split into rounds), so
that a slow spell of the shared machine touches all of them alike. CPU time per request comes from
/proc/PID/stat (utime + stime of every thread; a supervisor and each of its workers) over the
rounds. Then X2's token cache is filled and the resident sizes read, X1, H1, E2 and E2s run at the same
constant rate (half of X1's maximum), and ext-authz is profiled with py-spy under X1's load. The
in-process micro-benchmarks (micro.py) and bench_rules.py run first, before any load.

Read the ratios, not the absolute numbers. The whole run is bounded (about 3 minutes on 2 cores)
and every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ext_authz.dev.plan import envoy_binary
from ext_authz.serveoptions import DEFAULT_THREADS
from tests.bench import bench_rules, envoy_bench, fixtures, load, micro, plots, profiling
from tests.bench.envoy_bench import BenchEnvoy
from tests.bench.fixtures import ExtAuthz
from tests.bench.load import LoadResult
from tests.bench.procs import BenchError, BenchProcess, CpuSnapshot, children, rss_mib
from tests.support.idp import SigningKey

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REPORT = ROOT / "tests" / "bench" / "REPORT.md"
DEFAULT_CACHE_ENTRIES = 10_000  # ext-authz's default token_cache.max_entries
# X2 cycles through more distinct tokens than the cache holds: cyclic access over more keys than
# an LRU keeps always misses (10,000 tokens in a 10,000-entry cache would all hit from the second
# pass on). The cache ends full at its default size, which is when X2's resident size is read.
POOL_SIZE = 12_000
WORKERS = 2
SYNC_THREADS = 4  # E2s: the thread pool issue 13 measured the sync floor with
OTHER_THREADS = (4, 8)  # X1 with these request-thread counts too, beside the default (2)
# X4's max_concurrent_streams when envoy.yaml's ext_authz cluster sets none; otherwise X4b's, beside
# X4 with envoy.yaml's value: with 16 connections of load, 2 streams a connection makes Envoy open
# about 8 connections, which SO_REUSEPORT spreads over the workers.
FALLBACK_MAX_STREAMS = 2


@dataclass(frozen=True, slots=True)
class Options:
    report: Path
    seconds: float
    rounds: int
    warmup: float
    connections: int
    threads: int
    rate_seconds: float
    profile_seconds: float


@dataclass(frozen=True, slots=True)
class Measured:
    key: str
    title: str
    load: LoadResult  # every round added up; p50 and p99 are the medians of the rounds' values
    round_rates: tuple[float, ...]
    envoy_cpu_us: float
    authz_cpu_us: float | None  # None: no authorizer process (E0, E1)
    # CPU seconds over the measured rounds by process label (X4: supervisor and each worker).
    processes: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Scenario:
    """One Envoy (and authorizer) kept running through the whole run, loaded round after round."""

    key: str
    title: str
    envoy: BenchEnvoy
    authz: dict[str, int]  # label -> pid
    token: str | None
    token_file: Path | None = None
    warmup_token: str | None = None
    offset: int = 0  # the next token of token_file
    rounds: list[LoadResult] = field(default_factory=list)
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds in the rounds

    @property
    def url(self) -> str:
        return self.envoy.url + fixtures.PATH

    def warm_up(self, options: Options) -> None:
        warm = self.warmup_token if self.warmup_token is not None else self.token
        load.wrk(
            self.url,
            seconds=options.warmup,
            connections=options.connections,
            threads=options.threads,
            token=warm,
        )

    def round(self, options: Options, seconds: float) -> None:
        pids = [self.envoy.pid, *self.authz.values()]
        before = CpuSnapshot.of(pids)
        result = load.wrk(
            self.url,
            seconds=seconds,
            connections=options.connections,
            threads=options.threads,
            token=self.token,
            token_file=self.token_file,
            token_offset=self.offset,
        )
        for pid, used in CpuSnapshot.of(pids).minus(before).items():
            self.cpu[pid] = self.cpu.get(pid, 0.0) + used
        self.rounds.append(result)
        if self.token_file is not None:  # go on where this round stopped, each thread in its share
            self.offset += result.requests - result.requests % options.threads

    def summary(self) -> Measured:
        requests = sum(r.requests for r in self.rounds)
        if requests == 0:
            raise BenchError(f"{self.key}: no request completed")
        total = LoadResult(
            requests=requests,
            seconds=sum(r.seconds for r in self.rounds),
            errors=sum(r.errors for r in self.rounds),
            p50_us=statistics.median(r.p50_us for r in self.rounds),
            p99_us=statistics.median(r.p99_us for r in self.rounds),
        )
        per_request = 1e6 / requests
        return Measured(
            key=self.key,
            title=self.title,
            load=total,
            round_rates=tuple(r.rate for r in self.rounds),
            envoy_cpu_us=self.cpu[self.envoy.pid] * per_request,
            authz_cpu_us=sum(self.cpu[p] for p in self.authz.values()) * per_request if self.authz else None,
            processes={label: self.cpu[pid] for label, pid in self.authz.items()},
        )


@dataclass
class Results:
    scenarios: dict[str, Measured] = field(default_factory=dict)
    constant: dict[str, LoadResult] = field(default_factory=dict)
    constant_method: str = ""
    rss: dict[str, float] = field(default_factory=dict)  # label -> MiB
    cache: dict[str, dict[str, float]] = field(default_factory=dict)
    x4: str = ""  # why X4 did not run, if it did not
    x4_detail: dict[str, dict[str, Any]] = field(default_factory=dict)
    micro: list[micro.Row] = field(default_factory=list)
    rules_table: str = ""
    profile: profiling.Profile | None = None
    profile_note: str = ""
    notes: list[str] = field(default_factory=list)


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ---- the run ----------------------------------------------------------------------------------


def workers_supported() -> bool:
    completed = subprocess.run(
        [sys.executable, "-m", "ext_authz", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    return "--workers" in completed.stdout


def shipped_max_streams() -> int | None:
    """max_concurrent_streams of the ext_authz cluster in the repository's envoy.yaml, if set."""
    try:
        document = yaml.safe_load((ROOT / "envoy.yaml").read_text())
        for cluster in document["static_resources"]["clusters"]:
            if cluster.get("name") != "ext_authz":
                continue
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            http2 = options["explicit_http_config"]["http2_protocol_options"] or {}
            value = http2.get("max_concurrent_streams")
            return int(value) if value is not None else None
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
    return None


class Stack:
    """Starts processes and stops them all, last started first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._exit = contextlib.ExitStack()
        self.authz_by_pid: dict[int, ExtAuthz] = {}

    def envoy(self, config: dict[str, Any], name: str) -> BenchEnvoy:
        envoy = envoy_bench.start(config, self.workdir, name)
        self._exit.callback(envoy.stop)
        return envoy

    def authz(
        self,
        config: dict[str, Any],
        name: str,
        *,
        workers: int | None = None,
        extra: Sequence[str] = (),
        http: bool = False,
    ) -> ExtAuthz:
        authz = fixtures.start_ext_authz(config, self.workdir, name, workers=workers, extra=extra, http=http)
        self._exit.callback(authz.stop)
        self.authz_by_pid[authz.pid] = authz
        return authz

    def noop(self, sync_threads: int = 0) -> tuple[BenchProcess, str]:
        process, address = fixtures.start_noop(self.workdir, sync_threads)
        self._exit.callback(process.stop)
        return process, address

    def close(self) -> None:
        self._exit.close()


def start_scenarios(
    stack: Stack, rs256: SigningKey, token: str, pool_file: Path, results: Results
) -> dict[str, Scenario]:
    scenarios: dict[str, Scenario] = {}

    def add(key: str, title: str, envoy: BenchEnvoy, authz: dict[str, int], **extra: Any) -> None:
        scenarios[key] = Scenario(key, title, envoy, authz, **{"token": token, **extra})

    add("E0", "Envoy direct_response", stack.envoy(envoy_bench.direct_response(), "e0"), {})
    jwks = fixtures.jwks([rs256])
    e1 = stack.envoy(envoy_bench.jwt_authn(fixtures.ISSUER, fixtures.AUDIENCE, jwks), "e1")
    add("E1", "Envoy jwt_authn, token cache", e1, {})
    noop, address = stack.noop()
    add(
        "E2",
        "Envoy → no-op grpc.aio authorizer",
        stack.envoy(envoy_bench.ext_authz(address), "e2"),
        {"noop": noop.pid},
    )
    noop_sync, sync_address = stack.noop(sync_threads=SYNC_THREADS)
    add(
        "E2s",
        f"Envoy → no-op authorizer on grpc's sync server, {SYNC_THREADS} threads",
        stack.envoy(envoy_bench.ext_authz(sync_address), "e2s"),
        {"noop": noop_sync.pid},
    )

    config = fixtures.authz_config([rs256])
    x1 = stack.authz(config, "x1")
    add(
        "X1",
        "Envoy → ext-authz, one cached token",
        stack.envoy(envoy_bench.ext_authz(x1.address), "x1"),
        {"ext-authz": x1.pid},
    )
    h1 = stack.authz(config, "h1", http=True)
    assert h1.http is not None
    add(
        "H1",
        "Envoy → ext-authz's HTTP listener (http_service), one cached token",
        stack.envoy(envoy_bench.ext_authz_http(h1.http), "h1"),
        {"ext-authz": h1.pid},
    )
    for threads in OTHER_THREADS:
        variant = stack.authz(config, f"x1t{threads}", extra=[f"--threads={threads}"])
        add(
            f"X1t{threads}",
            f"Envoy → ext-authz --threads {threads} (default {DEFAULT_THREADS}), one cached token",
            stack.envoy(envoy_bench.ext_authz(variant.address), f"x1t{threads}"),
            {"ext-authz": variant.pid},
        )
    x2 = stack.authz(config, "x2")
    add(
        "X2",
        f"Envoy → ext-authz, {POOL_SIZE:,} distinct tokens round-robin",
        stack.envoy(envoy_bench.ext_authz(x2.address), "x2"),
        {"ext-authz": x2.pid},
        token=None,
        token_file=pool_file,
        warmup_token=token,
    )
    x3 = stack.authz(fixtures.authz_config([rs256], rules=100), "x3")
    add(
        "X3",
        "Envoy → ext-authz, 100 rules (last matches)",
        stack.envoy(envoy_bench.ext_authz(x3.address), "x3"),
        {"ext-authz": x3.pid},
    )

    if not workers_supported():
        results.x4 = "not available yet: `python -m ext_authz serve --help` shows no `--workers`"
        return scenarios
    shipped = shipped_max_streams()
    variants = [("X4", shipped if shipped is not None else FALLBACK_MAX_STREAMS)]
    if shipped is not None and shipped != FALLBACK_MAX_STREAMS:
        variants.append(("X4b", FALLBACK_MAX_STREAMS))
    for key, streams in variants:
        authz = stack.authz(config, key.lower(), workers=WORKERS)
        envoy = stack.envoy(envoy_bench.ext_authz(authz.address, max_concurrent_streams=streams), key.lower())
        pids = {"supervisor": authz.pid}
        pids.update({f"worker {i} (pid {pid})": pid for i, pid in enumerate(children(authz.pid))})
        source = "envoy.yaml" if key == "X4" and shipped is not None else "this benchmark"
        add(
            key,
            f"Envoy → ext-authz --workers {WORKERS}, max_concurrent_streams {streams} ({source})",
            envoy,
            pids,
        )
        results.x4_detail[key] = {"max_concurrent_streams": streams, "source": source}
    return scenarios


def constant_rate(
    options: Options, scenarios: Mapping[str, Scenario], rate: float, token: str, results: Results
) -> None:
    """X1, H1, E2 and E2s at the same constant rate, alternating in two rounds each; latencies merged."""
    keys = tuple(k for k in ("X1", "H1", "E2", "E2s") if k in scenarios)
    if shutil.which("h2load") is None:
        # Without a constant-rate tool: latency with few connections, far from saturation.
        for key in keys:
            results.constant[key] = load.wrk(
                scenarios[key].url, seconds=options.rate_seconds, connections=2, threads=1, token=token
            )
        results.constant_method = "h2load not installed: wrk with 2 connections instead of a constant rate"
        return
    runs: dict[str, list[LoadResult]] = {key: [] for key in keys}
    for _ in range(2):
        for key in keys:
            runs[key].append(
                load.constant_rate(
                    scenarios[key].url,
                    rate=rate,
                    seconds=options.rate_seconds / 2,
                    connections=options.connections,
                    token=token,
                )
            )
    for key in keys:
        results.constant[key] = load.merged(runs[key])
    results.constant_method = (
        f"h2load --rps, HTTP/1.1, {options.connections} connections paced to {rate:,.0f} req/s in total "
        f"(half of X1's maximum), {', '.join(keys)} alternating, 2 x {options.rate_seconds / 2:g} s each "
        "after 1 s of warm-up; percentiles over every request"
    )


def fill_cache(options: Options, scenario: Scenario, authz: ExtAuthz) -> None:
    """Go on through X2's pool until the token cache holds its default number of entries (bounded)."""
    deadline = time.monotonic() + 60
    rate = max(scenario.rounds[-1].rate, 100.0) if scenario.rounds else 100.0
    while time.monotonic() < deadline:
        size = authz.token_cache().get("size", 0)
        if size >= DEFAULT_CACHE_ENTRIES:
            return
        seconds = min(20.0, max(1.0, (DEFAULT_CACHE_ENTRIES - size) / rate * 1.2))
        result = load.wrk(
            scenario.url,
            seconds=seconds,
            connections=options.connections,
            threads=options.threads,
            token_file=scenario.token_file,
            token_offset=scenario.offset,
        )
        scenario.offset += result.requests - result.requests % options.threads


def run(options: Options, workdir: Path) -> Results:
    results = Results()
    progress("keys and tokens")
    rs256 = fixtures.signing_key("RS256")
    token = fixtures.mint(rs256)
    started = time.monotonic()
    pool = fixtures.mint_pool(rs256, POOL_SIZE)
    pool_file = workdir / "tokens.txt"
    pool_file.write_text("\n".join(pool) + "\n")
    results.notes.append(f"{POOL_SIZE:,} RS256 tokens minted in {time.monotonic() - started:.1f} s.")

    progress("in-process micro-benchmarks")
    results.micro = micro.run()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        bench_rules.main()
    results.rules_table = buffer.getvalue().strip()

    stack = Stack(workdir)
    try:
        progress("starting every Envoy and authorizer")
        scenarios = start_scenarios(stack, rs256, token, pool_file, results)
        for scenario in scenarios.values():
            scenario.warm_up(options)
        x2_authz = _authz_of(stack, scenarios["X2"])
        x2_before = x2_authz.token_cache()
        round_seconds = options.seconds / options.rounds
        for number in range(options.rounds):
            progress(f"round {number + 1} of {options.rounds}: {', '.join(scenarios)}")
            for scenario in scenarios.values():
                scenario.round(options, round_seconds)
        for key, scenario in scenarios.items():
            results.scenarios[key] = measured = scenario.summary()
            progress(
                f"{key}: {measured.load.rate:,.0f} req/s, p50 {_ms(measured.load.p50_us)} ms, "
                f"p99 {_ms(measured.load.p99_us)} ms, errors {measured.load.errors}"
            )

        x1_authz = _authz_of(stack, scenarios["X1"])
        results.cache["X1"] = x1_authz.token_cache()
        results.rss["X1: ext-authz, one token cached"] = rss_mib(x1_authz.pid)
        x2_after = x2_authz.token_cache()
        results.cache["X2 (measured rounds)"] = {
            "hit": x2_after.get("hit", 0) - x2_before.get("hit", 0),
            "miss": x2_after.get("miss", 0) - x2_before.get("miss", 0),
            "size": x2_after.get("size", 0),
        }
        progress("filling X2's token cache")
        fill_cache(options, scenarios["X2"], x2_authz)
        results.cache["X2 after filling"] = x2_authz.token_cache()
        results.rss["X2: ext-authz, token cache full"] = rss_mib(x2_authz.pid)
        for key in ("X4", "X4b"):
            if key not in scenarios:
                continue
            scenario = scenarios[key]
            stats = scenario.envoy.stats(f"cluster.{envoy_bench.AUTHZ_CLUSTER}.upstream_cx_total")
            results.x4_detail[key]["connections"] = sum(stats.values())
            for label, pid in scenario.authz.items():
                with contextlib.suppress(OSError):
                    results.rss[f"{key}: {label}"] = rss_mib(pid)

        half = results.scenarios["X1"].load.rate / 2
        progress(f"X1 and E2 at a constant {half:,.0f} req/s")
        constant_rate(options, scenarios, half, token, results)
        progress("profile of ext-authz under X1's load")
        results.profile, results.profile_note = profile_under_load(
            options, scenarios["X1"], x1_authz.pid, workdir
        )
    finally:
        progress("stopping every process")
        stack.close()
    return results


def _authz_of(stack: Stack, scenario: Scenario) -> ExtAuthz:
    pid = scenario.authz["ext-authz"]
    return stack.authz_by_pid[pid]


def profile_under_load(
    options: Options, scenario: Scenario, pid: int, workdir: Path
) -> tuple[profiling.Profile | None, str]:
    if profiling.py_spy() is None:
        return None, "py-spy is not installed (`make bench` installs it into the venv)"
    assert scenario.token is not None
    seconds = options.profile_seconds
    argv = [
        "wrk",
        "-t",
        str(options.threads),
        "-c",
        str(options.connections),
        "-d",
        f"{math.ceil(seconds) + 2}s",
        "-H",
        f"Authorization: Bearer {scenario.token}",
        scenario.url,
    ]
    loader = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return profiling.record(pid, seconds, workdir / "x1-profile.txt")
    finally:
        try:
            loader.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            loader.kill()
            loader.wait()


# ---- the report -----------------------------------------------------------------------------


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def worker_shares(measured: Measured) -> list[float]:
    workers = [v for k, v in measured.processes.items() if k.startswith("worker")]
    total = sum(workers)
    return [v / total for v in workers] if total else []


def _throughput(
    rows: list[tuple[str, str, str]], a: Measured | None, b: Measured | None, name: str, at_least: float
) -> None:
    if a is not None and b is not None:
        r = _ratio(a.load.rate, b.load.rate)
        rows.append(
            (name, f"{r:.2f} x ({a.load.rate:,.0f} / {b.load.rate:,.0f} req/s)", _verdict(r >= at_least))
        )


def _cpu(rows: list[tuple[str, str, str]], a: Any, b: Any, title: str, at_most: float) -> None:
    """A row for "a's authorizer CPU per request ≤ at_most x b's", when both were measured."""
    if a is None or b is None or a.authz_cpu_us is None or b.authz_cpu_us is None:
        return
    r = _ratio(a.authz_cpu_us, b.authz_cpu_us)
    rows.append(
        (title, f"{r:.2f} x ({a.authz_cpu_us:.0f} / {b.authz_cpu_us:.0f} µs)", _verdict(r <= at_most))
    )


def targets(results: Results) -> list[tuple[str, str, str]]:
    """Issue 13's targets, each a ratio measured in this run."""
    s = results.scenarios
    rows: list[tuple[str, str, str]] = []
    e2, e2s, x1 = s.get("E2"), s.get("E2s"), s.get("X1")
    _throughput(rows, x1, e2, "X1 throughput ≥ 1.10 x E2", 1.10)
    _throughput(rows, x1, e2s, "X1 throughput ≥ 0.80 x E2s", 0.80)
    _cpu(rows, x1, e2, "X1 authorizer CPU per request ≤ 0.90 x E2's", 0.90)
    _throughput(rows, s.get("X2"), e2, "X2 throughput ≥ 0.60 x E2", 0.60)
    _throughput(rows, s.get("X3"), x1, "X3 throughput ≥ 0.95 x X1", 0.95)
    c1, c2 = results.constant.get("X1"), results.constant.get("E2s")
    if c1 is not None and c2 is not None:
        r = _ratio(c1.p99_us, c2.p99_us)
        rows.append(
            (
                "X1 p99 at half its max rate ≤ 1.2 x E2s's p99 at that rate",
                f"{r:.2f} x ({_ms(c1.p99_us)} / {_ms(c2.p99_us)} ms, "
                f"at {c1.rate:,.0f} / {c2.rate:,.0f} req/s)",
                _verdict(r <= 1.2),
            )
        )
    _throughput(rows, s.get("X4"), x1, f"--workers {WORKERS} throughput ≥ 0.95 x X1", 0.95)
    h1 = s.get("H1")
    _throughput(rows, h1, e2, "H1 (HTTP listener) throughput ≥ 2.0 x E2", 2.0)
    _throughput(rows, h1, e2s, "H1 throughput ≥ 1.3 x E2s", 1.3)
    _cpu(rows, h1, e2, "H1 authorizer CPU per request ≤ 0.35 x E2's", 0.35)
    if results.micro:
        for alg in micro.ALGORITHMS:
            verify = micro.value(results.micro, f"verification stage, new token ({alg})")
            raw = micro.value(results.micro, f"raw cryptography verify ({alg})")
            r = _ratio(verify, raw)
            rows.append(
                (
                    f"verifying a new {alg} token ≤ 1.5 x raw verify (in-process)",
                    f"{r:.2f} x ({verify:.0f} / {raw:.0f} µs)",
                    _verdict(r <= 1.5),
                )
            )
    full = results.rss.get("X2: ext-authz, token cache full")
    if full is not None:
        size = results.cache.get("X2 after filling", {}).get("size", 0)
        ok = full <= 100 and size >= DEFAULT_CACHE_ENTRIES
        rows.append(
            (
                "resident size ≤ 100 MiB with the token cache full",
                f"{full:.1f} MiB with {size:,.0f} tokens cached",
                _verdict(ok) if size >= DEFAULT_CACHE_ENTRIES else "not measured: cache not full",
            )
        )
    for key in ("X4", "X4b"):
        x4 = s.get(key)
        if x4 is None:
            continue
        shares = worker_shares(x4)
        ok = bool(shares) and min(shares) >= 0.5 / len(shares)
        versus_x1 = _ratio(x4.load.rate, x1.load.rate) if x1 is not None else float("nan")
        streams = results.x4_detail.get(key, {}).get("max_concurrent_streams")
        rows.append(
            (
                f"{key}: load spread over {len(shares)} workers, max_concurrent_streams {streams} "
                "(each worker ≥ half an even share of the workers' CPU: our criterion)",
                f"worker CPU shares {', '.join(f'{share:.0%}' for share in shares)}; "
                f"throughput {versus_x1:.2f} x X1",
                _verdict(ok),
            )
        )
    if "X4" not in s and results.x4:
        rows.append(("X4: load spread over workers", results.x4, "not measured"))
    return rows


def render(options: Options, results: Results, elapsed: float) -> str:
    out: list[str] = []
    add = out.append
    add("# ext-authz benchmark report")
    add("")
    add(
        f"Generated by `make bench` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed:.0f} s). "
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), load average at the end {_loadavg()}; "
        f"Python {platform.python_version()}; {_envoy_version()}. Shared and noisy: compare the ratios, "
        "which were measured in this one run, not absolute numbers across runs."
    )
    add("")
    add(
        f"Load: wrk, {options.connections} connections, {options.threads} threads, {options.seconds:g} s "
        f"per scenario in {options.rounds} rounds of {options.seconds / options.rounds:g} s, the scenarios "
        "taking turns round by round (every process stays up throughout, so slow drifts of the machine "
        "touch all alike); p50 and p99 are the medians of the rounds' values; "
        f"{options.warmup:g} s of warm-up each; request `GET {fixtures.PATH}` with one RS256 "
        "bearer token; Envoy `--concurrency 1`, every route a `direct_response` (no backend). ext-authz runs "
        "with its defaults (decision log of every Check on, to /dev/null; metrics on; token cache 10,000)."
    )
    add("")
    add("## Targets (issue 13)")
    add("")
    add("| target | measured | |")
    add("|---|---|---|")
    for name, value, verdict in targets(results):
        add(f"| {name} | {value} | {verdict} |")
    add("")
    add("## Through Envoy")
    add("")
    add(
        "| | scenario | req/s | rounds: min-max req/s | p50 ms | p99 ms | errors | Envoy CPU µs/req "
        "| authorizer CPU µs/req |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in results.scenarios.values():
        authz = f"{m.authz_cpu_us:.0f}" if m.authz_cpu_us is not None else "-"
        spread = f"{min(m.round_rates):,.0f}-{max(m.round_rates):,.0f}"
        add(
            f"| {m.key} | {m.title} | {m.load.rate:,.0f} | {spread} | {_ms(m.load.p50_us)} | "
            f"{_ms(m.load.p99_us)} | {m.load.errors} | {m.envoy_cpu_us:.0f} | {authz} |"
        )
    if results.x4:
        add(f"| X4 | Envoy → ext-authz --workers {WORKERS} | {results.x4} | | | | | | |")
    add("")
    add(_ratios(results))
    add("## Latency at a constant rate")
    add("")
    add(f"Method: {results.constant_method}.")
    add("")
    add("| scenario | achieved req/s | p50 ms | p99 ms | non-2xx |")
    add("|---|---:|---:|---:|---:|")
    for key, c in results.constant.items():
        add(f"| {key} | {c.rate:,.0f} | {_ms(c.p50_us)} | {_ms(c.p99_us)} | {c.errors} |")
    add("")
    add(_x4_section(results))
    add("## Token cache and memory")
    add("")
    for key, values in results.cache.items():
        shown = ", ".join(f"{k} {v:,.0f}" for k, v in values.items())
        add(f"- {key}: {shown}")
    for label, mib in results.rss.items():
        add(f"- VmRSS {label}: {mib:.1f} MiB")
    one, full = (
        results.rss.get("X1: ext-authz, one token cached"),
        results.rss.get("X2: ext-authz, token cache full"),
    )
    size = results.cache.get("X2 after filling", {}).get("size", 0)
    if one is not None and full is not None and size > 1:
        per_entry = (full - one) * 2**20 / (size - 1)
        add(f"- per token-cache entry (X2 full - X1, over the entries between): {per_entry / 1024:.1f} KiB")
    add("")
    add("## In-process (no gRPC, no Envoy)")
    add("")
    add("Median µs per call over 7 batches, in one coroutine.")
    add("")
    add("| | µs per call | |")
    add("|---|---:|---|")
    for row in results.micro:
        add(f"| {row.name} | {row.us:.1f} | {row.note} |")
    if results.micro:
        raw = {
            alg: micro.value(results.micro, f"raw cryptography verify ({alg})") for alg in micro.ALGORITHMS
        }
        ratios = ", ".join(
            f"{alg} {micro.value(results.micro, f'verification stage, new token ({alg})') / raw[alg]:.2f} x"
            for alg in micro.ALGORITHMS
        )
        add("")
        add(f"Verification stage / raw verify: {ratios}.")
    add("")
    add("## Rule evaluation (bench_rules.py)")
    add("")
    add(results.rules_table)
    add("")
    add(_profile_section(results))
    steps = ROOT / "tests" / "bench" / "STEPS.md"
    if steps.exists():
        add(steps.read_text().rstrip())
        add("")
    add("## Notes")
    add("")
    for note in results.notes:
        add(f"- {note}")
    add("")
    return "\n".join(out)


def _ratios(results: Results) -> str:
    s = results.scenarios
    lines = [
        "## Ratios (same run)",
        "",
        "| ratio | req/s | authorizer CPU/req | Envoy CPU/req |",
        "|---|---:|---:|---:|",
    ]

    def row(a: str, b: str) -> None:
        if a not in s or b not in s:
            return
        x, y = s[a], s[b]
        authz = (
            f"{_ratio(x.authz_cpu_us, y.authz_cpu_us):.2f}"
            if x.authz_cpu_us is not None and y.authz_cpu_us is not None
            else "-"
        )
        lines.append(
            f"| {a} / {b} | {_ratio(x.load.rate, y.load.rate):.2f} | {authz} | "
            f"{_ratio(x.envoy_cpu_us, y.envoy_cpu_us):.2f} |"
        )

    for a, b in (
        ("E1", "E0"),
        ("E2", "E0"),
        ("E2s", "E2"),
        ("X1", "E2"),
        ("X1", "E2s"),
        *(("X1", f"X1t{threads}") for threads in OTHER_THREADS),
        ("X2", "E2"),
        ("X2", "E2s"),
        ("X3", "E2"),
        ("X3", "E2s"),
        ("X4", "E2"),
        ("X1", "E1"),
        ("X2", "X1"),
        ("X3", "X1"),
        ("X4", "X1"),
        ("X4b", "X1"),
    ):
        row(a, b)
    if "E2" in s and "E0" in s:
        hop = s["E2"].envoy_cpu_us - s["E0"].envoy_cpu_us
        lines += ["", f"Envoy's own CPU for the ext_authz hop (E2 - E0): {hop:.0f} µs per request."]
    lines.append("")
    return "\n".join(lines)


def _x4_section(results: Results) -> str:
    lines = ["## X4: workers", ""]
    if "X4" not in results.scenarios:
        lines += [f"X4 {results.x4 or 'did not run'}.", ""]
        return "\n".join(lines)
    for key in ("X4", "X4b"):
        x4 = results.scenarios.get(key)
        if x4 is None:
            continue
        d = results.x4_detail[key]
        lines.append(
            f"{key}: Envoy's ext_authz cluster with `max_concurrent_streams: {d['max_concurrent_streams']}` "
            f"(as set by {d['source']}); Envoy opened {d.get('connections', '?')} connection(s) to the "
            f"workers' shared port ({x4.load.rate:,.0f} req/s)."
        )
        lines += ["", "| process | CPU s in the rounds | share of the authorizer's CPU |", "|---|---:|---:|"]
        total = sum(x4.processes.values())
        for label, seconds in x4.processes.items():
            lines.append(f"| {label} | {seconds:.2f} | {_ratio(seconds, total):.0%} |")
        lines.append("")
    return "\n".join(lines)


def _profile_section(results: Results) -> str:
    lines = ["## Profile of ext-authz under X1's load (py-spy, Python frames)", ""]
    profile = results.profile
    if profile is None or profile.samples == 0:
        lines += [f"No profile: {results.profile_note or 'no samples'}.", ""]
        return "\n".join(lines)
    lines.append(
        f"{profile.samples} samples of the busy threads (idle waits left out). Self: the innermost Python "
        "frame (time in C code called from it counts there); inclusive: anywhere on the stack."
    )
    lines += ["", "| self | function |", "|---:|---|"]
    for name, count in profile.self_counts.most_common(15):
        lines.append(f"| {count / profile.samples:.1%} | `{name}` |")
    lines += ["", "| inclusive | function |", "|---:|---|"]
    for name, count in profile.inclusive_counts.most_common(25):
        lines.append(f"| {count / profile.samples:.1%} | `{name}` |")
    lines.append("")
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def _envoy_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        completed = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        for part in completed.stdout.split():
            if part.count("/") >= 2 and part[0].isalnum():
                return f"Envoy {part.split('/')[1]}"
    return "Envoy"


def require(tool: str, hint: str) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"bench: `{tool}` not found ({hint})")


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description="ext-authz benchmark suite (issue 6)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="where the Markdown report goes")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per scenario, all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="turns the scenarios take (whole seconds each)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before each scenario")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="each constant-rate run")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 60 or not 0 < args.warmup <= 10 or args.threads > args.connections:
        parser.error("seconds within 1..60, warm-up within 0..10, threads at most connections")
    if not 1 <= args.rounds <= args.seconds or args.seconds % args.rounds:
        parser.error("--rounds must divide --seconds into whole seconds (wrk's unit)")
    return Options(
        report=args.report,
        seconds=args.seconds,
        rounds=args.rounds,
        warmup=args.warmup,
        connections=args.connections,
        threads=args.threads,
        rate_seconds=args.rate_seconds,
        profile_seconds=args.profile_seconds,
    )


def _plots(directory: Path, results: Results) -> str:
    """SVG plots beside the report (tests/bench/plots.py), and the section that embeds them."""
    directory.mkdir(parents=True, exist_ok=True)
    measured = results.scenarios
    floors = {key: measured[key] for key in ("E2", "E2s") if key in measured}
    throughput = {key: m.load.rate for key, m in measured.items()}
    cpu = {key: m.authz_cpu_us for key, m in measured.items() if m.authz_cpu_us is not None}
    embedded = plots.write(
        directory,
        {
            "throughput": plots.bars(
                "Throughput per scenario (req/s; dashed: the floors E2, E2s)",
                "req/s",
                throughput,
                {k: m.load.rate for k, m in floors.items()},
            ),
            "cpu": plots.bars(
                "Authorizer CPU per request (µs; dashed: the floors)",
                "µs",
                cpu,
                {k: m.authz_cpu_us for k, m in floors.items() if m.authz_cpu_us is not None},
            ),
            "latency": plots.cdf(
                "Latency CDF at the same constant rate (log scale)",
                {key: r.samples for key, r in results.constant.items()},
            ),
        },
    )
    return "\n## Plots\n\n" + "\n\n".join(embedded) + "\n"


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    require("wrk", "`make bench` installs it: apt-get install wrk")
    os.chdir(ROOT)  # the no-op server and ext-authz run as `python -m` from the repository
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ext-authz-bench-") as tmp:
        results = run(options, Path(tmp))
    elapsed = time.monotonic() - started
    report = render(options, results, elapsed) + _plots(options.report.parent, results)
    options.report.parent.mkdir(parents=True, exist_ok=True)
    options.report.write_text(report)
    print(report)
    progress(f"report written to {options.report} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
