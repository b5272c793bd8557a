"""Checks decided in the server's request threads, I/O done on the one asyncio loop.

The decision is written once, as coroutines (``Pipeline.decide``). On its fast path (the keys are
cached, the token is cached or verifies) nothing in it suspends, so a request thread runs it to
completion itself with :func:`drive`: no event loop, no thread switch. The few places that must
wait for I/O (a provider's first key fetch, a refetch for a new ``kid``) await :func:`on_loop`,
which hands that one wait to the loop and blocks the request thread until it is done, within the
Check's deadline; the rest of the decision then goes on in the request thread.

On the loop itself (explain, policy tests, in-process callers) :func:`on_loop` simply awaits.
Anything else that would suspend in a request thread is a bug; it fails that Check closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

from ext_authz import deadlines

T = TypeVar("T")

# The loop's own bound (the fetch timeout, the Check's deadline) ends a wait well before this; it
# only keeps a request thread from waiting forever on a loop that stopped running.
LOOP_SLACK_SECONDS = 5.0
NO_DEADLINE_WAIT_SECONDS = 60.0
# Request threads that may wait for I/O at once (each waiting one is a parked thread).
MAX_WAITING = 256
# Threads besides the deciding ones, for those waiting (for I/O, or stuck: see RequestThreads).
MAX_EXTRA_THREADS = 512
# A thread still on one Check after this long is stuck (a Check on the fast path takes well under
# a millisecond): another one takes its place.
STUCK_SECONDS = 0.2
# A thread beyond the deciding ones that had no work for this long ends.
IDLE_SECONDS = 30.0

_Work = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Handoff:
    """What a request thread's coroutine yields to :func:`drive`: run this on the loop."""

    __slots__ = ("busy", "coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], busy: Exception) -> None:
        self.coroutine = coroutine
        self.busy = busy

    def __await__(self) -> Generator[_Handoff, Any, Any]:
        return (yield self)


async def on_loop(coroutine: Coroutine[Any, Any, T], *, busy: Exception) -> T:
    """Await ``coroutine`` on the asyncio loop, wherever the caller runs. ``busy`` is raised instead
    when too many request threads wait already (see :class:`RequestThreads`)."""
    if asyncio._get_running_loop() is not None:
        return await coroutine
    result: T = await _Handoff(coroutine, busy)
    return result


def drive(coroutine: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop, threads: RequestThreads) -> T:
    """Run ``coroutine`` in this request thread, handing its :func:`on_loop` waits to ``loop``."""
    send: object = None
    error: BaseException | None = None
    while True:
        try:
            yielded = coroutine.send(send) if error is None else coroutine.throw(error)
        except StopIteration as done:
            result: T = done.value
            return result
        send, error = None, None
        if not isinstance(yielded, _Handoff):
            coroutine.close()
            raise RuntimeError(f"a Check awaited {type(yielded).__name__} outside the event loop")
        if not threads.wait_begins():
            yielded.coroutine.close()
            error = yielded.busy
            continue
        try:
            send = _wait(yielded.coroutine, loop, threads.tasks)
        except BaseException as exc:
            error = exc
        finally:
            threads.wait_ends()


def _wait(
    coroutine: Coroutine[Any, Any, Any],
    loop: asyncio.AbstractEventLoop,
    tasks_on_loop: set[asyncio.Task[Any]],
) -> Any:
    # The task runs in a copy of this thread's context: the Check's deadline, its trace span.
    context = contextvars.copy_context()
    outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
    tasks: list[asyncio.Task[Any]] = []

    def start() -> None:
        if not outcome.set_running_or_notify_cancel():
            coroutine.close()
            return
        task = loop.create_task(coroutine, context=context)
        tasks.append(task)
        tasks_on_loop.add(task)
        task.add_done_callback(tasks_on_loop.discard)
        task.add_done_callback(finished)

    def finished(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            outcome.set_exception(TimeoutError("the event loop cancelled the wait"))
        elif (exc := task.exception()) is not None:
            outcome.set_exception(exc)
        else:
            outcome.set_result(task.result())

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # the loop is closed: the server is going away
        coroutine.close()
        raise
    left = deadlines.remaining()
    bound = NO_DEADLINE_WAIT_SECONDS if left is None else max(0.0, left) + LOOP_SLACK_SECONDS
    try:
        return outcome.result(min(bound, threading.TIMEOUT_MAX))
    except concurrent.futures.TimeoutError:
        if not outcome.cancel():  # started: stop the task on the loop
            loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
        raise TimeoutError("the event loop did not answer in time") from None


class RequestThreads(concurrent.futures.Executor):
    """grpc's request threads: about ``threads`` of them decide Checks at any time.

    A thread that cannot go on deciding gives its place to another while it cannot:
    - one that waits for I/O on the loop (:func:`on_loop`) says so; at most ``max_waiting`` wait
      at once (the next Check gets ``busy``, a 503);
    - one still on the same piece of work after ``stuck_seconds`` is counted stuck (grpc's sync
      server reads a call's request message inside the request thread, so a client that opens a
      Check and never sends its message holds a thread; so would anything else that blocks).
    A replacement starts only when work is queued that no idle thread will take. Threads beyond
    ``threads`` end after ``idle_seconds`` without work; at most ``threads + max_extra`` run.

    Only :meth:`submit` is used by grpc's server.
    """

    def __init__(
        self,
        threads: int,
        *,
        max_waiting: int = MAX_WAITING,
        max_extra: int = MAX_EXTRA_THREADS,
        stuck_seconds: float = STUCK_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
        name: str = "check",
    ) -> None:
        self._target = threads
        self._max_threads = threads + max_extra
        self._max_waiting = max_waiting
        self._stuck_seconds = stuck_seconds
        self._idle_seconds = idle_seconds
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work
        self._queued = 0  # work not taken yet
        self._waiting = 0  # threads waiting for I/O
        self._running: dict[int, float] = {}  # thread ident -> when it took its current work
        self._stuck: set[int] = set()
        self._started = 0
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self.tasks: set[asyncio.Task[Any]] = set()  # the waits handed to the loop (loop's side only)

    # ---- grpc's side ----

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the request threads have shut down")
            self._work.put((future, fn, args, kwargs))
            self._queued += 1
            self._replace()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name=f"{self._name}-watchdog", daemon=True
                )
                self._watchdog.start()
        return future

    def _replace(self) -> None:
        """Start a thread if queued work would otherwise wait for fewer than ``threads`` deciding
        ones. With the lock held."""
        deciding = len(self._threads) - self._waiting - len(self._stuck)
        if self._queued > self._idle and deciding < self._target and len(self._threads) < self._max_threads:
            self._started += 1
            thread = threading.Thread(target=self._serve, name=f"{self._name}-{self._started}", daemon=True)
            self._threads.add(thread)
            thread.start()

    def _serve(self) -> None:
        me = threading.get_ident()
        lock, running, work_queue = self._lock, self._running, self._work
        with lock:
            self._idle += 1
        while True:
            try:
                work = work_queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with lock:
                    if len(self._threads) > self._target or self._closed:
                        self._idle -= 1
                        self._threads.discard(threading.current_thread())
                        return
                continue
            if work is None:
                with lock:
                    self._idle -= 1
                    self._threads.discard(threading.current_thread())
                return
            with lock:
                self._idle -= 1
                self._queued -= 1
                running[me] = time.monotonic()
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del work, future, fn, args, kwargs
            with lock:
                del running[me]
                self._stuck.discard(me)
                self._idle += 1

    def _watch(self) -> None:
        interval = self._stuck_seconds / 2
        while not self._stopping.wait(interval):
            with self._lock:
                now = time.monotonic()
                for ident, since in self._running.items():
                    if now - since > self._stuck_seconds and ident not in self._stuck:
                        self._stuck.add(ident)
                        self._replace()

    # ---- the request's side (drive) ----

    def wait_begins(self) -> bool:
        """The calling request thread is about to wait for I/O; False: too many wait already."""
        with self._lock:
            if self._waiting >= self._max_waiting:
                return False
            self._waiting += 1
            self._replace()
            return True

    def wait_ends(self) -> None:
        with self._lock:
            self._waiting -= 1

    # ---- inspection and shutdown ----

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def alive(self) -> int:
        return len(self._threads)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        self.close()
        if wait:
            self.join(None)

    def close(self) -> None:
        """Take no more work; every thread ends once the work before it is done. Once is enough:
        later calls change nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        self._stopping.set()
        for _ in threads:
            self._work.put(None)

    def cancel_waits(self) -> None:
        """On the loop: end every wait handed to it (the server has stopped answering)."""
        for task in list(self.tasks):
            task.cancel()

    def join(self, timeout: float | None) -> bool:
        """Wait (at most ``timeout`` seconds in all) until every thread has ended; False if not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)
