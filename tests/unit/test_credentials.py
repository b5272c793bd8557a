"""Stage 1: finding the token."""

from __future__ import annotations

import pytest

from ext_authz import errors
from ext_authz.credentials import CredentialFinder
from ext_authz.model import Request
from ext_authz.sources import CookieToken, HeaderToken, ParamToken, TokenSource, cookie_header_without

AUTH = HeaderToken("authorization", "Bearer ")
X_TOKEN = HeaderToken("x-token", "")
COOKIE = CookieToken("session")
PARAM = ParamToken("access_token")
FINDER = CredentialFinder([AUTH, X_TOKEN, COOKIE, PARAM, AUTH])


def request(query: str = "", **headers: str) -> Request:
    return Request("GET", "/", query=query, headers={k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("req", "token", "locations"),
    [
        (request(authorization="Bearer abc.def.ghi"), "abc.def.ghi", [AUTH]),
        (request(authorization="bearer abc"), "abc", [AUTH]),
        (request(authorization="BEARER    abc  "), "abc", [AUTH]),
        (request(x_token="abc"), "abc", [X_TOKEN]),
        (request(cookie="a=1; session=abc; b=2"), "abc", [COOKIE]),
        (request(cookie='session="abc"'), "abc", [COOKIE]),
        (request("x=1&access_token=abc"), "abc", [PARAM]),
        # A cookie is not an RFC 6750 method: beside a header or a parameter it is the same credential.
        (request(authorization="Bearer abc", cookie="session=abc"), "abc", [AUTH, COOKIE]),
        (request("access_token=abc", cookie="session=abc"), "abc", [COOKIE, PARAM]),
        # Two header sources are one method (the header), sent twice.
        (request(authorization="Bearer abc", x_token="abc"), "abc", [AUTH, X_TOKEN]),
        (request("access_token=abc&access_token=abc"), "abc", [PARAM]),
        (request(authorization="Basic dXNlcjpwYXNz, Bearer abc"), "abc", [AUTH]),
    ],
)
def test_found(req: Request, token: str, locations: list[TokenSource]) -> None:
    found = FINDER.find(req)
    assert found is not None
    assert found.token == token
    assert list(found.locations) == locations


@pytest.mark.parametrize(
    "req",
    [
        request(),
        request(authorization="Basic dXNlcjpwYXNz"),
        request(authorization="Bearerabc"),
        request(cookie="other=abc"),
        request("token=abc"),
        request(x_token="  "),
    ],
)
def test_none(req: Request) -> None:
    assert FINDER.find(req) is None


@pytest.mark.parametrize(
    ("req", "error"),
    [
        (request(authorization="Bearer a,Bearer b"), errors.MultipleTokens),
        (request(authorization="Bearer a", x_token="b"), errors.MultipleTokens),
        (request("access_token=b", authorization="Bearer a"), errors.MultipleTokens),
        (request("access_token=a&access_token=b"), errors.MultipleTokens),
        (request("access_token=a", authorization="Bearer a", cookie="session=b"), errors.MultipleTokens),
        # RFC 6750 §2: one method per request, even for the same token.
        (request("access_token=abc", authorization="Bearer abc"), errors.MultipleTokenMethods),
        (request("access_token=abc", x_token="abc"), errors.MultipleTokenMethods),
        (
            request("access_token=abc", authorization="Bearer abc", cookie="session=abc"),
            errors.MultipleTokenMethods,
        ),
        (request(authorization="Bearer"), errors.EmptyToken),
        (request(authorization="Bearer   "), errors.EmptyToken),
        (request("access_token="), errors.EmptyToken),
    ],
)
def test_ambiguous_or_empty_is_invalid_request(req: Request, error: type[errors.AuthError]) -> None:
    with pytest.raises(error) as caught:
        FINDER.find(req)
    assert caught.value.status == 400 and caught.value.rfc6750_error == "invalid_request"


def test_two_methods_have_their_own_code() -> None:
    with pytest.raises(errors.MultipleTokenMethods) as caught:
        FINDER.find(request("access_token=abc", authorization="Bearer abc"))
    assert caught.value.code == "multiple_token_methods"
    assert "abc" not in caught.value.detail


def test_same_token_twice_is_one_credential() -> None:
    found = FINDER.find(request(authorization="Bearer abc, Bearer abc"))
    assert found is not None and found.token == "abc" and found.locations == (AUTH,)


def test_cookie_header_without() -> None:
    assert cookie_header_without("a=1; session=abc; b=2", frozenset({"session"})) == "a=1; b=2"
    assert cookie_header_without("session=abc", frozenset({"session"})) == ""
