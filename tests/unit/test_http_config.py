"""`listen_http` and `http:`: defaults, and every error with its key path."""

from __future__ import annotations

from typing import Any

import pytest

from ext_authz.config.parse import parse
from ext_authz.config.values import ConfigError

PROVIDER = {"name": "t", "issuer": "https://idp.example.com/", "audiences": ["api"]}


def doc(**top: Any) -> dict[str, Any]:
    return {"providers": [dict(PROVIDER)], **top}


def test_off_by_default_and_defaults() -> None:
    settings = parse(doc())
    assert settings.listen_http is None
    on = parse(doc(listen_http="127.0.0.1:9003"))
    assert on.listen_http == "127.0.0.1:9003"
    assert dict(on.http.dialects) == {"envoy": "/envoy", "nginx": "/nginx", "forward_auth": "/forward-auth"}
    assert (on.http.original_method_header, on.http.original_uri_header) == (
        "x-original-method",
        "x-original-uri",
    )


def test_dialects_by_path() -> None:
    settings = parse(doc(listen_http="[::1]:9003", http={"dialects": {"nginx": "/auth/nginx"}}))
    assert settings.http.dialects == (("nginx", "/auth/nginx"),)


def test_plaintext_beyond_loopback_is_explicit() -> None:
    assert (
        parse(doc(listen_http="0.0.0.0:9003", http={"allow_plaintext": True})).listen_http == "0.0.0.0:9003"
    )


@pytest.mark.parametrize(
    ("top", "key_path", "message"),
    [
        ({"listen_http": "0.0.0.0:9003"}, "listen_http", "needs tls"),
        ({"listen_http": "10.0.0.1:9003"}, "listen_http", "needs tls"),
        ({"listen_http": "9003"}, "listen_http", "HOST:PORT"),
        (
            {"listen_http": "127.0.0.1:1", "http": {"dialects": {"haproxy": "/h"}}},
            "http.dialects.haproxy",
            "unknown key",
        ),
        ({"listen_http": "127.0.0.1:1", "http": {"dialects": {}}}, "http.dialects", "at least one"),
        (
            {"listen_http": "127.0.0.1:1", "http": {"dialects": {"envoy": "/a/"}}},
            "http.dialects.envoy",
            "plain segments",
        ),
        (
            {"listen_http": "127.0.0.1:1", "http": {"dialects": {"envoy": "a"}}},
            "http.dialects.envoy",
            "plain segments",
        ),
        (
            {"listen_http": "127.0.0.1:1", "http": {"dialects": {"envoy": "/a", "nginx": "/a/b"}}},
            "http.dialects.nginx",
            "overlaps",
        ),
        (
            {"listen_http": "127.0.0.1:1", "http": {"original_uri_header": "X Bad"}},
            "http.original_uri_header",
            "",
        ),
        ({"http": {"colour": 1}}, "http.colour", "unknown key"),
    ],
)
def test_errors(top: dict[str, Any], key_path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(doc(**top))
    assert caught.value.key_path == key_path, str(caught.value)
    assert message in caught.value.message


def test_a_query_token_that_must_not_travel_cannot_be_removed_by_a_gateway() -> None:
    provider = {**PROVIDER, "from_params": ["access_token"], "forward_token": False}
    with pytest.raises(ConfigError) as caught:
        parse({"providers": [provider], "listen_http": "127.0.0.1:9003"})
    assert caught.value.key_path == "providers[0].forward_token"
    parse({"providers": [provider]})  # without the HTTP listener: removed by Envoy's gRPC answer
