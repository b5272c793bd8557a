"""Adapters at the gRPC edge. Wire facts: ../shared/ENVOY_PROTOCOL.md."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping

from google.protobuf import struct_pb2
from google.rpc import status_pb2

from ext_authz._proto.envoy.config.core.v3 import base_pb2
from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2
from ext_authz._proto.envoy.type.v3 import http_status_pb2
from ext_authz.model import Allow, Decision, Request

# Envoy 1.40 honours only the deprecated `append` on upstream headers (unset = replace), newer Envoy
# honours `append_action` (unset = append beside the client's copy): this value replaces on both.
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def to_request(check: external_auth_pb2.CheckRequest) -> Request:
    attributes = check.attributes
    http = attributes.request.http
    headers: dict[str, str]
    if http.headers:
        headers = dict(http.headers)
    else:
        # encode_raw_headers: true → only header_map is filled, one entry per header line.
        headers = {}
        for entry in http.header_map.headers:
            key = entry.key.lower()
            value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
            if key in headers:
                headers[key] += ("; " if key == "cookie" else ",") + value
            else:
                headers[key] = value
    path, _, query = (http.path or headers.get(":path", "")).partition("?")
    return Request(
        method=http.method or headers.get(":method", ""),
        path=path.partition("#")[0],
        query=query.partition("#")[0],
        host=http.host or headers.get(":authority", ""),
        headers=headers,
        context=dict(extensions) if (extensions := attributes.context_extensions) else {},
        scheme=http.scheme or headers.get(":scheme", ""),
        body=http.body or (http.raw_body.decode("utf-8", "replace") if http.raw_body else ""),
        # include_peer_certificate: true (RFC 8705 certificate-bound tokens).
        peer_certificate=attributes.source.certificate,
    )


_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # Several Set-Cookie lines to the client: each its own line, appended (RFC 6265 §3 forbids
    # folding them into one); every other header replaces what is there.
    action = _APPEND if name == "set-cookie" else _OVERWRITE
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=action
    )


def _metadata(values: Mapping[str, object]) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update(values)  # type: ignore[arg-type]  # JSON values only
    return metadata


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: tag byte (field number << 3 | 2), length, bytes."""
    return bytes((tag,)) + _varint(len(payload)) + payload


_REQUEST_ID_KEY = _field(0x0A, b"request_id")  # Struct.fields entry: key = 1
_SHORT_ID_BYTES = 109  # the outermost length, n + 18, is at most 127


def _request_id_suffix(request_id: str) -> bytes:
    """``dynamic_metadata {fields {key: "request_id" value {string_value: ...}}}`` on the wire.

    Protobuf merges a message field that appears twice (and a map entry's later value wins), so
    appended to a serialized CheckResponse this adds the request id to its dynamic metadata: the
    same message to_response(decision, request_id) builds (tested by parsing both)."""
    encoded = request_id.encode("utf-8")
    n = len(encoded)
    if n <= _SHORT_ID_BYTES:  # every length below fits one varint byte: the same bytes, built at once
        return bytes((0x22, n + 18, 0x0A, n + 16)) + _REQUEST_ID_KEY + bytes((0x12, n + 2, 0x1A, n)) + encoded
    value = _field(0x1A, encoded)  # Value.string_value = 3
    entry = _field(0x0A, _REQUEST_ID_KEY + _field(0x12, value))  # Struct.fields = 1; entry value = 2
    return _field(0x22, entry)  # CheckResponse.dynamic_metadata = 4


_RESPONSE_CACHE_ENTRIES = 4096
_ONE_OFF = frozenset({"set-cookie", "location"})


class _Responses:
    """Serialized answers by what they are made of; the request id is spliced in per request.

    A cached token under one rule gets the same Allow contents every time (the same claims object,
    headers and metadata), so its response is built and serialized once. The key holds the claims
    object itself (by identity; the entry keeps it, so its id is not reused while cached); an
    Allow whose metadata holds anything else that is not a plain value is not cached.
    """

    def __init__(self, max_entries: int = _RESPONSE_CACHE_ENTRIES) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[object, tuple[object, bytes]] = OrderedDict()

    @staticmethod
    def _key(decision: Decision) -> tuple[object, object] | None:
        if not isinstance(decision, Allow):
            # A sign-in's redirect and cookies are made for one browser: built each time, never kept.
            return None if any(name in _ONE_OFF for name, _ in decision.headers) else (decision, None)
        parts: list[object] = []
        claims: object = None
        for name, value in decision.metadata.items():
            if name == "claims" and isinstance(value, Mapping):
                parts.append((name, id(value)))
                claims = value
            elif value is None or isinstance(value, str | int | bool):
                parts.append((name, type(value), value))
            elif isinstance(value, float):
                parts.append((name, float, repr(value)))  # 0.0 == -0.0, yet they serialize apart
            else:
                return None
        if decision.response_headers:
            return None  # a session's renewed cookie: sent once
        key = (decision.headers_to_set, decision.headers_to_remove, decision.query_params_to_remove, *parts)
        return key, claims

    def serialized(self, decision: Decision, request_id: str) -> bytes:
        found = self._key(decision)
        if found is None:
            return to_response(decision, request_id).SerializeToString()
        key, claims = found
        entry = self._entries.get(key)
        if entry is None or entry[0] is not claims:
            entry = (claims, to_response(decision).SerializeToString())
            self._entries[key] = entry
            if len(self._entries) > self._max_entries:
                with contextlib.suppress(KeyError):  # emptied meanwhile by another thread
                    self._entries.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # evicted meanwhile: the entry in hand is still right
                self._entries.move_to_end(key)
        return entry[1] + _request_id_suffix(request_id) if request_id else entry[1]


_RESPONSES = _Responses()


def serialized_response(decision: Decision, request_id: str = "") -> bytes:
    """``to_response(decision, request_id).SerializeToString()``, parsed the same, built once per
    distinct answer."""
    return _RESPONSES.serialized(decision, request_id)


def to_response(decision: Decision, request_id: str = "") -> external_auth_pb2.CheckResponse:
    """The answer to Envoy; ``request_id`` (x-request-id) goes into dynamic metadata for access logs."""
    if isinstance(decision, Allow):
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(n, v) for n, v in decision.headers_to_set],
                headers_to_remove=decision.headers_to_remove,
                query_parameters_to_remove=decision.query_params_to_remove,
                response_headers_to_add=[_header(n, v) for n, v in decision.response_headers],
            ),
        )
        if decision.metadata or request_id:
            allowed = {**decision.metadata, "request_id": request_id} if request_id else decision.metadata
            response.dynamic_metadata.CopyFrom(_metadata(allowed))
        return response
    denied = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=decision.grpc_code, message=decision.code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),  # type: ignore[arg-type]
            headers=[_header(n, v) for n, v in decision.headers],
            body=decision.body,
        ),
    )
    values: dict[str, object] = {"rule": decision.rule, "reason": decision.code}
    if request_id:
        values["request_id"] = request_id
    denied.dynamic_metadata.CopyFrom(_metadata(values))
    return denied
