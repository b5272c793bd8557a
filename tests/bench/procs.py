"""Processes for the benchmark, and what /proc says about them (CPU time, resident size).

A benchmark process writes its output to files, not to a pipe: no thread of ours has to read
Envoy's or ext-authz's output while the load runs, so the only CPU spent on it is theirs. Every
process leads its own session and is stopped with SIGTERM, then SIGKILL to its whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 5.0


class BenchError(RuntimeError):
    """A process died, did not become ready in time, or a measurement is unusable."""


class BenchProcess:
    """A subprocess whose standard error goes to ``log`` and standard output to ``stdout_path``
    (``None``: discarded)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        stdout_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with contextlib.ExitStack() as files:
            err = files.enter_context(log.open("wb"))
            out = (
                files.enter_context(stdout_path.open("wb")) if stdout_path is not None else subprocess.DEVNULL
            )
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> BenchError:
        code = self.popen.poll()
        state = "running" if code is None else f"exited with {code}"
        return BenchError(
            f"{self.name} {what} ({state}); argv={self.argv}\n--- last output ---\n{self.tail()}"
        )

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise self.fail("is not running")

    def json_lines(self) -> list[dict[str, object]]:
        """The JSON-object lines of the log so far (structured logs: one object a line)."""
        records = []
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    records.append(value)
        return records

    def wait_for(
        self, found: Callable[[list[dict[str, object]]], object], *, timeout: float, what: str
    ) -> object:
        """Poll the log until ``found`` returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            result = found(self.json_lines())
            if result:
                return result
            self.check_alive()
            if time.monotonic() >= deadline:
                raise self.fail(f"not {what} within {timeout:g}s")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=STOP_GRACE)
        return self.popen.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def events(records: Iterable[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [r for r in records if r.get("event") == event]


# ---- /proc ----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of the process so far (stat fields 14 and 15)."""
    fields = _stat_fields(pid)
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (by their parent id), in pid order."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def rss_mib(pid: int) -> float:
    """VmRSS of the process from /proc/PID/status, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds per pid at one moment: a process and its children, taken together."""

    seconds: dict[int, float]

    @classmethod
    def of(cls, pids: Iterable[int]) -> CpuSnapshot:
        return cls({pid: cpu_seconds(pid) for pid in pids})

    def minus(self, before: CpuSnapshot) -> dict[int, float]:
        """Seconds used since ``before``, per pid; every pid must be in both."""
        missing = set(self.seconds) ^ set(before.seconds)
        if missing:
            raise BenchError(f"processes came or went during a measurement: {sorted(missing)}")
        return {pid: self.seconds[pid] - before.seconds[pid] for pid in self.seconds}
