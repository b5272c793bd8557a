"""Lines written by a thread of their own, in batches: a Check only queues its line.

A Check that wrote and flushed its decision line itself paid a system call per request. Here the
request thread appends the line to a queue (thread-safe, no lock held across I/O) and wakes the
writer if it sleeps; the writer takes everything queued, writes it in one call and flushes, then
pauses ``PAUSE_SECONDS`` (5 ms) before it looks again, so under load a batch holds what a pause
gathered and request threads do not wake it line by line; when idle a line reaches the stream at
once. :meth:`flush` waits until every line queued before it has
been written (the server calls it when it stops, and at exit); a crash loses only the lines still
in the queue, which the writer empties as fast as the stream takes them.

A stream that fails (a closed pipe, a full disk, no standard output at all) costs the lines of
that batch, never the Check: the failure is counted and the writer goes on. A stream that blocks
(a log reader that stopped reading) holds at most ``max_lines`` queued lines; lines beyond that
are dropped and counted, so memory stays bounded and Checks never wait for the log.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections import deque
from typing import TextIO

# After a batch, how long lines may gather before the next one: at most this long in the queue
# under load (one write and one wake-up per pause instead of one per line).
PAUSE_SECONDS = 0.005


class LineWriter:
    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        name: str = "line-writer",
        max_lines: int = 100_000,
        pause_seconds: float = PAUSE_SECONDS,
    ) -> None:
        self._stream = stream  # None: sys.stdout as it is when a batch is written
        self._queue: deque[str | threading.Event] = deque()
        self._wake = threading.Event()
        self._max_lines = max_lines
        self._pause = pause_seconds
        self.failed_batches = 0
        self.dropped_lines = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """Queue ``line`` (ending in a newline) to be written; never blocks on the stream."""
        if len(self._queue) >= self._max_lines:
            self.dropped_lines += 1  # the stream stopped taking lines: memory stays bounded
            return
        self._queue.append(line)
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line queued so far is written and flushed. False on timeout."""
        done = threading.Event()
        self._queue.append(done)
        self._wake.set()
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            try:
                self._drain()
            except Exception:  # never let the writer thread end
                self.failed_batches += 1

    def _drain(self) -> None:
        queue, wake = self._queue, self._wake
        while True:
            wake.wait()
            # Cleared before the queue is emptied: a line queued after this is seen either by
            # the drain below or, since the flag is then clear, wakes the next round.
            wake.clear()
            if not queue:
                continue
            self._write_queued()
            # Lines came: under load more follow. Let them gather for a moment (the flag stays set
            # meanwhile, so request threads do not wake this thread line by line); then look
            # again, and sleep on the flag once a look finds nothing.
            wake.set()
            time.sleep(self._pause)

    def _write_queued(self) -> None:
        queue = self._queue
        while queue:
            batch: list[str] = []
            flushed: list[threading.Event] = []
            while queue:
                item = queue.popleft()
                if isinstance(item, str):
                    batch.append(item)
                else:
                    flushed.append(item)
                    break  # what was queued before the flush request goes out first
            self._write("".join(batch))
            for done in flushed:
                done.set()

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            stream = self._stream or sys.stdout  # None when the process has no standard output
            stream.write(text)
            stream.flush()
        except Exception:  # a closed pipe, a closed stream, no stream: lines lost, counted
            self.failed_batches += 1


_stdout: LineWriter | None = None
_stdout_lock = threading.Lock()


def stdout_writer() -> LineWriter:
    """The process's writer to standard output (started on first use, flushed at exit)."""
    global _stdout
    with _stdout_lock:
        if _stdout is None:
            _stdout = LineWriter(name="stdout-writer")
            atexit.register(_stdout.flush)
        return _stdout


def stdout_stats() -> tuple[int, int]:
    """(failed batches, dropped lines) of the standard-output writer; zeros if none started."""
    if _stdout is None:
        return 0, 0
    return _stdout.failed_batches, _stdout.dropped_lines


def flush_stdout(timeout: float = 5.0) -> None:
    """Flush the standard-output writer if one was started."""
    if _stdout is not None:
        _stdout.flush(timeout)
