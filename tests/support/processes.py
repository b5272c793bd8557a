"""Run a subprocess for a test: bounded readiness wait, background drain, guaranteed stop.

A process started here always has its output drained on a daemon thread (a full pipe would
otherwise block it), keeps its last lines for error messages, and is stopped with SIGTERM and,
after a grace period, SIGKILL. Every wait has a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from tests.support.lifecycle import StopOnExit

TAIL_LINES = 200
DEFAULT_READY_TIMEOUT = 20.0
DEFAULT_STOP_GRACE = 5.0


class ProcessError(RuntimeError):
    """A managed process died, or did not become ready in time."""


def venv_python() -> str:
    """The interpreter running the tests; the project is installed into its environment."""
    return sys.executable


def venv_binary(name: str) -> Path:
    """A console script installed next to the test interpreter (e.g. `envoy`, `ext-authz`)."""
    return Path(sys.executable).parent / name


class ManagedProcess(StopOnExit):
    """A subprocess whose merged stdout+stderr is read line by line on a background thread.

    With ``separate_stdout=True`` standard output is read on a thread of its own into a buffer of
    its own (``stdout_lines``, ``wait_for_stdout``), and the tail, ``output_lines`` and
    ``wait_for_line`` see standard error alone. ``keep_lines`` bounds each buffer.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        separate_stdout: bool = False,
        keep_lines: int = TAIL_LINES,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.separate_stdout = separate_stdout
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._all_seen = 0
        self._cond = threading.Condition()
        self._eof = False
        self._stdout: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._stdout_eof = not separate_stdout
        full_env = dict(os.environ)
        if env is not None:
            full_env.update(env)
        self.popen: subprocess.Popen[str] = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if separate_stdout else subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        output = self.popen.stderr if separate_stdout else self.popen.stdout
        assert output is not None
        self._reader = threading.Thread(target=self._drain, args=(output,), name=f"drain-{name}", daemon=True)
        self._reader.start()
        self._stdout_reader: threading.Thread | None = None
        if separate_stdout:
            self._stdout_reader = threading.Thread(
                target=self._drain_stdout, args=(self.popen.stdout,), name=f"drain-{name}-stdout", daemon=True
            )
            self._stdout_reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _drain(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._cond:
                    self._lines.append(line.rstrip("\n"))
                    self._all_seen += 1
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _drain_stdout(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._cond:
                    self._stdout.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._stdout_eof = True
                self._cond.notify_all()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            lines = list(self._lines)[-n:]
        return "\n".join(lines)

    def output_lines(self) -> list[str]:
        """Every output line still kept (standard error alone with ``separate_stdout``)."""
        with self._cond:
            return list(self._lines)

    def _require_separate_stdout(self) -> None:
        if not self.separate_stdout:
            raise ValueError(f"{self.name}: standard output is merged with standard error")

    def stdout_lines(self) -> list[str]:
        """Every standard output line still kept; only with ``separate_stdout``."""
        self._require_separate_stdout()
        with self._cond:
            return list(self._stdout)

    def wait_for_stdout(
        self, condition: Callable[[list[str]], bool], *, timeout: float, what: str
    ) -> list[str]:
        """Wait until `condition` holds for the standard output lines kept; return them.

        Raises ProcessError if standard output ends or the deadline passes first.
        """
        self._require_separate_stdout()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                lines = list(self._stdout)
                if condition(lines):
                    return lines
                if self._stdout_eof:
                    raise ProcessError(self.describe_failure(f"closed its standard output before {what}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessError(self.describe_failure(f"not {what} within {timeout:g}s"))
                self._cond.wait(remaining)

    def describe_failure(self, what: str) -> str:
        code = self.popen.poll()
        state = "still running" if code is None else f"exited with {code}"
        text = f"{self.name} {what} ({state}); argv={list(self.argv)}\n--- last output ---\n{self.tail()}"
        if self.separate_stdout:
            with self._cond:
                stdout = list(self._stdout)[-20:]
            text += "\n--- last standard output ---\n" + "\n".join(stdout)
        return text

    def wait_for_line(self, predicate: Callable[[str], bool], *, timeout: float, what: str) -> str:
        """Return the first line (already seen or future) matching `predicate`.

        Raises ProcessError if the process exits or the deadline passes first.
        """
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            while True:
                # Lines older than the tail window are gone; readiness lines come early, and
                # TAIL_LINES is far larger than any startup chatter we expect.
                lines = list(self._lines)
                start = max(0, len(lines) - (self._all_seen - checked))
                for line in lines[start:]:
                    if predicate(line):
                        return line
                checked = self._all_seen
                if self._eof:
                    raise ProcessError(self.describe_failure(f"exited before {what}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessError(self.describe_failure(f"not {what} within {timeout:g}s"))
                self._cond.wait(remaining)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            self._reader.join(timeout=1.0)
            raise ProcessError(self.describe_failure("is not running"))

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # The child leads its own session (start_new_session), so its process group is
                # exactly it and whatever it forked (e.g. worker processes): kill them all.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=grace)
        self._reader.join(timeout=2.0)
        if self._stdout_reader is not None:
            self._stdout_reader.join(timeout=2.0)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        return self.popen.returncode


def json_log_line(line: str) -> dict[str, object] | None:
    """Parse one log line as a JSON object; None for anything else (tracebacks, banners)."""
    stripped = line.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class ExtAuthzProcess(StopOnExit):
    """The real `python -m ext_authz serve` process, ready to answer Check calls."""

    def __init__(self, process: ManagedProcess, address: str) -> None:
        self.process = process
        self.address = address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def logged_address(self, event: str, key: str = "address", *, timeout: float = 20.0) -> str:
        """An address the server logged: ``key`` of its first ``event`` line ("admin listening",
        "http listening"; a supervisor's "supervising" line has its ``admin``)."""
        marker = f'"event": "{event}"'
        line = self.process.wait_for_line(lambda text: marker in text, timeout=timeout, what=event)
        record = json_log_line(line)
        assert record is not None and isinstance(record.get(key), str), line
        return str(record[key])

    def stop(self) -> int:
        return self.process.stop()


def start_ext_authz(
    config: Path,
    *,
    listen: str = "127.0.0.1:0",
    timeout: float = DEFAULT_READY_TIMEOUT,
    extra_args: Sequence[str] = (),
    drain_seconds: float | None = 0,
    separate_stdout: bool = False,
    keep_lines: int = TAIL_LINES,
) -> ExtAuthzProcess:
    """Start the server and wait for its `"event": "serving"` log line; return its address.

    ``drain_seconds`` overrides the config's shutdown drain (0 by default: in most tests nothing
    needs time to stop sending, and a stop should be quick); None keeps the config's value.
    ``separate_stdout`` keeps the decision log (standard output) apart from the log lines
    (standard error); see ManagedProcess.
    """
    argv = [venv_python(), "-m", "ext_authz", "serve", "--config", str(config), "--listen", listen]
    if drain_seconds is not None:
        argv += ["--drain-seconds", str(drain_seconds)]
    argv.extend(extra_args)
    process = ManagedProcess(
        "ext-authz",
        argv,
        env={"PYTHONUNBUFFERED": "1"},
        separate_stdout=separate_stdout,
        keep_lines=keep_lines,
    )
    try:
        line = process.wait_for_line(_is_serving, timeout=timeout, what="serving")
        record = json_log_line(line)
        assert record is not None
        address = record.get("address")
        if not isinstance(address, str) or ":" not in address:
            raise ProcessError(process.describe_failure(f"logged a serving line without an address: {line}"))
    except BaseException:
        process.stop()
        raise
    return ExtAuthzProcess(process, address)


def _is_serving(line: str) -> bool:
    record = json_log_line(line)
    return record is not None and record.get("event") == "serving"
