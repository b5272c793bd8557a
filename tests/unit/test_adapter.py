"""The gRPC edge: CheckRequest → Request and Decision → CheckResponse."""

from __future__ import annotations

from google.protobuf import json_format

from ext_authz._proto.envoy.config.core.v3 import base_pb2
from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz.model import Allow, Deny
from ext_authz.transport.adapter import serialized_response, to_request, to_response

HttpRequest = attribute_context_pb2.AttributeContext.HttpRequest


def check(http: HttpRequest, **context: str) -> external_auth_pb2.CheckRequest:
    attributes = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions=context
    )
    return external_auth_pb2.CheckRequest(attributes=attributes)


def test_request_from_headers_map() -> None:
    http = HttpRequest(
        method="POST",
        path="/a/b?x=1&y=2",
        host="api.example.com",
        headers={":method": "POST", "authorization": "Bearer t", "x-a": "1,2"},
    )
    request = to_request(check(http, rule="admin"))
    assert (request.method, request.path, request.query, request.host) == (
        "POST",
        "/a/b",
        "x=1&y=2",
        "api.example.com",
    )
    assert request.headers["authorization"] == "Bearer t"
    assert request.headers["x-a"] == "1,2"
    assert request.context == {"rule": "admin"}


def test_request_from_raw_header_map() -> None:
    entries = [
        base_pb2.HeaderValue(key=":path", raw_value=b"/r?q"),
        base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
        base_pb2.HeaderValue(key=":authority", raw_value=b"h"),
        base_pb2.HeaderValue(key="Authorization", raw_value=b"Bearer a"),
        base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer b"),
        base_pb2.HeaderValue(key="cookie", raw_value=b"a=1"),
        base_pb2.HeaderValue(key="cookie", raw_value=b"b=2"),
        base_pb2.HeaderValue(key="x-bin", raw_value=b"\xff"),
        base_pb2.HeaderValue(key="x-plain", value="v"),
    ]
    request = to_request(check(HttpRequest(header_map=base_pb2.HeaderMap(headers=entries))))
    assert (request.method, request.path, request.query, request.host) == ("GET", "/r", "q", "h")
    # Duplicates are joined as Envoy's default encoding joins them, so both readings agree.
    assert request.headers["authorization"] == "Bearer a,Bearer b"
    assert request.headers["cookie"] == "a=1; b=2"
    assert request.headers["x-bin"] == "\ufffd"
    assert request.headers["x-plain"] == "v"


def test_request_without_http_attributes() -> None:
    request = to_request(external_auth_pb2.CheckRequest())
    assert (request.method, request.path, request.headers) == ("", "", {})


def test_allow_response() -> None:
    allow = Allow(
        headers_to_set=(("x-user-id", "alice"),),
        headers_to_remove=("x-email",),
        query_params_to_remove=("access_token",),
        metadata={"provider": "idp", "claims": {"sub": "alice", "n": 1, "l": ["a"]}},
    )
    response = to_response(allow)
    assert response.status.code == 0
    assert response.WhichOneof("http_response") == "ok_response"
    (header,) = response.ok_response.headers
    assert (header.header.key, header.header.value) == ("x-user-id", "alice")
    assert header.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert not header.HasField("append")
    assert list(response.ok_response.headers_to_remove) == ["x-email"]
    assert list(response.ok_response.query_parameters_to_remove) == ["access_token"]
    assert json_format.MessageToDict(response.dynamic_metadata) == {
        "provider": "idp",
        "claims": {"sub": "alice", "n": 1.0, "l": ["a"]},
    }


def test_deny_response() -> None:
    deny = Deny(
        status=401,
        grpc_code=16,
        code="token_expired",
        headers=(("www-authenticate", 'Bearer realm="x"'), ("content-type", "application/json")),
        body='{"error": "invalid_token"}',
    )
    response = to_response(deny)
    assert response.status.code == 16
    assert response.WhichOneof("http_response") == "denied_response"
    assert response.denied_response.status.code == 401
    assert [(h.header.key, h.header.value) for h in response.denied_response.headers] == list(deny.headers)
    assert response.denied_response.body == deny.body


def test_claims_go_into_dynamic_metadata() -> None:
    claims = {"sub": "alice", "groups": ["a", "b"], "n": 1}
    response = to_response(Allow(metadata={"rule": "r", "claims": claims}))
    assert json_format.MessageToDict(response.dynamic_metadata)["claims"] == {
        "sub": "alice",
        "groups": ["a", "b"],
        "n": 1.0,
    }


CLAIMS = {"sub": "alice", "aud": ["api", "web"], "n": 3, "nested": {"a": [1, "x", None]}}
DECISIONS: list[Allow | Deny] = [
    Allow(),
    Allow(rule="r", provider="idp", subject="alice", metadata={"rule": "r"}),
    Allow(
        headers_to_set=(("x-user", "alice"), ("x-email", "ä@example.com")),
        headers_to_remove=("authorization", "x-user-id"),
        query_params_to_remove=("access_token",),
        metadata={"rule": "r", "provider": "idp", "claims": CLAIMS},
        rule="r",
        provider="idp",
    ),
    Allow(metadata={"rule": "r", "n": 1, "f": 1.5, "b": True, "none": None}),
    Allow(metadata={"rule": "r", "listed": ["a", "b"]}),  # not a plain value: built every time
    Deny(
        status=401,
        grpc_code=16,
        code="token_expired",
        headers=(("www-authenticate", 'Bearer error="x"'),),
        body="{}",
    ),
    Deny(status=403, grpc_code=7, code="rule_denied", headers=(), body="forbidden", rule="rules[2]"),
]
REQUEST_IDS = ["", "r1", "ü-ñ-✓", "x" * 300, "a" * 127, "b" * 128, "c" * 20_000]


def test_serialized_response_parses_to_the_message_to_response_builds() -> None:
    """Cached and spliced bytes parse to the same message as building it afresh, hit after hit."""
    for _ in range(3):
        for decision in DECISIONS:
            for request_id in REQUEST_IDS:
                wire = serialized_response(decision, request_id)
                parsed = external_auth_pb2.CheckResponse.FromString(wire)
                assert parsed == to_response(decision, request_id), (decision, request_id)


def test_serialized_response_follows_the_claims_object() -> None:
    """Same headers, other claims: another answer (the key is the claims object, not its headers)."""
    first = Allow(metadata={"claims": {"sub": "alice"}})
    other = Allow(metadata={"claims": {"sub": "bob"}})
    assert serialized_response(first, "r") != serialized_response(other, "r")
    parsed = external_auth_pb2.CheckResponse.FromString(serialized_response(other, "r"))
    assert parsed.dynamic_metadata.fields["claims"].struct_value.fields["sub"].string_value == "bob"
    assert parsed.dynamic_metadata["request_id"] == "r"
