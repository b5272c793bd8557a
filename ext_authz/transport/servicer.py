"""The envoy.service.auth.v3.Authorization servicer: adapt, decide, adapt. Never raises to gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from ext_authz import deadlines, handoff
from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.errors import InternalError
from ext_authz.model import Decision, Request
from ext_authz.pipeline import Pipeline
from ext_authz.tracing import Tracing
from ext_authz.transport.adapter import serialized_response, to_request, to_response

log = logging.getLogger(__name__)

EMPTY_REQUEST = Request(method="", path="")


Observer = Callable[[Request, str, Decision, float], None]


class Runtime(Protocol):
    """What one Check reads, once: the pipeline that decides it, and the decision log (of the same
    config) that records it."""

    @property
    def pipeline(self) -> Pipeline: ...

    def record(self, request: Request, request_id: str, decision: Decision, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Fixed:
    """One pipeline for the servicer's life, with no decision log (the tests' servicers)."""

    pipeline: Pipeline

    def record(self, request: Request, request_id: str, decision: Decision, seconds: float) -> None:
        pass


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Decides with a fixed pipeline, or with ``current()``'s: the server passes the reader of its
    runtime holder, which a config reload replaces at any time. Each Check reads it once, so it is
    decided and logged under one config. ``observer`` sees every decision, whatever the config
    (the server's metrics)."""

    def __init__(
        self,
        pipeline: Pipeline | Callable[[], Runtime],
        observer: Observer | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        if isinstance(pipeline, Pipeline):
            fixed = Fixed(pipeline)
            self.current: Callable[[], Runtime] = lambda: fixed
        else:
            self.current = pipeline
        self.observer = observer
        self.tracing = tracing
        self._served: tuple[asyncio.AbstractEventLoop, handoff.RequestThreads] | None = None

    def serve_from(self, loop: asyncio.AbstractEventLoop, threads: handoff.RequestThreads) -> None:
        """Answer in ``threads`` (grpc's sync server's), handing I/O waits to ``loop``."""
        self._served = loop, threads

    def check_blocking(self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext) -> bytes:
        """The sync server's handler: the Check decided in this request thread (see handoff.py)."""
        served = self._served
        try:
            if served is None:
                raise RuntimeError("serve_from() was not called")
            return handoff.drive(self.check_serialized(request, context), *served)  # type: ignore[arg-type]
        except Exception:  # check_serialized never raises; this is for the driver itself
            log.exception("check failed")
            return to_response(self.current().pipeline.answers.deny(InternalError())).SerializeToString()

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> external_auth_pb2.CheckResponse:
        """The answer as a message (what the wire carries, parsed back): for callers in process."""
        return external_auth_pb2.CheckResponse.FromString(await self.check_serialized(request, context))

    async def check_serialized(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> bytes:
        """What the server sends: the serialized CheckResponse (a repeated answer is built once)."""
        started = time.perf_counter()
        runtime = self.current()
        deadlines.start(context.time_remaining())
        try:
            adapted = to_request(request)
        except Exception:  # a bug in the adapter: fail closed, as below
            log.exception("check failed")
            denial = runtime.pipeline.answers.deny(InternalError())
            self.recorded(runtime, EMPTY_REQUEST, "", denial, started)
            return to_response(denial).SerializeToString()
        request_id = adapted.headers.get("x-request-id", "")
        decision = await self.decide(runtime, adapted)
        try:
            response = serialized_response(decision, request_id)
        except Exception:
            log.exception("check failed")
            decision = runtime.pipeline.answers.deny(InternalError())
            response = to_response(decision).SerializeToString()
        self.recorded(runtime, adapted, request_id, decision, started)
        return response

    async def decide(self, runtime: Runtime, request: Request) -> Decision:
        """``runtime``'s decision for ``request`` (traced when tracing is on). Never raises: a bug
        is a clean 500 denial, not an error whose outcome would depend on the proxy's failure mode.
        Every listener's transport (gRPC here, HTTP in ``transport.http``) decides through this."""
        pipeline = runtime.pipeline
        try:
            if self.tracing is None:
                return await pipeline.decide(request)
            with self.tracing.check_span(request.headers) as span:
                decision = await pipeline.decide(request)
                span.record(decision)
                return decision
        except Exception:
            log.exception("check failed")
            return pipeline.answers.deny(InternalError())

    def recorded(
        self, runtime: Runtime, request: Request, request_id: str, decision: Decision, started: float
    ) -> None:
        """The decision into the metrics and ``runtime``'s decision log (never failing a Check)."""
        seconds = time.perf_counter() - started
        try:
            if self.observer is not None:
                self.observer(request, request_id, decision, seconds)
            runtime.record(request, request_id, decision, seconds)
        except Exception:  # logging and metrics must never fail a Check
            log.exception("recording the decision failed")


SERVICE = "envoy.service.auth.v3.Authorization"


def _already_serialized(response: bytes) -> bytes:
    return response


def register(server: grpc.Server, servicer: AuthorizationServicer) -> None:
    """Serve the Check service on ``server`` (grpc's sync server): requests parsed by the generated
    message class, decided in the request thread, answers sent as check_serialized gives them (no
    second serialization)."""
    check = grpc.unary_unary_rpc_method_handler(
        servicer.check_blocking,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=_already_serialized,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": check}),))
