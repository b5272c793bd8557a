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
            send = _wait(yielded.coroutine, loop)
        except BaseException as exc:
            error = exc
        finally:
            threads.wait_ends()


def _wait(coroutine: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> Any:
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
    try:
        return outcome.result(NO_DEADLINE_WAIT_SECONDS if left is None else left + LOOP_SLACK_SECONDS)
    except concurrent.futures.TimeoutError:
        if not outcome.cancel():  # started: stop the task on the loop
            loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
        raise TimeoutError("the event loop did not answer in time") from None


class RequestThreads(concurrent.futures.Executor):
    """grpc's request threads: ``threads`` of them decide Checks. One that must wait for I/O gives
    its place to a new thread while it waits, so that Checks on the fast path never queue behind a
    slow IdP; at most ``max_waiting`` wait at once (the next would get ``busy``, a 503).

    Only :meth:`submit` is used by grpc's server; threads are started as work arrives and a thread
    back from a wait leaves once the others are enough again.
    """

    def __init__(self, threads: int, *, max_waiting: int = MAX_WAITING, name: str = "check") -> None:
        self._target = threads
        self._max_waiting = max_waiting
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._deciding = 0  # threads taking work, not counting those waiting for I/O
        self._waiting = 0
        self._started = 0
        self._closed = False
        self._threads: set[threading.Thread] = set()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the request threads have shut down")
            self._work.put((future, fn, args, kwargs))
            if self._deciding < self._target:
                self._start()
        return future

    def _start(self) -> None:  # with the lock held
        self._deciding += 1
        self._started += 1
        thread = threading.Thread(target=self._serve, name=f"{self._name}-{self._started}", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args, kwargs = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del work, future, fn, args, kwargs
            with self._lock:
                if self._deciding > self._target:  # back from a wait while another took its place
                    self._deciding -= 1
                    self._threads.discard(threading.current_thread())
                    return
        with self._lock:
            self._deciding -= 1
            self._threads.discard(threading.current_thread())

    def wait_begins(self) -> bool:
        """The calling request thread is about to wait for I/O; False: too many wait already."""
        with self._lock:
            if self._waiting >= self._max_waiting:
                return False
            self._waiting += 1
            self._deciding -= 1
            if self._deciding < self._target and not self._closed:
                self._start()
            return True

    def wait_ends(self) -> None:
        with self._lock:
            self._waiting -= 1
            self._deciding += 1

    @property
    def waiting(self) -> int:
        return self._waiting

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()
