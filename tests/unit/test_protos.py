"""The generated code in ext_authz/_proto is current, and our .proto files follow the wire contract.

The field table below is written from /work/shared/ENVOY_PROTOCOL.md section 1 (checked against
Envoy 1.40). Field numbers, wire types and the method path are what Envoy sees; names of oneofs and
of the .proto files are not on the wire.
"""

from __future__ import annotations

import http
import importlib.util
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.rpc import status_pb2

# Imported for their side effect too: they register our descriptors in the default pool.
from ext_authz._proto.envoy.config.core.v3 import address_pb2, base_pb2
from ext_authz._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from ext_authz._proto.envoy.type.v3 import http_status_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = REPO_ROOT / "protos" / "generate.py"
COMMITTED = REPO_ROOT / "ext_authz" / "_proto"

CHECK_METHOD_PATH = "/envoy.service.auth.v3.Authorization/Check"


# --------------------------------------------------------------------------------------------------
# Generated code is current
# --------------------------------------------------------------------------------------------------


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_ext_authz_protos_generate", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under root, ignoring __pycache__."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.relative_to(root).parts
    }


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_root = tmp_path_factory.mktemp("protos")
    _load_generator().generate(out_root)
    return out_root


def test_generator_writes_only_the_proto_package(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == ["ext_authz"]
    assert sorted(p.name for p in (regenerated / "ext_authz").iterdir()) == ["_proto"]


def test_regenerated_files_are_the_committed_files(regenerated: Path) -> None:
    fresh = _tree(regenerated / "ext_authz" / "_proto")
    committed = _tree(COMMITTED)
    assert fresh, "the generator produced nothing"
    not_committed = sorted(set(fresh) - set(committed))
    not_generated = sorted(set(committed) - set(fresh))
    assert (not_committed, not_generated) == ([], []), "run `make protos`: (missing, stray) generated files"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert stale == [], f"run `make protos`: these generated files differ from protos/: {stale}"


# --------------------------------------------------------------------------------------------------
# Service and method: the path Envoy calls
# --------------------------------------------------------------------------------------------------


def test_check_method_full_name() -> None:
    service = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    method = service.methods_by_name["Check"]
    assert external_auth_pb2.DESCRIPTOR.package == "envoy.service.auth.v3"
    assert service.full_name == "envoy.service.auth.v3.Authorization"
    assert method.full_name == "envoy.service.auth.v3.Authorization.Check"
    assert f"/{service.full_name}/{method.name}" == CHECK_METHOD_PATH
    assert method.input_type.full_name == "envoy.service.auth.v3.CheckRequest"
    assert method.output_type.full_name == "envoy.service.auth.v3.CheckResponse"
    assert not method.client_streaming
    assert not method.server_streaming
    assert list(service.methods_by_name) == ["Check"]


class _Servicer(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        response = external_auth_pb2.CheckResponse()
        response.status.code = 0
        response.status.message = request.attributes.request.http.path
        return response


@pytest.fixture
def grpc_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    register: Any = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
    register(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def test_generated_servicer_answers_envoys_method_path(grpc_target: str) -> None:
    """A raw call on the literal path Envoy uses reaches the servicer registered by our _grpc module."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.path = "/probe?x=1"
    with grpc.insecure_channel(grpc_target) as channel:
        call = channel.unary_unary(
            CHECK_METHOD_PATH,
            request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
            response_deserializer=external_auth_pb2.CheckResponse.FromString,
        )
        response = call(request, timeout=10)
    assert response.status.message == "/probe?x=1"


# --------------------------------------------------------------------------------------------------
# Field numbers and types (ENVOY_PROTOCOL.md section 1)
# --------------------------------------------------------------------------------------------------

ANY_ONEOF = "*"  # in a oneof whose name the document does not give (names are not on the wire)

AUTH = "envoy.service.auth.v3"
CORE = "envoy.config.core.v3"
HVO = f"{CORE}.HeaderValueOption"


class Field(NamedTuple):
    message: str
    name: str
    number: int
    type: str
    oneof: str | None = None


FIELDS: tuple[Field, ...] = (
    Field(f"{AUTH}.CheckRequest", "attributes", 1, f"{AUTH}.AttributeContext"),
    Field(f"{AUTH}.CheckResponse", "status", 1, "google.rpc.Status"),
    Field(f"{AUTH}.CheckResponse", "denied_response", 2, f"{AUTH}.DeniedHttpResponse", "http_response"),
    Field(f"{AUTH}.CheckResponse", "ok_response", 3, f"{AUTH}.OkHttpResponse", "http_response"),
    Field(f"{AUTH}.CheckResponse", "error_response", 5, f"{AUTH}.DeniedHttpResponse", "http_response"),
    Field(f"{AUTH}.CheckResponse", "dynamic_metadata", 4, "google.protobuf.Struct"),
    Field(f"{AUTH}.OkHttpResponse", "headers", 2, f"repeated {HVO}"),
    Field(f"{AUTH}.OkHttpResponse", "dynamic_metadata", 3, "google.protobuf.Struct"),
    Field(f"{AUTH}.OkHttpResponse", "headers_to_remove", 5, "repeated string"),
    Field(f"{AUTH}.OkHttpResponse", "response_headers_to_add", 6, f"repeated {HVO}"),
    Field(f"{AUTH}.OkHttpResponse", "query_parameters_to_set", 7, f"repeated {CORE}.QueryParameter"),
    Field(f"{AUTH}.OkHttpResponse", "query_parameters_to_remove", 8, "repeated string"),
    Field(f"{AUTH}.DeniedHttpResponse", "status", 1, "envoy.type.v3.HttpStatus"),
    Field(f"{AUTH}.DeniedHttpResponse", "headers", 2, f"repeated {HVO}"),
    Field(f"{AUTH}.DeniedHttpResponse", "body", 3, "string"),
    Field(f"{AUTH}.AttributeContext", "source", 1, f"{AUTH}.AttributeContext.Peer"),
    Field(f"{AUTH}.AttributeContext", "destination", 2, f"{AUTH}.AttributeContext.Peer"),
    Field(f"{AUTH}.AttributeContext", "request", 4, f"{AUTH}.AttributeContext.Request"),
    Field(f"{AUTH}.AttributeContext", "context_extensions", 10, "map<string, string>"),
    Field(f"{AUTH}.AttributeContext", "metadata_context", 11, f"{CORE}.Metadata"),
    Field(f"{AUTH}.AttributeContext", "tls_session", 12, f"{AUTH}.AttributeContext.TLSSession"),
    Field(f"{AUTH}.AttributeContext", "route_metadata_context", 13, f"{CORE}.Metadata"),
    Field(f"{AUTH}.AttributeContext.Peer", "address", 1, f"{CORE}.Address"),
    Field(f"{AUTH}.AttributeContext.Peer", "service", 2, "string"),
    Field(f"{AUTH}.AttributeContext.Peer", "labels", 3, "map<string, string>"),
    Field(f"{AUTH}.AttributeContext.Peer", "principal", 4, "string"),
    Field(f"{AUTH}.AttributeContext.Peer", "certificate", 5, "string"),
    Field(f"{AUTH}.AttributeContext.Request", "time", 1, "google.protobuf.Timestamp"),
    Field(f"{AUTH}.AttributeContext.Request", "http", 2, f"{AUTH}.AttributeContext.HttpRequest"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "id", 1, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "method", 2, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "headers", 3, "map<string, string>"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "path", 4, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "host", 5, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "scheme", 6, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "query", 7, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "fragment", 8, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "size", 9, "int64"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "protocol", 10, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "body", 11, "string"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "raw_body", 12, "bytes"),
    Field(f"{AUTH}.AttributeContext.HttpRequest", "header_map", 13, f"{CORE}.HeaderMap"),
    Field(f"{AUTH}.AttributeContext.TLSSession", "sni", 1, "string"),
    Field(HVO, "header", 1, f"{CORE}.HeaderValue"),
    # A wrapper message (presence matters), NOT a plain bool: a bool here would be a different
    # wire type (varint instead of length-delimited) and Envoy would reject the response.
    Field(HVO, "append", 2, "google.protobuf.BoolValue"),
    Field(HVO, "append_action", 3, f"enum {HVO}.HeaderAppendAction"),
    Field(HVO, "keep_empty_value", 4, "bool"),
    Field(f"{CORE}.HeaderValue", "key", 1, "string"),
    Field(f"{CORE}.HeaderValue", "value", 2, "string"),
    Field(f"{CORE}.HeaderValue", "raw_value", 3, "bytes"),
    Field(f"{CORE}.HeaderMap", "headers", 1, f"repeated {CORE}.HeaderValue"),
    Field(f"{CORE}.QueryParameter", "key", 1, "string"),
    Field(f"{CORE}.QueryParameter", "value", 2, "string"),
    Field(f"{CORE}.Metadata", "filter_metadata", 1, "map<string, google.protobuf.Struct>"),
    Field(f"{CORE}.Metadata", "typed_filter_metadata", 2, "map<string, google.protobuf.Any>"),
    Field(f"{CORE}.Address", "socket_address", 1, f"{CORE}.SocketAddress", "address"),
    Field(f"{CORE}.Address", "pipe", 2, f"{CORE}.Pipe", "address"),
    Field(f"{CORE}.Address", "envoy_internal_address", 3, f"{CORE}.EnvoyInternalAddress", "address"),
    Field(f"{CORE}.SocketAddress", "protocol", 1, f"enum {CORE}.SocketAddress.Protocol"),
    Field(f"{CORE}.SocketAddress", "address", 2, "string"),
    Field(f"{CORE}.SocketAddress", "port_value", 3, "uint32", "port_specifier"),
    Field(f"{CORE}.SocketAddress", "named_port", 4, "string", "port_specifier"),
    Field(f"{CORE}.SocketAddress", "resolver_name", 5, "string"),
    Field(f"{CORE}.SocketAddress", "ipv4_compat", 6, "bool"),
    Field(f"{CORE}.SocketAddress", "network_namespace_filepath", 7, "string"),
    Field(f"{CORE}.Pipe", "path", 1, "string"),
    Field(f"{CORE}.Pipe", "mode", 2, "uint32"),
    Field(f"{CORE}.EnvoyInternalAddress", "server_listener_name", 1, "string", ANY_ONEOF),
    Field(f"{CORE}.EnvoyInternalAddress", "endpoint_id", 2, "string"),
    Field("envoy.type.v3.HttpStatus", "code", 1, "enum envoy.type.v3.StatusCode"),
    Field("google.rpc.Status", "code", 1, "int32"),
    Field("google.rpc.Status", "message", 2, "string"),
    Field("google.rpc.Status", "details", 3, "repeated google.protobuf.Any"),
)

MESSAGES = tuple(dict.fromkeys(field.message for field in FIELDS))

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_DOUBLE: "double",
}


def describe(field: FieldDescriptor) -> str:
    """The field's type as written in the table: `repeated X`, `map<K, V>`, `enum E`, a message name."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = field.message_type
        assert message is not None
        if message.GetOptions().map_entry:
            key, value = message.fields_by_name["key"], message.fields_by_name["value"]
            return f"map<{describe(key)}, {describe(value)}>"
        base = message.full_name
    elif field.type == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        base = f"enum {field.enum_type.full_name}"
    else:
        base = _SCALARS[field.type]
    return f"repeated {base}" if field.is_repeated else base


def _message(full_name: str) -> Descriptor:
    return descriptor_pool.Default().FindMessageTypeByName(full_name)


def _oneof_name(field: FieldDescriptor) -> str | None:
    return None if field.containing_oneof is None else field.containing_oneof.name


def test_table_has_no_duplicates() -> None:
    assert len({(f.message, f.name) for f in FIELDS}) == len(FIELDS)
    assert len({(f.message, f.number) for f in FIELDS}) == len(FIELDS)


@pytest.mark.parametrize("message_name", MESSAGES)
def test_field_numbers_and_types(message_name: str) -> None:
    message = _message(message_name)
    expected = {f.name: (f.number, f.type) for f in FIELDS if f.message == message_name}
    actual = {
        name: (field.number, describe(field))
        for name, field in message.fields_by_name.items()
        if name in expected
    }
    assert actual == expected
    # Whatever else the message declares must not reuse a number from the contract.
    contract_numbers = {number for number, _ in expected.values()}
    others = {f.name: f.number for f in message.fields if f.name not in expected}
    assert not contract_numbers & set(others.values()), others


@pytest.mark.parametrize("message_name", MESSAGES)
def test_oneof_membership(message_name: str) -> None:
    message = _message(message_name)
    for spec in (f for f in FIELDS if f.message == message_name):
        oneof = _oneof_name(message.fields_by_name[spec.name])
        if spec.oneof == ANY_ONEOF:
            assert oneof is not None, f"{message_name}.{spec.name} must be in a oneof"
        else:
            assert oneof == spec.oneof, f"{message_name}.{spec.name}"


def test_check_response_http_response_oneof() -> None:
    message = _message(f"{AUTH}.CheckResponse")
    oneof = message.oneofs_by_name["http_response"]
    assert sorted(field.number for field in oneof.fields) == [2, 3, 5]
    assert message.fields_by_name["dynamic_metadata"].number == 4
    assert message.fields_by_name["dynamic_metadata"].containing_oneof is None


def test_header_value_option_append_is_a_bool_value_wrapper() -> None:
    append = base_pb2.HeaderValueOption.DESCRIPTOR.fields_by_name["append"]
    assert append.type == FieldDescriptor.TYPE_MESSAGE
    assert append.message_type is not None
    assert append.message_type.full_name == "google.protobuf.BoolValue"
    # Presence: an explicit `append = false` is distinguishable from "unset" and goes on the wire.
    option = base_pb2.HeaderValueOption()
    assert not option.HasField("append")
    option.append.value = False
    assert option.HasField("append")
    assert option.SerializeToString() == b"\x12\x00"


def test_http_request_header_map_is_field_13() -> None:
    field = attribute_context_pb2.AttributeContext.HttpRequest.DESCRIPTOR.fields_by_name["header_map"]
    assert field.number == 13
    assert field.message_type is not None
    assert field.message_type.full_name == f"{CORE}.HeaderMap"


def _enum_values(full_name: str) -> dict[str, int]:
    enum = descriptor_pool.Default().FindEnumTypeByName(full_name)
    return {value.name: value.number for value in enum.values}


def test_header_append_action_values() -> None:
    assert _enum_values(f"{HVO}.HeaderAppendAction") == {
        "APPEND_IF_EXISTS_OR_ADD": 0,
        "ADD_IF_ABSENT": 1,
        "OVERWRITE_IF_EXISTS_OR_ADD": 2,
        "OVERWRITE_IF_EXISTS": 3,
    }


def test_socket_address_protocol_values() -> None:
    assert _enum_values(f"{CORE}.SocketAddress.Protocol") == {"TCP": 0, "UDP": 1}


def test_http_status_code_values() -> None:
    values = _enum_values("envoy.type.v3.StatusCode")
    named = {
        "Empty": 0,
        "OK": 200,
        "BadRequest": 400,
        "Unauthorized": 401,
        "Forbidden": 403,
        "TooManyRequests": 429,
        "InternalServerError": 500,
        "ServiceUnavailable": 503,
    }
    assert {name: values.get(name) for name in named} == named
    # Every other value is an HTTP status code numbered by its value.
    standard = {status.value for status in http.HTTPStatus}
    assert sorted(n for n in values.values() if n != 0 and n not in standard) == []
    assert len(set(values.values())) == len(values)


@pytest.mark.parametrize(
    ("module", "package"),
    [
        (address_pb2, CORE),
        (base_pb2, CORE),
        (attribute_context_pb2, AUTH),
        (external_auth_pb2, AUTH),
        (http_status_pb2, "envoy.type.v3"),
        (status_pb2, "google.rpc"),
    ],
    ids=lambda value: value.__name__.rsplit(".", 1)[-1] if isinstance(value, ModuleType) else value,
)
def test_upstream_package_names(module: ModuleType, package: str) -> None:
    assert module.DESCRIPTOR.package == package
