"""REPORT.md for the soak, with SVG plots beside it (written by hand, like tests/bench/plots.py):
throughput, latency percentiles, RSS and open FDs per process, answers by status over time; the
fault windows shaded in each."""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tests.bench.plots import CURVES, _line, _svg, _text
from tests.soak.faults import Window
from tests.soak.stack import RETRY_POLICY, STATUS_ON_ERROR

if TYPE_CHECKING:
    from tests.soak.run import Run

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 150, 30, 40
SHADES = {
    "idp down": "#f4a3a3",
    "idp slow": "#f9d7a0",
    "redis restart": "#b5d3f2",
    "redis paused": "#c9b5f2",
    "worker SIGKILL": "#999999",
}
MARKS = {"rotation": "#2ca02c", "reload": "#1f77b4", "reload (invalid)": "#d62728"}

Series = Mapping[str, Sequence[tuple[float, float]]]


def timeseries(title: str, unit: str, series: Series, windows: Sequence[Window], end: float) -> str:
    """Lines over time (seconds since the start), fault windows shaded behind them."""
    values = [y for points in series.values() for _, y in points]
    top = max(values, default=1.0) * 1.1 or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + plot_w * min(max(t / end, 0.0), 1.0)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    body: list[str] = []
    for window in windows:
        if window.kind in SHADES:
            width = max(x(window.end) - x(window.start), 1.5)
            body.append(
                f'<rect x="{x(window.start):.1f}" y="{TOP}" width="{width:.1f}" height="{plot_h}" '
                f'fill="{SHADES[window.kind]}" opacity="0.5"><title>{html.escape(window.kind)}</title></rect>'
            )
        elif window.kind in MARKS:
            body.append(
                _line(x(window.start), TOP + plot_h - 6, x(window.start), TOP + plot_h, MARKS[window.kind])
            )
    body.append(_line(LEFT, TOP + plot_h, LEFT + plot_w, TOP + plot_h, "#000"))
    body.append(_line(LEFT, TOP, LEFT, TOP + plot_h, "#000"))
    for i in range(5):
        value = top * i / 4
        body.append(_text(LEFT - 6, y(value) + 4, f"{value:.3g}", anchor="end"))
        body.append(_line(LEFT, y(value), LEFT + plot_w, y(value), "#ddd"))
    step = _nice(end / 6)
    t = 0.0
    while t <= end:
        body.append(_text(x(t), TOP + plot_h + 16, f"{t:g}", anchor="middle"))
        t += step
    body.append(_text(LEFT + plot_w / 2, HEIGHT - 6, "seconds since start", anchor="middle"))
    body.append(_text(12, TOP - 10, unit))
    for i, (name, points) in enumerate(series.items()):
        colour = CURVES[i % len(CURVES)] if i < len(CURVES) else f"hsl({i * 67 % 360},60%,40%)"
        if points:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.3" points="{path}"/>')
        body.append(_text(WIDTH - RIGHT + 8, TOP + 14 * i + 10, name, fill=colour))
    legend = TOP + 14 * len(series) + 16
    for j, (kind, colour) in enumerate({**SHADES, **MARKS}.items()):
        body.append(
            f'<rect x="{WIDTH - RIGHT + 8}" y="{legend + 13 * j}" width="10" height="9" fill="{colour}"/>'
        )
        body.append(_text(WIDTH - RIGHT + 22, legend + 13 * j + 9, kind))
    return _svg(WIDTH, HEIGHT, body, title)


def _nice(raw: float) -> float:
    if raw <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    return float(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def plots(run: Run) -> dict[str, str]:
    end = max(run.load_stopped_at, 1.0)
    per_second: dict[int, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    for outcome in run.outcomes:
        second = int(outcome.sent)
        per_second[second].append(outcome.latency * 1000)
        label = "no answer" if outcome.status == 0 else str(outcome.status)
        statuses[label][second] += 1
    seconds = sorted(per_second)
    throughput = {"answers/s": [(s + 0.5, float(len(per_second[s]))) for s in seconds]}
    latency = {
        "p50": [(s + 0.5, _percentile(per_second[s], 0.5)) for s in seconds],
        "p99": [(s + 0.5, _percentile(per_second[s], 0.99)) for s in seconds],
    }
    by_status = {
        f"HTTP {label}": [(s + 0.5, float(counts.get(s, 0))) for s in seconds]
        for label, counts in sorted(statuses.items())
    }
    rss: dict[str, list[tuple[float, float]]] = defaultdict(list)
    fds: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sample in run.samples:
        name = f"{sample.role} {sample.pid}"
        rss[name].append((sample.at, sample.rss_mib))
        fds[name].append((sample.at, float(sample.fds)))
    w = run.windows
    return {
        "soak-throughput": timeseries("Throughput (answers per second)", "1/s", throughput, w, end),
        "soak-latency": timeseries("Latency percentiles per second", "ms", latency, w, end),
        "soak-status": timeseries("Answers by status per second", "1/s", by_status, w, end),
        "soak-rss": timeseries("RSS per ext-authz process", "MiB", rss, w, end),
        "soak-fds": timeseries("Open file descriptors per ext-authz process", "FDs", fds, w, end),
    }


def write_report(run: Run, path: Path) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    embedded = []
    for name, svg in plots(run).items():
        (directory / f"{name}.svg").write_text(svg)
        embedded.append(f"![{name}]({name}.svg)")
    v = run.verdict
    mode = "short (faults compressed)" if run.short else "long (the issue's schedule)"
    lines = [
        "# Soak report (issue 18)",
        "",
        f"Written by `python -m tests.soak.run --seconds {run.seconds:g}{' --short' if run.short else ''}`"
        f" (`make soak`). Mode: {mode}. Wall time {run.wall_seconds:.0f} s.",
        "",
        f"**Verdict: {'CLEAN' if run.clean else 'NOT CLEAN'}.**",
        "",
        "| check | measured | limit | |",
        "|---|---|---|---|",
        *(
            f"| {line.name} | {line.value} | {line.limit} | {'ok' if line.ok else '**FAIL**'} |"
            for line in run.lines
        ),
        "",
        "## Load",
        "",
        f"Closed-loop maximum of the generator against the stack: **{run.max_rate:.0f} answers/s**;"
        f" the run's fixed rate: **{run.rate:.0f}/s** (half), on 8 keep-alive connections, plus 2 browser"
        f" sessions. {v.total} answers judged.",
        "",
        "| kind | requests | must get |",
        "|---|---|---|",
        *(f"| {kind} | {n} | {MUST.get(kind, '')} |" for kind, n in sorted(v.by_kind.items())),
        "",
        "Answers by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(v.by_status.items())) + ".",
        "",
        "## Plots",
        "",
        "Shaded: IdP down (red), IdP slow (orange), Redis restart (blue), Redis paused (violet), worker"
        " SIGKILL (grey); ticks on the axis: key rotations (green), reloads (blue), invalid reloads (red).",
        "",
        *embedded,
        "",
        "## Faults",
        "",
        "| kind | start (s) | end (s) | detail |",
        "|---|---|---|---|",
        *(f"| {w.kind} | {w.start:.1f} | {w.end:.1f} | {w.detail} |" for w in run.windows),
        f"| SIGTERM of the supervisor | {run.sigterm_at:.1f} | {run.load_stopped_at:.1f} | load stopped at"
        f" the drain's end; exit code {run.exit_code} |",
        "",
        "Killed workers: "
        + (", ".join(f"pid {pid} at {at:.1f} s, replaced after {r:.2f} s" if r is not None
                     else f"pid {pid} at {at:.1f} s, NOT replaced" for at, pid, r in run.kills) or "none")
        + ".",
        "",
        "## Envoy's retry of a Check on a reset stream",
        "",
        f"`GrpcService.retry_policy` = `{RETRY_POLICY}` on the ext_authz filter's gRPC service:"
        f" `envoy --mode validate` {'accepts' if run.retry_validates[0] else 'REJECTS'} it"
        f" ({run.retry_validates[1].splitlines()[-1] if run.retry_validates[1] else ''});"
        f" {'used' if run.retry else 'NOT used'} in this run. Answers {STATUS_ON_ERROR}"
        f" (`status_on_error`) inside SIGKILL windows: {len(v.status_on_error_kill)};"
        f" outside: {len(v.status_on_error)}.",
        "Envoy stats: " + ", ".join(f"`{k}` {n}" for k, n in sorted(run.envoy_stats.items()) if n) + ".",
        "",
        "## Resources (median of the first vs the last fifth after warm-up, per process)",
        "",
        "| process | measure | early | late | growth |",
        "|---|---|---|---|---|",
        *(f"| {who} | {what} | {early:.1f} | {late:.1f} | {ratio * 100:+.1f} % |"
          for who, what, early, late, ratio in run.growth),
        "",
        "## IdP requests",
        "",
        "Bound per JWT provider, in requests (each fetch reads discovery and JWKS): 2 x (routine refreshes,"
        " one per interval across the fleet + unknown-kid refetches, one per refetch interval per worker +"
        " per Redis fault, each worker refreshing itself for the 5 s Redis is left alone + per IdP outage,"
        " each worker's backoff retries + one per worker restart). See `idp_bound` in tests/soak/run.py.",
        "",
        *(
            f"- provider {name}: {n} requests, bound {run.idp_bounds.get(name)}"
            for name, n in run.idp_requests.items()
        ),
        "",
        "## Configuration",
        "",
        f"Key cache: {run.timings}. Schedule: {run.schedule}.",
        "",
        "ext-authz (variant a; variant b renames the rules and adds one no request matches):",
        "",
        "```yaml",
        run.config_text.rstrip(),
        "```",
        "",
    ]  # fmt: skip
    path.write_text("\n".join(lines))


MUST = {
    "rs_cached": "200, x-user-id rs-cached (RS256, reused token)",
    "es_cached": "200, x-user-id es-cached (ES256, reused token)",
    "rs_new": "200, its own x-user-id (RS256, minted per request)",
    "es_new": "200, its own x-user-id (ES256, minted per request)",
    "retired": "200 while its key is published; 401 allowed after removal",
    "expired": "401",
    "forged": "401 (ES256 kid of the IdP, signed by another key)",
    "wrong_aud": "401",
    "no_token": "401",
    "anonymous": "200 (anonymous route)",
    "denied_rule": "403 (rule requires group admin)",
    "sign_in": "the whole flow; 200 at the end with the user's x-user-id",
    "session": "200 with the user's x-user-id (refreshed on the way)",
}
