"""The real Server in this process (on port 0) and a grpc.aio client for it."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.config.model import Settings
from ext_authz.config.parse import parse
from ext_authz.server import Server
from tests.support.idp import TestIssuer


def config(issuer: TestIssuer, **provider: Any) -> Settings:
    return parse(
        {
            "listen": "127.0.0.1:0",
            "providers": [
                {
                    "name": "test",
                    "issuer": issuer.url,
                    "audiences": ["api"],
                    "claim_to_headers": [{"header": "x-user-id", "claim": "sub"}],
                    **provider,
                }
            ],
        }
    )


def check_request(path: str, token: str | None, *, host: str = "") -> external_auth_pb2.CheckRequest:
    """A GET of ``path`` as Envoy sends it, with ``token`` as a bearer token (None: no token)."""
    headers = {":method": "GET", ":path": path}
    if host:
        headers[":authority"] = host
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET", path=path, host=host, headers=headers
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


class Running:
    def __init__(self, server: Server, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
        self.health = health_pb2_grpc.HealthStub(channel)

    async def check(self, token: str | None = None, path: str = "/orders") -> external_auth_pb2.CheckResponse:
        request = check_request(path, token)
        response: external_auth_pb2.CheckResponse = await self.stub.Check(request, timeout=5)
        return response

    async def health_status(self, service: str = "") -> int:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


async def start(s: Settings) -> tuple[Server, Running]:
    server = Server(s)
    address = await server.start()
    channel = grpc.aio.insecure_channel(address)
    return server, Running(server, channel)
