"""The envoy.service.auth.v3.Authorization servicer: adapt, decide, adapt. Never raises to gRPC."""

from __future__ import annotations

import logging

import grpc

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ext_authz.errors import InternalError
from ext_authz.pipeline import Pipeline
from ext_authz.transport.adapter import to_request, to_response

log = logging.getLogger(__name__)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> external_auth_pb2.CheckResponse:
        try:
            decision = await self.pipeline.decide(to_request(request))
        except Exception:
            # A bug, not a denial reason: fail closed with a clean 500 rather than a gRPC error
            # whose outcome would depend on Envoy's failure_mode_allow.
            log.exception("check failed")
            decision = self.pipeline.answers.deny(InternalError())
        return to_response(decision)
