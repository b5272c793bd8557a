"""The envoy.service.auth.v3.Authorization servicer: adapt, decide, adapt. Never raises to gRPC."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from ext_authz import deadlines
from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.errors import InternalError
from ext_authz.model import Decision, Request
from ext_authz.pipeline import Pipeline
from ext_authz.tracing import Tracing
from ext_authz.transport.adapter import to_request, to_response

log = logging.getLogger(__name__)

EMPTY_REQUEST = Request(method="", path="")


Observer = Callable[[Request, str, Decision, float], None]


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """``pipeline`` may be replaced at any time (a config reload): each Check uses one config."""

    def __init__(
        self, pipeline: Pipeline, observer: Observer | None = None, tracing: Tracing | None = None
    ) -> None:
        self.pipeline = pipeline
        self.observer = observer
        self.tracing = tracing

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        pipeline = self.pipeline
        adapted = EMPTY_REQUEST
        request_id = ""
        try:
            deadlines.start(context.time_remaining())
            adapted = to_request(request)
            request_id = adapted.headers.get("x-request-id", "")
            if self.tracing is None:
                decision = await pipeline.decide(adapted)
            else:
                with self.tracing.check_span(adapted.headers) as span:
                    decision = await pipeline.decide(adapted)
                    span.record(decision)
            response = to_response(decision, request_id)
        except Exception:
            # A bug, not a denial reason: fail closed with a clean 500 rather than a gRPC error
            # whose outcome would depend on Envoy's failure_mode_allow.
            log.exception("check failed")
            decision = pipeline.answers.deny(InternalError())
            response = to_response(decision)
        if self.observer is not None:
            try:
                self.observer(adapted, request_id, decision, time.perf_counter() - started)
            except Exception:  # logging and metrics must never fail a Check
                log.exception("recording the decision failed")
        return response
