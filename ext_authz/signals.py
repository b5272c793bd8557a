"""Signal handling on the running event loop, in one place: the server, the supervisor and the
development servers install their handlers through :func:`handling`.

Imports nothing of the package, so the dev tools (which must not import the server) use it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

Handler = Callable[[], None]
# What signal.getsignal returns: a Python handler, SIG_DFL/SIG_IGN, or None (set outside Python).
_Previous = Callable[[int, FrameType | None], Any] | int | None


@contextlib.contextmanager
def handling(handlers: Mapping[signal.Signals, Handler]) -> Iterator[None]:
    """Run each handler on the running loop when its signal arrives, until the block exits; then
    put back whatever handled the signal before (asyncio's ``remove_signal_handler`` alone would
    reset it to the default, e.g. SIGINT back to KeyboardInterrupt whatever it was).

    Outside the main thread the loop cannot take signals: the handlers are then left out and the
    block runs without them.
    """
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, _Previous]] = []
    try:
        for sig, handler in handlers.items():
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):  # not the main thread
                continue
            installed.append((sig, previous))
        yield
    finally:
        for sig, previous in reversed(installed):
            loop.remove_signal_handler(sig)
            # None: the previous handler was not installed from Python; nothing to put back.
            if previous is not None:
                signal.signal(sig, previous)
