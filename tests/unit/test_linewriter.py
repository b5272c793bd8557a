"""The line writer: a Check queues its line; a thread writes them in batches, in order, all of them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

from ext_authz.config.model import LogSettings
from ext_authz.decisionlog import DecisionLog
from ext_authz.linewriter import LineWriter
from ext_authz.model import Allow, Request


class Recording(io.StringIO):
    """A stream that counts its writes and flushes (and can be slow, or fail)."""

    def __init__(self, delay: float = 0.0, fail: int = 0) -> None:
        super().__init__()
        self.writes = self.flushes = 0
        self.delay, self.fail = delay, fail

    def write(self, text: str) -> int:
        self.writes += 1
        if self.fail:
            self.fail -= 1
            raise BrokenPipeError("the reader went away")
        time.sleep(self.delay)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


def test_every_line_arrives_in_order_from_one_thread() -> None:
    out = Recording()
    writer = LineWriter(out)
    for i in range(5000):
        writer.write(f"{i}\n")
    assert writer.flush()
    assert out.getvalue().splitlines() == [str(i) for i in range(5000)]


def test_a_slow_stream_gets_batches_not_a_write_per_line() -> None:
    out = Recording(delay=0.01)
    writer = LineWriter(out)
    for i in range(2000):
        writer.write(f"{i}\n")
    assert writer.flush()
    assert len(out.getvalue().splitlines()) == 2000
    assert out.writes < 100 and out.flushes == out.writes


def test_lines_from_many_threads_are_all_written_whole() -> None:
    out = Recording()
    writer = LineWriter(out)

    def produce(t: int) -> None:
        for i in range(2000):
            writer.write(f"{t}:{i}\n")

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 16000
    for t in range(8):  # each thread's lines, in its order
        assert [line for line in lines if line.startswith(f"{t}:")] == [f"{t}:{i}" for i in range(2000)]


def test_flush_waits_only_for_what_was_queued_before_it() -> None:
    out = Recording(delay=0.05)
    writer = LineWriter(out)
    writer.write("first\n")
    assert writer.flush()
    assert out.getvalue() == "first\n"


def test_a_failing_stream_costs_that_batch_never_the_caller() -> None:
    out = Recording(fail=1)
    writer = LineWriter(out)
    writer.write("lost\n")  # the stream raises on this batch
    assert writer.flush()
    writer.write("kept\n")
    assert writer.flush()
    assert out.getvalue() == "kept\n" and writer.failed_batches == 1


def test_an_idle_writer_writes_a_line_at_once() -> None:
    out = Recording()
    writer = LineWriter(out)
    writer.write("now\n")
    deadline = time.monotonic() + 2
    while out.getvalue() != "now\n" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert out.getvalue() == "now\n"  # without a flush: no timer holds it back


def test_the_decision_log_queues_its_line_on_the_writer() -> None:
    out = Recording()
    writer = LineWriter(out)
    log = DecisionLog(LogSettings(), writer=writer)
    log.record(Request("GET", "/x", host="h"), "r1", Allow(rule="r", provider="idp", subject="s"), 5)
    assert writer.flush()
    (entry,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (entry["request_id"], entry["decision"], entry["latency_us"]) == ("r1", "allow", 5)
    assert entry["ts"].endswith("Z") and len(entry["ts"]) == len("2026-01-01T00:00:00.000Z")


def test_lines_queued_before_exit_reach_stdout() -> None:
    # The process's stdout writer is flushed at exit: a line queued just before is not lost.
    script = (
        "from ext_authz.linewriter import stdout_writer\n"
        "w = stdout_writer()\n"
        "for i in range(20000): w.write(f'{i}\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(i) for i in range(20000)]
