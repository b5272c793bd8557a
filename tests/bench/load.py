"""Load generators: wrk for closed-loop maximum throughput, h2load for a constant request rate.

wrk (a fixed number of connections, each sending its next request when the previous answer
arrives) finds the maximum rate and its latency. A Lua script prints wrk's summary as JSON; with a
token file, each wrk thread walks its own share of the tokens round-robin (thread ``t`` of ``n``
takes tokens ``t, t+n, t+2n, ...`` from an offset), so every token comes back only after all the others.

wrk2 (constant rate with coordinated-omission correction) is not packaged by Debian. h2load's
``--rps`` paces each connection at a fixed rate instead; its per-request log gives the latency
percentiles. A late answer delays that connection's next request, so latency is measured from the
moment a request is sent, not from when it was due (no coordinated-omission correction); far below
saturation, as here, the two agree.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.bench.procs import BenchError

_WRK_SCRIPT = r"""
local threads_made = 0
function setup(thread)
  thread:set("thread_id", threads_made)
  threads_made = threads_made + 1
end

local tokens = nil
local index = 1
local step = 1

function init(args)
  if args[1] ~= nil and args[1] ~= "" then
    tokens = {}
    for line in io.lines(args[1]) do
      if line ~= "" then tokens[#tokens + 1] = line end
    end
    step = tonumber(args[2])
    index = ((tonumber(args[3]) + thread_id) % #tokens) + 1
  end
end

if os.getenv("WRK_TOKEN_FILE") ~= nil then
  function request()
    local token = tokens[index]
    index = ((index - 1 + step) % #tokens) + 1
    return wrk.format(nil, nil, {["Host"] = wrk.host, ["Authorization"] = "Bearer " .. token})
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    errors: int  # connection errors, timeouts and non-2xx/3xx answers
    p50_us: float
    p99_us: float
    # Per-request latencies in µs, sorted, when the tool gives them (h2load), so runs can be merged.
    samples: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def merged(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs as one: counts and times add up; percentiles over every sample."""
    samples = tuple(sorted(v for r in results for v in r.samples))
    if not samples:
        raise BenchError("no per-request samples to merge")
    return LoadResult(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        errors=sum(r.errors for r in results),
        p50_us=percentile(samples, 0.50),
        p99_us=percentile(samples, 0.99),
        samples=samples,
    )


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    token: str | None = None,
    token_file: Path | None = None,
    token_offset: int = 0,
    timeout: float = 5.0,
) -> LoadResult:
    """One closed-loop wrk run; either one ``token`` for every request or a ``token_file``, whose
    tokens are taken from ``token_offset`` on (a multiple of ``threads`` keeps each thread's share)."""
    with tempfile.TemporaryDirectory(prefix="ext-authz-wrk-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(_WRK_SCRIPT)
        # wrk takes whole seconds only.
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, math.ceil(seconds))}s"]
        argv += ["--timeout", f"{timeout:g}s", "-s", str(script)]
        env = None
        if token is not None:
            argv += ["-H", f"Authorization: Bearer {token}"]
        argv.append(url)
        if token_file is not None:
            argv += ["--", str(token_file), str(threads), str(token_offset)]
            # Read when the script loads: wrk decides then whether requests are built per call.
            env = {**os.environ, "WRK_TOKEN_FILE": "1"}
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 60, check=False, env=env
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("WRK_JSON ")]
    if completed.returncode != 0 or not lines:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stdout}\n{completed.stderr}")
    summary = json.loads(lines[-1].removeprefix("WRK_JSON "))
    errors = sum(int(summary[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        requests=int(summary["requests"]),
        seconds=int(summary["duration_us"]) / 1e6,
        errors=errors,
        p50_us=float(summary["p50_us"]),
        p99_us=float(summary["p99_us"]),
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise BenchError("no samples")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def constant_rate(
    url: str,
    *,
    rate: float,
    seconds: float,
    connections: int,
    token: str,
    warmup: float = 1.0,
) -> LoadResult:
    """HTTP/1.1 requests at ``rate`` per second in total, spread evenly over ``connections``."""
    per_connection = max(1, round(rate / connections))
    with tempfile.TemporaryDirectory(prefix="ext-authz-h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        argv = [
            "h2load",
            "--h1",
            "-c",
            str(connections),
            "-t",
            "1",
            "-m",
            "1",
            "--rps",
            str(per_connection),
            "-D",
            f"{seconds:g}",
            "--warm-up-time",
            f"{warmup:g}",
            "-H",
            f"authorization: Bearer {token}",
            "--log-file",
            str(log),
            url,
        ]
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + warmup + 60, check=False
        )
        if completed.returncode != 0 or not log.exists():
            raise BenchError(
                f"h2load failed ({completed.returncode}): {completed.stdout}\n{completed.stderr}"
            )
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    starts = [int(r[0]) for r in rows]
    durations = sorted(float(r[2]) for r in rows)
    failed = sum(1 for r in rows if not r[1].startswith("2"))
    span = (max(starts) - min(starts)) / 1e6 if len(starts) > 1 else seconds
    return LoadResult(
        requests=len(rows),
        seconds=span or seconds,
        errors=failed,
        p50_us=percentile(durations, 0.50),
        p99_us=percentile(durations, 0.99),
        samples=tuple(durations),
    )
