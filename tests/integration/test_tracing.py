"""Tracing: one span per Check, parented on the traceparent header, with the decision on it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz.config.parse import parse
from ext_authz.server import Server
from tests.support.idp import TestIssuer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    with TestIssuer() as running:
        yield running


def check(token: str | None) -> external_auth_pb2.CheckRequest:
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/x", headers=headers)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


async def test_one_span_per_check_parented_on_traceparent(issuer: TestIssuer) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = parse(
        {
            "listen": "127.0.0.1:0",
            "tracing": {"enabled": True},
            "providers": [
                {"name": "test", "issuer": issuer.url, "audiences": ["api"], "jwks": issuer.jwks()}
            ],
        }
    )
    server = Server(config, tracer_provider=provider, drain_seconds=0)
    address = await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
            await stub.Check(check(issuer.mint()), timeout=5)
            await stub.Check(check(None), timeout=5)
    finally:
        await server.stop()
    allowed, denied = exporter.get_finished_spans()
    for span in (allowed, denied):
        assert span.context is not None and span.parent is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert format(span.parent.span_id, "016x") == PARENT_ID
    assert allowed.attributes is not None and denied.attributes is not None
    assert allowed.attributes["ext_authz.decision"] == "allow"
    assert allowed.attributes["ext_authz.provider"] == "test"
    assert denied.attributes["ext_authz.decision"] == "deny"
    assert denied.attributes["http.response.status_code"] == 401
    assert denied.attributes["ext_authz.reason"] == "missing_token"


def test_tracing_disabled_by_default() -> None:
    config = parse({"providers": [{"name": "t", "issuer": "https://i/", "audiences": ["a"]}]})
    assert not config.tracing.enabled
