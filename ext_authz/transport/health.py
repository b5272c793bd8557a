"""The standard grpc.health.v1 service, for Envoy health checks and Kubernetes gRPC probes.

Our own servicer rather than grpc's: grpc's sends Watch updates while holding the lock that
``set`` and ``Check`` take, so a Watch client that never opens its flow-control window would hold
that lock forever (every health Check and the loop's readiness updates would wait). Here ``Check``
reads a dict, a status change is queued to each Watch stream, and each stream's updates are sent
by a thread of its own (at most ``MAX_WATCHES`` streams; the next answers RESOURCE_EXHAUSTED), so a
stuck stream holds up nothing but itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# SERVING for as long as the process runs: for liveness probes, which must not restart replicas
# that are alive but waiting for keys (an IdP outage) or draining.
LIVENESS_SERVICE = "liveness"
MAX_WATCHES = 100

_Response: TypeAlias = Any  # health_pb2.HealthCheckResponse (grpc_health has no type hints)
_RESPONSE = health_pb2.HealthCheckResponse
_UNKNOWN = _RESPONSE(status=_RESPONSE.SERVICE_UNKNOWN)


class _Watch:
    """One Watch stream: the latest status for its service, sent by its own thread."""

    def __init__(self, service: str, send: Callable[[_Response | None], None]) -> None:
        self.service = service
        self._send = send
        self._updates: queue.SimpleQueue[_Response | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="health-watch", daemon=True).start()

    def update(self, response: _Response | None) -> None:
        self._updates.put(response)  # None: the stream is over

    def _run(self) -> None:
        last = None
        while (response := self._updates.get()) is not None:
            if response.status == last:
                continue
            last = response.status
            try:
                self._send(response)
            except Exception:  # the stream went away meanwhile
                return


class _Servicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._lock = threading.Lock()  # never held while sending
        self._statuses: dict[str, _Response] = {}
        self._watches: set[_Watch] = set()

    def set(self, service: str, response: _Response) -> None:
        with self._lock:
            self._statuses[service] = response
            watches = [w for w in self._watches if w.service == service]
        for watch in watches:
            watch.update(response)

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> _Response:
        response = self._statuses.get(request.service)
        if response is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return response

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[_Response | None], None] | None = None,
    ) -> None:
        if send_response_callback is None:  # grpc calls it non-blocking (see below)
            context.abort(grpc.StatusCode.INTERNAL, "Watch needs a non-blocking server")
        with self._lock:
            if len(self._watches) >= MAX_WATCHES:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many Watch streams")
            watch = _Watch(request.service, send_response_callback)
            self._watches.add(watch)
            watch.update(self._statuses.get(request.service, _UNKNOWN))

        def ended() -> None:
            with self._lock:
                self._watches.discard(watch)
            watch.update(None)

        context.add_callback(ended)

    # The handler returns at once; updates reach the stream through send_response_callback.
    Watch.experimental_non_blocking = True  # type: ignore[attr-defined]


class Health:
    """Reports the same status for the whole server ("") and for the Authorization service."""

    def __init__(self) -> None:
        self._servicer = _Servicer()
        self.set_serving(True)  # as grpc's own servicer starts; the server turns it off at once

    def register(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def set_alive(self) -> None:
        self._servicer.set(LIVENESS_SERVICE, _RESPONSE(status=_RESPONSE.SERVING))

    def set_serving(self, serving: bool) -> None:
        response = _RESPONSE(status=_RESPONSE.SERVING if serving else _RESPONSE.NOT_SERVING)
        for service in ("", AUTHORIZATION_SERVICE):
            self._servicer.set(service, response)
