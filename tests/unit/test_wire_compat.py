"""Our generated messages and envoy-data-plane's reference types agree on the wire, both ways.

envoy-data-plane is generated (with betterproto2) from Envoy's own .proto files, so it stands in for
Envoy here. Each case is a plain-data spec: one builder per library turns it into a message, one view
per library reads every field back into the same plain-data shape. A case passes when

* reference -> bytes -> ours reads back as the spec (and equals the message built with ours),
* ours -> bytes -> reference reads back as the spec (and equals the message built with the reference),
* neither side finds unknown fields (a field number or wire type mismatch would land there),
* ours -> bytes -> reference -> bytes -> ours is an equal message.

betterproto2 specifics: oneof members are plain optional attributes (read with
`betterproto2.which_one_of`), maps are dicts, google.protobuf.Timestamp is a `datetime` (microsecond
precision only), google.protobuf.BoolValue is `bool | None`, google.protobuf.Struct is a real message
(`Struct.from_dict`/`to_dict`), enums are IntEnums.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from google.protobuf import any_pb2, descriptor_pool, json_format, struct_pb2, timestamp_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import status_pb2

from ext_authz._proto.envoy.config.core.v3 import address_pb2, base_pb2
from ext_authz._proto.envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from ext_authz._proto.envoy.type.v3 import http_status_pb2

# envoy-data-plane 2.2 (betterproto2 0.9) decorates its oneof validators with
# `@model_validator(mode="after")` on classmethods; pydantic >= 2.12 warns about that
# (PydanticDeprecatedSince212, a DeprecationWarning) once per class, at import. The import runs at
# collection, where a `pytest.mark.filterwarnings` cannot reach, so exactly that warning from
# envoy_data_plane modules is ignored here, around the import only.
with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore",
        message=r"Using `@model_validator` with mode='after' on a classmethod is deprecated",
        category=DeprecationWarning,
        module=r"envoy_data_plane\.",
    )
    import betterproto2
    from envoy_data_plane.envoy.config.core import v3 as ref_core
    from envoy_data_plane.envoy.service.auth import v3 as ref_auth
    from envoy_data_plane.envoy.type import v3 as ref_type
    from envoy_data_plane.google import protobuf as ref_pb
    from envoy_data_plane.google import rpc as ref_rpc
    from envoy_data_plane.message_pool import default_message_pool

# The reference types warn (DeprecationWarning, in __post_init__, so on construction and on parse)
# whenever the deprecated HeaderValueOption.append or OkHttpResponse.dynamic_metadata is set. Both
# are on Envoy's wire (Envoy 1.40 honours only `append` for upstream request headers), so the
# response tests set them on purpose and ignore exactly these two warnings.
ignore_reference_deprecations = pytest.mark.filterwarnings(
    r"ignore:HeaderValueOption\.append is deprecated:DeprecationWarning",
    r"ignore:OkHttpResponse\.dynamic_metadata is deprecated:DeprecationWarning",
)

T = TypeVar("T")
Spec = dict[str, Any]

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
SECOND = datetime.timedelta(seconds=1)

# Enum values appear in specs and views by name: each side maps names to numbers with its own
# definitions, so a renumbered enum value shows up as a different name after the trip.
APPEND_IF_EXISTS_OR_ADD = "APPEND_IF_EXISTS_OR_ADD"
ADD_IF_ABSENT = "ADD_IF_ABSENT"
OVERWRITE_IF_EXISTS_OR_ADD = "OVERWRITE_IF_EXISTS_OR_ADD"
OVERWRITE_IF_EXISTS = "OVERWRITE_IF_EXISTS"


def _some(value: T | None) -> T:
    assert value is not None
    return value


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------

PATH = "/v1/items?limit=10&q=caf%C3%A9"
REQUEST_TIME = datetime.datetime(2025, 6, 1, 12, 34, 56, 789012, tzinfo=datetime.UTC)

JWT_METADATA: Spec = {
    "sub": "user-1",
    "scopes": ["read", "write"],
    "exp": 1750000000,
    "ratio": 0.25,
    "admin": False,
    "claims": {"email": "user@example.com", "nickname": None, "tags": []},
}

REQUEST: Spec = {
    "source": {
        "address": {
            "socket_address": {
                "protocol": "TCP",
                "address": "10.1.2.3",
                "port_value": 54321,
                "resolver_name": "",
                "ipv4_compat": False,
                "network_namespace_filepath": "",
            }
        },
        "service": "frontend",
        "labels": {"app": "web", "version": "v1"},
        "principal": "spiffe://cluster.local/ns/default/sa/web",
        "certificate": "-----BEGIN%20CERTIFICATE-----%0AMIIBsrc%0A-----END%20CERTIFICATE-----%0A",
    },
    "destination": {
        "address": {
            "socket_address": {
                "protocol": "UDP",
                "address": "10.9.8.7",
                "port_value": 8443,
                "resolver_name": "envoy.resolvers.custom",
                "ipv4_compat": True,
                "network_namespace_filepath": "/var/run/netns/blue",
            }
        },
        "service": "api-backend",
        "labels": {"tier": "backend"},
        "principal": "spiffe://cluster.local/ns/default/sa/api",
        "certificate": "-----BEGIN%20CERTIFICATE-----%0AMIIBdst%0A-----END%20CERTIFICATE-----%0A",
    },
    "request": {
        "time": {
            "seconds": (REQUEST_TIME - EPOCH) // SECOND,
            "nanos": REQUEST_TIME.microsecond * 1000,
        },
        "http": {
            "id": "10927531470265183342",
            "method": "POST",
            "headers": {
                ":authority": "api.example.com",
                ":method": "POST",
                ":path": PATH,
                ":scheme": "https",
                "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
                "cookie": "a=1,b=2",
                "user-agent": "curl/8.5.0",
                "x-unicode": "caf\u00e9 \u2713",
            },
            "path": PATH,
            "host": "api.example.com",
            "scheme": "https",
            # Envoy always leaves query and fragment empty; set here so fields 7 and 8 hit the wire.
            "query": "limit=10",
            "fragment": "top",
            "size": 5_000_000_000,  # beyond 32 bits
            "protocol": "HTTP/2",
            "body": '{"name":"caf\u00e9"}',
            "raw_body": b'\x00\x01\xfe\xff{"name":"caf\xc3\xa9"}',
            "header_map": {
                "headers": [
                    {"key": ":path", "value": "", "raw_value": PATH.encode()},
                    {"key": "cookie", "value": "", "raw_value": b"a=1"},
                    {"key": "cookie", "value": "", "raw_value": b"b=2"},
                    {"key": "x-binary", "value": "", "raw_value": b"\xff\xfe\x00\x80"},
                    {"key": "x-both", "value": "text", "raw_value": b"text"},
                ]
            },
        },
    },
    "context_extensions": {"tenant": "acme", "virtual_host": "api"},
    "metadata_context": {
        "filter_metadata": {"envoy.filters.http.jwt_authn": JWT_METADATA, "empty": {}},
        "typed_filter_metadata": {
            "example.typed": {
                "type_url": "type.googleapis.com/google.protobuf.StringValue",
                "value": b"\n\x05hello",
            }
        },
    },
    "tls_session": {"sni": "api.example.com"},
    "route_metadata_context": {
        "filter_metadata": {"com.example.route": {"policy": "strict", "weight": 1.5}},
        "typed_filter_metadata": {},
    },
}

# Fields of the request's message types left at their default in REQUEST (covered elsewhere).
REQUEST_UNCOVERED = {
    "envoy.config.core.v3.Address.pipe",
    "envoy.config.core.v3.Address.envoy_internal_address",
    "envoy.config.core.v3.SocketAddress.named_port",
}


def hvo(
    key: str,
    value: str,
    *,
    append: bool | None = None,
    action: str = OVERWRITE_IF_EXISTS_OR_ADD,
    keep_empty_value: bool = False,
    raw_value: bytes = b"",
) -> Spec:
    return {
        "header": {"key": key, "value": value, "raw_value": raw_value},
        "append": append,
        "append_action": action,
        "keep_empty_value": keep_empty_value,
    }


RESPONSES: dict[str, Spec] = {
    "ok": {
        "status": {"code": 0, "message": "", "details": []},
        "http_response": {
            "ok_response": {
                "headers": [
                    # What Envoy 1.40 needs: append=false (set/replace) AND the explicit action.
                    hvo("x-auth-subject", "user-1", append=False),
                    hvo("x-auth-scopes", "read write"),
                    hvo("x-auth-groups", "admins", append=True, action=APPEND_IF_EXISTS_OR_ADD),
                    hvo("x-auth-empty", "", action=ADD_IF_ABSENT, keep_empty_value=True),
                    hvo("x-auth-raw", "v", action=OVERWRITE_IF_EXISTS, raw_value=b"v\xff"),
                ],
                "dynamic_metadata": {"legacy": True},
                "headers_to_remove": ["authorization", "x-auth-subject-forged"],
                "response_headers_to_add": [
                    hvo("x-ratelimit-remaining", "41"),
                    hvo("set-cookie", "s=1", action=APPEND_IF_EXISTS_OR_ADD),
                ],
                "query_parameters_to_set": [
                    {"key": "tenant", "value": "acme"},
                    {"key": "debug", "value": ""},
                ],
                "query_parameters_to_remove": ["access_token", "token"],
            }
        },
        "dynamic_metadata": {
            "sub": "user-1",
            "iss": "https://issuer.example.com/",
            "aud": ["api", "web"],
            "scope_count": 2,
            "admin": True,
            "nested": {"k": None, "l": [1, "two", False, {"x": {}}]},
        },
    },
    "ok-empty": {
        # An empty ok_response still selects the oneof member (it is sent as a zero-length field).
        "status": {"code": 0, "message": "", "details": []},
        "http_response": {
            "ok_response": {
                "headers": [],
                "dynamic_metadata": None,
                "headers_to_remove": [],
                "response_headers_to_add": [],
                "query_parameters_to_set": [],
                "query_parameters_to_remove": [],
            }
        },
        "dynamic_metadata": None,
    },
    "denied": {
        "status": {
            "code": 16,  # UNAUTHENTICATED
            "message": "missing bearer token",
            "details": [
                {"type_url": "type.googleapis.com/google.rpc.ErrorInfo", "value": b"\n\rinvalid_token"},
            ],
        },
        "http_response": {
            "denied_response": {
                "status": {"code": "Unauthorized"},
                "headers": [
                    hvo("www-authenticate", 'Bearer realm="https://api.example.com", error="invalid_token"'),
                    hvo("content-type", "application/json", append=False),
                ],
                "body": '{"error":"unauthenticated","detail":"caf\u00e9"}',
            }
        },
        "dynamic_metadata": {"reason": "missing_token"},
    },
    "denied-default-status": {
        "status": {"code": 7, "message": "", "details": []},  # PERMISSION_DENIED
        "http_response": {"denied_response": {"status": None, "headers": [], "body": "forbidden"}},
        "dynamic_metadata": None,
    },
    "error": {
        "status": {"code": 14, "message": "JWKS endpoint unavailable", "details": []},  # UNAVAILABLE
        "http_response": {
            "error_response": {
                "status": {"code": "ServiceUnavailable"},
                "headers": [hvo("retry-after", "5")],
                "body": "",
            }
        },
        "dynamic_metadata": None,
    },
    "status-only": {
        "status": {"code": 7, "message": "denied", "details": []},
        "http_response": {},
        "dynamic_metadata": None,
    },
}

# Fields of the response's message types no RESPONSES case sets to a non-default value.
RESPONSES_UNCOVERED: set[str] = set()

ADDRESSES: dict[str, Spec] = {
    "named-port": {
        "socket_address": {
            "protocol": "UDP",
            "address": "::1",
            "named_port": "https",
            "resolver_name": "",
            "ipv4_compat": False,
            "network_namespace_filepath": "",
        }
    },
    "port-zero": {
        # port_value 0 is still a set oneof member.
        "socket_address": {
            "protocol": "TCP",
            "address": "0.0.0.0",
            "port_value": 0,
            "resolver_name": "",
            "ipv4_compat": False,
            "network_namespace_filepath": "",
        }
    },
    "pipe": {"pipe": {"path": "/run/envoy/authz.sock", "mode": 0o660}},
    "internal": {
        "envoy_internal_address": {"server_listener_name": "internal_listener", "endpoint_id": "e1"}
    },
    "internal-no-listener": {"envoy_internal_address": {"server_listener_name": None, "endpoint_id": "e2"}},
    "empty": {},
}


def _typed(value: Any) -> Any:
    """A JSON value with its kind made explicit, so that True != 1 and "1" != 1 when comparing."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    assert isinstance(value, str), value
    return ("string", value)


def assert_matches(view: Spec, spec: Spec) -> None:
    """Compare a view with its spec, Struct contents compared with their JSON kinds."""
    assert _typed_spec(view) == _typed_spec(spec)


def _typed_spec(spec: Any, struct_keys: frozenset[str] = frozenset({"dynamic_metadata"})) -> Any:
    """The spec with every google.protobuf.Struct in it passed through _typed."""
    if isinstance(spec, dict):
        out: dict[str, Any] = {}
        for key, value in spec.items():
            if key in struct_keys and value is not None:
                out[key] = _typed(value)
            elif key == "filter_metadata":
                out[key] = {name: _typed(struct) for name, struct in value.items()}
            else:
                out[key] = _typed_spec(value, struct_keys)
        return out
    if isinstance(spec, list):
        return [_typed_spec(item, struct_keys) for item in spec]
    return spec


# --------------------------------------------------------------------------------------------------
# Ours: builders and views
# --------------------------------------------------------------------------------------------------


def ours_struct(spec: Spec) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(spec)
    return struct


def ours_any(spec: Spec) -> any_pb2.Any:
    return any_pb2.Any(type_url=spec["type_url"], value=spec["value"])


def ours_address(spec: Spec) -> address_pb2.Address:
    address = address_pb2.Address()
    if "socket_address" in spec:
        address.socket_address.CopyFrom(address_pb2.SocketAddress(**spec["socket_address"]))
        address.socket_address.SetInParent()
    if "pipe" in spec:
        address.pipe.CopyFrom(address_pb2.Pipe(**spec["pipe"]))
        address.pipe.SetInParent()
    if "envoy_internal_address" in spec:
        internal = spec["envoy_internal_address"]
        address.envoy_internal_address.endpoint_id = internal["endpoint_id"]
        address.envoy_internal_address.SetInParent()
        if internal["server_listener_name"] is not None:
            address.envoy_internal_address.server_listener_name = internal["server_listener_name"]
    return address


def ours_peer(spec: Spec) -> attribute_context_pb2.AttributeContext.Peer:
    return attribute_context_pb2.AttributeContext.Peer(
        address=ours_address(spec["address"]),
        service=spec["service"],
        labels=spec["labels"],
        principal=spec["principal"],
        certificate=spec["certificate"],
    )


def ours_metadata(spec: Spec) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    for name, struct in spec["filter_metadata"].items():
        metadata.filter_metadata[name].CopyFrom(ours_struct(struct))
    for name, typed in spec["typed_filter_metadata"].items():
        metadata.typed_filter_metadata[name].CopyFrom(ours_any(typed))
    return metadata


def ours_http_request(spec: Spec) -> attribute_context_pb2.AttributeContext.HttpRequest:
    scalars = {key: value for key, value in spec.items() if key != "header_map"}
    http = attribute_context_pb2.AttributeContext.HttpRequest(**scalars)
    http.header_map.headers.extend(base_pb2.HeaderValue(**h) for h in spec["header_map"]["headers"])
    http.header_map.SetInParent()
    return http


def ours_request(spec: Spec) -> external_auth_pb2.CheckRequest:
    request = spec["request"]
    attributes = attribute_context_pb2.AttributeContext(
        source=ours_peer(spec["source"]),
        destination=ours_peer(spec["destination"]),
        request=attribute_context_pb2.AttributeContext.Request(
            time=timestamp_pb2.Timestamp(**request["time"]),
            http=ours_http_request(request["http"]),
        ),
        context_extensions=spec["context_extensions"],
        metadata_context=ours_metadata(spec["metadata_context"]),
        tls_session=attribute_context_pb2.AttributeContext.TLSSession(**spec["tls_session"]),
        route_metadata_context=ours_metadata(spec["route_metadata_context"]),
    )
    return external_auth_pb2.CheckRequest(attributes=attributes)


def ours_header_option(spec: Spec) -> base_pb2.HeaderValueOption:
    option = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(**spec["header"]),
        append_action=spec["append_action"],  # protobuf constructors take enum value names
        keep_empty_value=spec["keep_empty_value"],
    )
    if spec["append"] is not None:
        option.append.CopyFrom(wrappers_pb2.BoolValue(value=spec["append"]))
        option.append.SetInParent()
    return option


def ours_denied(spec: Spec) -> external_auth_pb2.DeniedHttpResponse:
    denied = external_auth_pb2.DeniedHttpResponse(
        headers=[ours_header_option(h) for h in spec["headers"]], body=spec["body"]
    )
    if spec["status"] is not None:
        denied.status.CopyFrom(http_status_pb2.HttpStatus(code=spec["status"]["code"]))
        denied.status.SetInParent()
    return denied


def ours_ok(spec: Spec) -> external_auth_pb2.OkHttpResponse:
    ok = external_auth_pb2.OkHttpResponse(
        headers=[ours_header_option(h) for h in spec["headers"]],
        headers_to_remove=spec["headers_to_remove"],
        response_headers_to_add=[ours_header_option(h) for h in spec["response_headers_to_add"]],
        query_parameters_to_set=[base_pb2.QueryParameter(**q) for q in spec["query_parameters_to_set"]],
        query_parameters_to_remove=spec["query_parameters_to_remove"],
    )
    if spec["dynamic_metadata"] is not None:
        ok.dynamic_metadata.CopyFrom(ours_struct(spec["dynamic_metadata"]))
    return ok


def ours_response(spec: Spec) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    if spec["status"] is not None:
        status = spec["status"]
        response.status.CopyFrom(
            status_pb2.Status(
                code=status["code"],
                message=status["message"],
                details=[ours_any(d) for d in status["details"]],
            )
        )
        response.status.SetInParent()
    for kind, body in spec["http_response"].items():
        if kind == "ok_response":
            response.ok_response.CopyFrom(ours_ok(body))
            response.ok_response.SetInParent()
        elif kind == "denied_response":
            response.denied_response.CopyFrom(ours_denied(body))
            response.denied_response.SetInParent()
        else:
            assert kind == "error_response", kind
            response.error_response.CopyFrom(ours_denied(body))
            response.error_response.SetInParent()
    if spec["dynamic_metadata"] is not None:
        response.dynamic_metadata.CopyFrom(ours_struct(spec["dynamic_metadata"]))
    return response


def view_ours_struct(struct: struct_pb2.Struct) -> Spec:
    return json_format.MessageToDict(struct)


def view_ours_any(value: any_pb2.Any) -> Spec:
    return {"type_url": value.type_url, "value": value.value}


def view_ours_address(address: address_pb2.Address) -> Spec:
    kind = address.WhichOneof("address")
    if kind == "socket_address":
        socket = address.socket_address
        view: Spec = {
            "protocol": address_pb2.SocketAddress.Protocol.Name(socket.protocol),
            "address": socket.address,
            "resolver_name": socket.resolver_name,
            "ipv4_compat": socket.ipv4_compat,
            "network_namespace_filepath": socket.network_namespace_filepath,
        }
        port = socket.WhichOneof("port_specifier")
        if port == "port_value":
            view["port_value"] = socket.port_value
        elif port == "named_port":
            view["named_port"] = socket.named_port
        return {kind: view}
    if kind == "pipe":
        return {kind: {"path": address.pipe.path, "mode": address.pipe.mode}}
    if kind == "envoy_internal_address":
        internal = address.envoy_internal_address
        listener = internal.WhichOneof("address_name_specifier")
        return {
            kind: {
                "server_listener_name": None if listener is None else internal.server_listener_name,
                "endpoint_id": internal.endpoint_id,
            }
        }
    assert kind is None, kind
    return {}


def view_ours_peer(peer: attribute_context_pb2.AttributeContext.Peer) -> Spec:
    return {
        "address": view_ours_address(peer.address) if peer.HasField("address") else None,
        "service": peer.service,
        "labels": dict(peer.labels),
        "principal": peer.principal,
        "certificate": peer.certificate,
    }


def view_ours_metadata(metadata: base_pb2.Metadata) -> Spec:
    return {
        "filter_metadata": {name: view_ours_struct(s) for name, s in metadata.filter_metadata.items()},
        "typed_filter_metadata": {
            name: view_ours_any(a) for name, a in metadata.typed_filter_metadata.items()
        },
    }


def view_ours_header_value(header: base_pb2.HeaderValue) -> Spec:
    return {"key": header.key, "value": header.value, "raw_value": header.raw_value}


def view_ours_http_request(http: attribute_context_pb2.AttributeContext.HttpRequest) -> Spec:
    return {
        "id": http.id,
        "method": http.method,
        "headers": dict(http.headers),
        "path": http.path,
        "host": http.host,
        "scheme": http.scheme,
        "query": http.query,
        "fragment": http.fragment,
        "size": http.size,
        "protocol": http.protocol,
        "body": http.body,
        "raw_body": http.raw_body,
        "header_map": (
            {"headers": [view_ours_header_value(h) for h in http.header_map.headers]}
            if http.HasField("header_map")
            else None
        ),
    }


def view_ours_request(message: external_auth_pb2.CheckRequest) -> Spec:
    assert message.HasField("attributes")
    attributes = message.attributes
    for name in ("source", "destination", "request", "metadata_context", "tls_session"):
        assert attributes.HasField(name), name
    assert attributes.HasField("route_metadata_context")
    request = attributes.request
    assert request.HasField("time")
    assert request.HasField("http")
    return {
        "source": view_ours_peer(attributes.source),
        "destination": view_ours_peer(attributes.destination),
        "request": {
            "time": {"seconds": request.time.seconds, "nanos": request.time.nanos},
            "http": view_ours_http_request(request.http),
        },
        "context_extensions": dict(attributes.context_extensions),
        "metadata_context": view_ours_metadata(attributes.metadata_context),
        "tls_session": {"sni": attributes.tls_session.sni},
        "route_metadata_context": view_ours_metadata(attributes.route_metadata_context),
    }


def view_ours_header_option(option: base_pb2.HeaderValueOption) -> Spec:
    return {
        "header": view_ours_header_value(option.header) if option.HasField("header") else None,
        "append": option.append.value if option.HasField("append") else None,
        "append_action": base_pb2.HeaderValueOption.HeaderAppendAction.Name(option.append_action),
        "keep_empty_value": option.keep_empty_value,
    }


def view_ours_denied(denied: external_auth_pb2.DeniedHttpResponse) -> Spec:
    return {
        "status": (
            {"code": http_status_pb2.StatusCode.Name(denied.status.code)}
            if denied.HasField("status")
            else None
        ),
        "headers": [view_ours_header_option(h) for h in denied.headers],
        "body": denied.body,
    }


def view_ours_ok(ok: external_auth_pb2.OkHttpResponse) -> Spec:
    return {
        "headers": [view_ours_header_option(h) for h in ok.headers],
        "dynamic_metadata": view_ours_struct(ok.dynamic_metadata)
        if ok.HasField("dynamic_metadata")
        else None,
        "headers_to_remove": list(ok.headers_to_remove),
        "response_headers_to_add": [view_ours_header_option(h) for h in ok.response_headers_to_add],
        "query_parameters_to_set": [{"key": q.key, "value": q.value} for q in ok.query_parameters_to_set],
        "query_parameters_to_remove": list(ok.query_parameters_to_remove),
    }


def view_ours_response(message: external_auth_pb2.CheckResponse) -> Spec:
    status = message.status
    kind = message.WhichOneof("http_response")
    http_response: Spec = {}
    if kind == "ok_response":
        http_response[kind] = view_ours_ok(message.ok_response)
    elif kind == "denied_response":
        http_response[kind] = view_ours_denied(message.denied_response)
    elif kind == "error_response":
        http_response[kind] = view_ours_denied(message.error_response)
    else:
        assert kind is None, kind
    return {
        "status": (
            {
                "code": status.code,
                "message": status.message,
                "details": [view_ours_any(d) for d in status.details],
            }
            if message.HasField("status")
            else None
        ),
        "http_response": http_response,
        "dynamic_metadata": (
            view_ours_struct(message.dynamic_metadata) if message.HasField("dynamic_metadata") else None
        ),
    }


def walk_ours(message: Message) -> Iterator[Message]:
    """The message and every message nested in it (map values and repeated elements included)."""
    yield message
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        entry = _some(field.message_type)
        if entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                for item in value.values():
                    yield from walk_ours(item)
        elif field.is_repeated:
            for item in value:
                yield from walk_ours(item)
        else:
            yield from walk_ours(value)


def assert_no_unknown_fields_ours(message: Message) -> None:
    unknown = {m.DESCRIPTOR.full_name for m in walk_ours(message) if len(UnknownFieldSet(m))}
    assert unknown == set(), f"fields our protos do not know (number or wire type mismatch) in {unknown}"


def uncovered_fields(messages: list[Message]) -> set[str]:
    """Fields of our (non-google.protobuf) message types that none of the messages sets."""
    reached: set[str] = set()
    covered: set[str] = set()
    for message in messages:
        for item in walk_ours(message):
            reached.add(item.DESCRIPTOR.full_name)
            covered.update(field.full_name for field, _ in item.ListFields())
    pool = descriptor_pool.Default()
    return {
        field.full_name
        for name in reached
        if not name.startswith("google.protobuf.")
        for field in pool.FindMessageTypeByName(name).fields
    } - covered


# --------------------------------------------------------------------------------------------------
# Reference (envoy-data-plane / betterproto2): builders and views
# --------------------------------------------------------------------------------------------------


def ref_struct(spec: Spec) -> ref_pb.Struct:
    struct = ref_pb.Struct.from_dict(spec)
    assert isinstance(struct, ref_pb.Struct)
    return struct


def ref_any(spec: Spec) -> ref_pb.Any:
    return ref_pb.Any(type_url=spec["type_url"], value=spec["value"])


def ref_address(spec: Spec) -> ref_core.Address:
    if "socket_address" in spec:
        socket = dict(spec["socket_address"])
        socket["protocol"] = ref_core.SocketAddressProtocol[socket["protocol"]]
        return ref_core.Address(socket_address=ref_core.SocketAddress(**socket))
    if "pipe" in spec:
        return ref_core.Address(pipe=ref_core.Pipe(**spec["pipe"]))
    if "envoy_internal_address" in spec:
        return ref_core.Address(
            envoy_internal_address=ref_core.EnvoyInternalAddress(**spec["envoy_internal_address"])
        )
    assert spec == {}
    return ref_core.Address()


def ref_peer(spec: Spec) -> ref_auth.AttributeContextPeer:
    return ref_auth.AttributeContextPeer(
        address=ref_address(spec["address"]),
        service=spec["service"],
        labels=spec["labels"],
        principal=spec["principal"],
        certificate=spec["certificate"],
    )


def ref_metadata(spec: Spec) -> ref_core.Metadata:
    return ref_core.Metadata(
        filter_metadata={name: ref_struct(s) for name, s in spec["filter_metadata"].items()},
        typed_filter_metadata={name: ref_any(a) for name, a in spec["typed_filter_metadata"].items()},
    )


def ref_time(spec: Spec) -> datetime.datetime:
    assert spec["nanos"] % 1000 == 0, "betterproto2 keeps microseconds only"
    return EPOCH + datetime.timedelta(seconds=spec["seconds"], microseconds=spec["nanos"] // 1000)


def ref_http_request(spec: Spec) -> ref_auth.AttributeContextHttpRequest:
    scalars = {key: value for key, value in spec.items() if key != "header_map"}
    return ref_auth.AttributeContextHttpRequest(
        **scalars,
        header_map=ref_core.HeaderMap(
            headers=[ref_core.HeaderValue(**h) for h in spec["header_map"]["headers"]]
        ),
    )


def ref_request(spec: Spec) -> ref_auth.CheckRequest:
    request = spec["request"]
    return ref_auth.CheckRequest(
        attributes=ref_auth.AttributeContext(
            source=ref_peer(spec["source"]),
            destination=ref_peer(spec["destination"]),
            request=ref_auth.AttributeContextRequest(
                time=ref_time(request["time"]), http=ref_http_request(request["http"])
            ),
            context_extensions=spec["context_extensions"],
            metadata_context=ref_metadata(spec["metadata_context"]),
            tls_session=ref_auth.AttributeContextTlsSession(**spec["tls_session"]),
            route_metadata_context=ref_metadata(spec["route_metadata_context"]),
        )
    )


def ref_header_option(spec: Spec) -> ref_core.HeaderValueOption:
    return ref_core.HeaderValueOption(
        header=ref_core.HeaderValue(**spec["header"]),
        append=spec["append"],
        append_action=ref_core.HeaderValueOptionHeaderAppendAction[spec["append_action"]],
        keep_empty_value=spec["keep_empty_value"],
    )


def ref_denied(spec: Spec) -> ref_auth.DeniedHttpResponse:
    status = spec["status"]
    return ref_auth.DeniedHttpResponse(
        status=None if status is None else ref_type.HttpStatus(code=ref_type.StatusCode[status["code"]]),
        headers=[ref_header_option(h) for h in spec["headers"]],
        body=spec["body"],
    )


def ref_ok(spec: Spec) -> ref_auth.OkHttpResponse:
    metadata = spec["dynamic_metadata"]
    return ref_auth.OkHttpResponse(
        headers=[ref_header_option(h) for h in spec["headers"]],
        dynamic_metadata=None if metadata is None else ref_struct(metadata),
        headers_to_remove=spec["headers_to_remove"],
        response_headers_to_add=[ref_header_option(h) for h in spec["response_headers_to_add"]],
        query_parameters_to_set=[ref_core.QueryParameter(**q) for q in spec["query_parameters_to_set"]],
        query_parameters_to_remove=spec["query_parameters_to_remove"],
    )


def ref_response(spec: Spec) -> ref_auth.CheckResponse:
    status = spec["status"]
    http_response: dict[str, Any] = {}
    for kind, body in spec["http_response"].items():
        http_response[kind] = ref_ok(body) if kind == "ok_response" else ref_denied(body)
    metadata = spec["dynamic_metadata"]
    return ref_auth.CheckResponse(
        status=(
            None
            if status is None
            else ref_rpc.Status(
                code=status["code"],
                message=status["message"],
                details=[ref_any(d) for d in status["details"]],
            )
        ),
        dynamic_metadata=None if metadata is None else ref_struct(metadata),
        **http_response,
    )


def view_ref_struct(struct: ref_pb.Struct) -> Spec:
    view = struct.to_dict()
    assert isinstance(view, dict)
    return view


def view_ref_any(value: ref_pb.Any) -> Spec:
    return {"type_url": value.type_url, "value": value.value}


def view_ref_address(address: ref_core.Address) -> Spec:
    kind, _ = betterproto2.which_one_of(address, "address")
    if kind == "socket_address":
        socket = _some(address.socket_address)
        view: Spec = {
            "protocol": socket.protocol.name,
            "address": socket.address,
            "resolver_name": socket.resolver_name,
            "ipv4_compat": socket.ipv4_compat,
            "network_namespace_filepath": socket.network_namespace_filepath,
        }
        port, port_value = betterproto2.which_one_of(socket, "port_specifier")
        if port:
            view[port] = port_value
        return {kind: view}
    if kind == "pipe":
        pipe = _some(address.pipe)
        return {kind: {"path": pipe.path, "mode": pipe.mode}}
    if kind == "envoy_internal_address":
        internal = _some(address.envoy_internal_address)
        return {
            kind: {"server_listener_name": internal.server_listener_name, "endpoint_id": internal.endpoint_id}
        }
    assert kind == "", kind
    return {}


def view_ref_peer(peer: ref_auth.AttributeContextPeer) -> Spec:
    return {
        "address": None if peer.address is None else view_ref_address(peer.address),
        "service": peer.service,
        "labels": dict(peer.labels),
        "principal": peer.principal,
        "certificate": peer.certificate,
    }


def view_ref_metadata(metadata: ref_core.Metadata) -> Spec:
    return {
        "filter_metadata": {name: view_ref_struct(s) for name, s in metadata.filter_metadata.items()},
        "typed_filter_metadata": {
            name: view_ref_any(a) for name, a in metadata.typed_filter_metadata.items()
        },
    }


def view_ref_header_value(header: ref_core.HeaderValue) -> Spec:
    return {"key": header.key, "value": header.value, "raw_value": header.raw_value}


def view_ref_http_request(http: ref_auth.AttributeContextHttpRequest) -> Spec:
    return {
        "id": http.id,
        "method": http.method,
        "headers": dict(http.headers),
        "path": http.path,
        "host": http.host,
        "scheme": http.scheme,
        "query": http.query,
        "fragment": http.fragment,
        "size": http.size,
        "protocol": http.protocol,
        "body": http.body,
        "raw_body": http.raw_body,
        "header_map": (
            None
            if http.header_map is None
            else {"headers": [view_ref_header_value(h) for h in http.header_map.headers]}
        ),
    }


def view_ref_request(message: ref_auth.CheckRequest) -> Spec:
    attributes = _some(message.attributes)
    request = _some(attributes.request)
    time = _some(request.time)
    assert time.tzinfo is not None
    return {
        "source": view_ref_peer(_some(attributes.source)),
        "destination": view_ref_peer(_some(attributes.destination)),
        "request": {
            "time": {"seconds": (time - EPOCH) // SECOND, "nanos": time.microsecond * 1000},
            "http": view_ref_http_request(_some(request.http)),
        },
        "context_extensions": dict(attributes.context_extensions),
        "metadata_context": view_ref_metadata(_some(attributes.metadata_context)),
        "tls_session": {"sni": _some(attributes.tls_session).sni},
        "route_metadata_context": view_ref_metadata(_some(attributes.route_metadata_context)),
    }


def view_ref_header_option(option: ref_core.HeaderValueOption) -> Spec:
    return {
        "header": None if option.header is None else view_ref_header_value(option.header),
        "append": option.append,
        "append_action": option.append_action.name,
        "keep_empty_value": option.keep_empty_value,
    }


def view_ref_denied(denied: ref_auth.DeniedHttpResponse) -> Spec:
    return {
        "status": None if denied.status is None else {"code": denied.status.code.name},
        "headers": [view_ref_header_option(h) for h in denied.headers],
        "body": denied.body,
    }


def view_ref_ok(ok: ref_auth.OkHttpResponse) -> Spec:
    return {
        "headers": [view_ref_header_option(h) for h in ok.headers],
        "dynamic_metadata": None if ok.dynamic_metadata is None else view_ref_struct(ok.dynamic_metadata),
        "headers_to_remove": list(ok.headers_to_remove),
        "response_headers_to_add": [view_ref_header_option(h) for h in ok.response_headers_to_add],
        "query_parameters_to_set": [{"key": q.key, "value": q.value} for q in ok.query_parameters_to_set],
        "query_parameters_to_remove": list(ok.query_parameters_to_remove),
    }


def view_ref_response(message: ref_auth.CheckResponse) -> Spec:
    kind, _ = betterproto2.which_one_of(message, "http_response")
    http_response: Spec = {}
    if kind == "ok_response":
        http_response[kind] = view_ref_ok(_some(message.ok_response))
    elif kind == "denied_response":
        http_response[kind] = view_ref_denied(_some(message.denied_response))
    elif kind == "error_response":
        http_response[kind] = view_ref_denied(_some(message.error_response))
    else:
        assert kind == "", kind
    status = message.status
    return {
        "status": (
            None
            if status is None
            else {
                "code": status.code,
                "message": status.message,
                "details": [view_ref_any(d) for d in status.details],
            }
        ),
        "http_response": http_response,
        "dynamic_metadata": None
        if message.dynamic_metadata is None
        else view_ref_struct(message.dynamic_metadata),
    }


def reference_metadata(cls: type[betterproto2.Message]) -> Any:
    """betterproto2's field metadata of a message class (its classproperty is typed for Message only)."""
    return cls._betterproto  # type: ignore[arg-type]


def walk_ref(message: betterproto2.Message) -> Iterator[betterproto2.Message]:
    yield message
    for name in reference_metadata(type(message)).meta_by_field_name:
        value = getattr(message, name)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, betterproto2.Message):
                yield from walk_ref(item)


def assert_no_unknown_fields_ref(message: betterproto2.Message) -> None:
    unknown = {type(m).__name__ for m in walk_ref(message) if m._unknown_fields}
    assert unknown == set(), f"fields the reference does not know (number or wire type mismatch) in {unknown}"


# --------------------------------------------------------------------------------------------------
# Sanity of the fixtures themselves: each builder/view pair reproduces the spec
# --------------------------------------------------------------------------------------------------


def test_request_spec_builds_in_both_libraries() -> None:
    assert_matches(view_ours_request(ours_request(REQUEST)), REQUEST)
    assert_matches(view_ref_request(ref_request(REQUEST)), REQUEST)
    assert ref_time(REQUEST["request"]["time"]) == REQUEST_TIME


def test_request_spec_sets_every_field() -> None:
    assert uncovered_fields([ours_request(REQUEST)]) == REQUEST_UNCOVERED


@ignore_reference_deprecations
@pytest.mark.parametrize("case", RESPONSES)
def test_response_spec_builds_in_both_libraries(case: str) -> None:
    assert_matches(view_ours_response(ours_response(RESPONSES[case])), RESPONSES[case])
    assert_matches(view_ref_response(ref_response(RESPONSES[case])), RESPONSES[case])


def test_response_specs_set_every_field() -> None:
    assert uncovered_fields([ours_response(spec) for spec in RESPONSES.values()]) == RESPONSES_UNCOVERED


# --------------------------------------------------------------------------------------------------
# CheckRequest (what Envoy sends us)
# --------------------------------------------------------------------------------------------------


def test_request_reference_to_ours() -> None:
    data = bytes(ref_request(REQUEST))
    parsed = external_auth_pb2.CheckRequest.FromString(data)
    assert_no_unknown_fields_ours(parsed)
    assert_matches(view_ours_request(parsed), REQUEST)
    assert parsed == ours_request(REQUEST)


def test_request_ours_to_reference() -> None:
    data = ours_request(REQUEST).SerializeToString()
    parsed = ref_auth.CheckRequest.parse(data)
    assert_no_unknown_fields_ref(parsed)
    assert_matches(view_ref_request(parsed), REQUEST)
    assert parsed == ref_request(REQUEST)


def test_request_round_trip() -> None:
    ours = ours_request(REQUEST)
    via_reference = ref_auth.CheckRequest.parse(ours.SerializeToString())
    assert external_auth_pb2.CheckRequest.FromString(bytes(via_reference)) == ours
    reference = ref_request(REQUEST)
    via_ours = external_auth_pb2.CheckRequest.FromString(bytes(reference))
    assert ref_auth.CheckRequest.parse(via_ours.SerializeToString()) == reference


def test_request_header_map_keeps_duplicates_and_raw_bytes() -> None:
    """The encode_raw_headers form: duplicate keys stay separate entries, values are raw bytes."""
    parsed = external_auth_pb2.CheckRequest.FromString(bytes(ref_request(REQUEST)))
    entries = [(h.key, h.raw_value) for h in parsed.attributes.request.http.header_map.headers]
    assert [raw for key, raw in entries if key == "cookie"] == [b"a=1", b"b=2"]
    assert dict(entries)["x-binary"] == b"\xff\xfe\x00\x80"


@pytest.mark.parametrize("size", [-1, 0, 1, 2**31, 2**63 - 1, -(2**63)])
def test_http_request_size_is_int64(size: int) -> None:
    ours = attribute_context_pb2.AttributeContext.HttpRequest(size=size)
    assert ref_auth.AttributeContextHttpRequest.parse(ours.SerializeToString()).size == size
    reference = ref_auth.AttributeContextHttpRequest(size=size)
    assert attribute_context_pb2.AttributeContext.HttpRequest.FromString(bytes(reference)).size == size


@pytest.mark.parametrize("case", ADDRESSES)
def test_address_variants_both_ways(case: str) -> None:
    spec = ADDRESSES[case]
    from_reference = address_pb2.Address.FromString(bytes(ref_address(spec)))
    assert_no_unknown_fields_ours(from_reference)
    assert view_ours_address(from_reference) == spec
    assert from_reference == ours_address(spec)
    from_ours = ref_core.Address.parse(ours_address(spec).SerializeToString())
    assert_no_unknown_fields_ref(from_ours)
    assert view_ref_address(from_ours) == spec
    assert from_ours == ref_address(spec)


def test_address_variants_cover_every_field() -> None:
    messages: list[Message] = [ours_address(spec) for spec in ADDRESSES.values()]
    messages.append(ours_request(REQUEST))
    assert uncovered_fields(messages) == set()


# --------------------------------------------------------------------------------------------------
# CheckResponse (what we answer)
# --------------------------------------------------------------------------------------------------


@ignore_reference_deprecations
@pytest.mark.parametrize("case", RESPONSES)
def test_response_reference_to_ours(case: str) -> None:
    spec = RESPONSES[case]
    parsed = external_auth_pb2.CheckResponse.FromString(bytes(ref_response(spec)))
    assert_no_unknown_fields_ours(parsed)
    assert_matches(view_ours_response(parsed), spec)
    assert parsed == ours_response(spec)


@ignore_reference_deprecations
@pytest.mark.parametrize("case", RESPONSES)
def test_response_ours_to_reference(case: str) -> None:
    spec = RESPONSES[case]
    parsed = ref_auth.CheckResponse.parse(ours_response(spec).SerializeToString())
    assert_no_unknown_fields_ref(parsed)
    assert_matches(view_ref_response(parsed), spec)
    assert parsed == ref_response(spec)


@ignore_reference_deprecations
@pytest.mark.parametrize("case", RESPONSES)
def test_response_round_trip(case: str) -> None:
    ours = ours_response(RESPONSES[case])
    via_reference = ref_auth.CheckResponse.parse(ours.SerializeToString())
    assert external_auth_pb2.CheckResponse.FromString(bytes(via_reference)) == ours
    reference = ref_response(RESPONSES[case])
    via_ours = external_auth_pb2.CheckResponse.FromString(bytes(reference))
    assert ref_auth.CheckResponse.parse(via_ours.SerializeToString()) == reference


@ignore_reference_deprecations
def test_append_false_is_sent_and_distinct_from_unset() -> None:
    """`append = false` must reach Envoy as a present BoolValue, not be dropped as a default."""
    ok = RESPONSES["ok"]["http_response"]["ok_response"]
    parsed = ref_auth.CheckResponse.parse(ours_response(RESPONSES["ok"]).SerializeToString())
    headers = _some(parsed.ok_response).headers
    by_key = {_some(h.header).key: h for h in headers}
    assert by_key["x-auth-subject"].append is False
    assert by_key["x-auth-scopes"].append is None
    assert by_key["x-auth-groups"].append is True
    assert (
        by_key["x-auth-subject"].append_action
        == ref_core.HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
    )
    assert [h["header"]["key"] for h in ok["headers"]] == [_some(h.header).key for h in headers]


# --------------------------------------------------------------------------------------------------
# Every field of every message in our .proto files matches the reference's field of that number
# --------------------------------------------------------------------------------------------------

OUR_FILES = (address_pb2, base_pb2, attribute_context_pb2, external_auth_pb2, http_status_pb2, status_pb2)


def _our_messages() -> list[Descriptor]:
    found: list[Descriptor] = []

    def visit(message: Descriptor) -> None:
        if message.GetOptions().map_entry:
            return
        found.append(message)
        for nested in message.nested_types:
            visit(nested)

    for module in OUR_FILES:
        for message in module.DESCRIPTOR.message_types_by_name.values():
            visit(message)
    return found


OUR_MESSAGES = {message.full_name: message for message in _our_messages()}


def _reference_class(full_name: str) -> type[betterproto2.Message]:
    return default_message_pool.url_to_type[f"type.googleapis.com/{full_name}"]


def _reference_full_name(cls: type) -> str:
    return default_message_pool.type_to_url[cls].removeprefix("type.googleapis.com/")


def _proto_type(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "map" if _some(field.message_type).GetOptions().map_entry else "message"
    names = {
        FieldDescriptor.TYPE_STRING: "string",
        FieldDescriptor.TYPE_BYTES: "bytes",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_INT32: "int32",
        FieldDescriptor.TYPE_INT64: "int64",
        FieldDescriptor.TYPE_UINT32: "uint32",
        FieldDescriptor.TYPE_UINT64: "uint64",
        FieldDescriptor.TYPE_ENUM: "enum",
        FieldDescriptor.TYPE_DOUBLE: "double",
    }
    return names[field.type]


def test_every_upstream_message_is_covered() -> None:
    assert sorted(OUR_MESSAGES) == sorted(
        {
            "envoy.config.core.v3.Address",
            "envoy.config.core.v3.EnvoyInternalAddress",
            "envoy.config.core.v3.HeaderMap",
            "envoy.config.core.v3.HeaderValue",
            "envoy.config.core.v3.HeaderValueOption",
            "envoy.config.core.v3.Metadata",
            "envoy.config.core.v3.Pipe",
            "envoy.config.core.v3.QueryParameter",
            "envoy.config.core.v3.SocketAddress",
            "envoy.service.auth.v3.AttributeContext",
            "envoy.service.auth.v3.AttributeContext.HttpRequest",
            "envoy.service.auth.v3.AttributeContext.Peer",
            "envoy.service.auth.v3.AttributeContext.Request",
            "envoy.service.auth.v3.AttributeContext.TLSSession",
            "envoy.service.auth.v3.CheckRequest",
            "envoy.service.auth.v3.CheckResponse",
            "envoy.service.auth.v3.DeniedHttpResponse",
            "envoy.service.auth.v3.OkHttpResponse",
            "envoy.type.v3.HttpStatus",
            "google.rpc.Status",
        }
    )


@pytest.mark.parametrize("full_name", sorted(OUR_MESSAGES))
def test_fields_match_reference(full_name: str) -> None:
    ours = OUR_MESSAGES[full_name]
    reference = _reference_class(full_name)
    meta = reference_metadata(reference)
    problems: list[str] = []
    for field in ours.fields:
        ref_name = meta.field_name_by_number.get(field.number)
        if ref_name != field.name:
            problems.append(f"{field.name} = {field.number}: reference has {ref_name!r} at that number")
            continue
        ref_meta = meta.meta_by_field_name[ref_name]
        ours_type = _proto_type(field)
        if ref_meta.proto_type != ours_type:
            problems.append(f"{field.name}: type {ours_type}, reference {ref_meta.proto_type}")
            continue
        if bool(ref_meta.repeated) != (field.is_repeated and ours_type != "map"):
            problems.append(f"{field.name}: repeated {field.is_repeated}, reference {ref_meta.repeated}")
        if ours_type == "message":
            ref_cls = ref_meta.unwrap() if ref_meta.unwrap else meta.cls_by_field[ref_name]
            if _reference_full_name(ref_cls) != _some(field.message_type).full_name:
                problems.append(f"{field.name}: {_some(field.message_type).full_name}, reference {ref_cls}")
        if ours_type == "map":
            entry = _some(field.message_type)
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            ref_key, ref_value = ref_meta.map_meta
            if (_proto_type(key), _proto_type(value)) != (ref_key.proto_type, ref_value.proto_type):
                problems.append(f"{field.name}: map<{key.type}, {value.type}>, reference {ref_meta.map_meta}")
            elif value.type == FieldDescriptor.TYPE_MESSAGE:
                ref_value_cls = meta.cls_by_field[f"{ref_name}.value"]
                if _reference_full_name(ref_value_cls) != _some(value.message_type).full_name:
                    problems.append(
                        f"{field.name}: map value {value.message_type}, reference {ref_value_cls}"
                    )
        if ours_type == "enum":
            ref_enum = meta.cls_by_field[ref_name]
            ref_values = {member.name: int(member.value) for member in ref_enum}
            our_values = {v.name: v.number for v in _some(field.enum_type).values}
            missing = {name: n for name, n in our_values.items() if ref_values.get(name) != n}
            if missing:
                problems.append(f"{field.name}: enum values not in the reference: {missing}")
    assert problems == []


@pytest.mark.parametrize("full_name", sorted(OUR_MESSAGES))
def test_oneofs_match_reference(full_name: str) -> None:
    """The same fields share a oneof (names are not on the wire; membership is, via last-one-wins)."""
    ours = OUR_MESSAGES[full_name]
    meta = reference_metadata(_reference_class(full_name))
    our_numbers = {field.number for field in ours.fields}
    reference_groups = {
        frozenset(n for f in fields if (n := meta.meta_by_field_name[f.name].number) in our_numbers)
        for fields in meta.oneof_field_by_group.values()
    } - {frozenset()}
    our_groups = {frozenset(field.number for field in oneof.fields) for oneof in ours.oneofs}
    assert our_groups == reference_groups
