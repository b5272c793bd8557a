"""The deadline of the Check being answered, for the few waits that may run into it.

Envoy's ext_authz ``timeout`` is the gRPC call's deadline. A request that waits (for a key
refetch, say) must answer before it: after the deadline Envoy has already answered the client
with its ``status_on_error`` and without our ``Retry-After``. The servicer records the deadline
for each Check; code that waits asks :func:`budget` how long it may.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

# Time kept back for answering: building the response and the trip to Envoy.
ANSWER_MARGIN_SECONDS = 0.02

_deadline: ContextVar[float | None] = ContextVar("ext_authz_check_deadline", default=None)


# grpc's sync server reports "no deadline" as a remaining time of ~1.8e19 s: anything beyond this
# is no deadline.
NO_DEADLINE_BEYOND_SECONDS = 86_400.0


def start(remaining_seconds: float | None) -> None:
    """Record the current Check's deadline (None: the caller set none)."""
    if remaining_seconds is None or not remaining_seconds <= NO_DEADLINE_BEYOND_SECONDS:
        _deadline.set(None)
    else:
        _deadline.set(time.monotonic() + remaining_seconds)


def budget(limit_seconds: float) -> float:
    """How long the current Check may still wait: at most ``limit_seconds``, never negative."""
    deadline = _deadline.get()
    if deadline is None:
        return limit_seconds
    return max(0.0, min(limit_seconds, deadline - time.monotonic() - ANSWER_MARGIN_SECONDS))


def remaining() -> float | None:
    """Seconds until the current Check's deadline (None: no deadline)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()
