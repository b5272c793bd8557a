"""The I/O-free pieces of starting a sign-in (ext_authz/sessions/signin.py)."""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import parse_qs, urlsplit

import pytest

from ext_authz.sessions.signin import authorization_url, is_navigation, new_transaction, return_path


@pytest.mark.parametrize(
    ("method", "headers", "navigation"),
    [
        ("GET", {"accept": "text/html,application/xhtml+xml"}, True),
        ("HEAD", {"accept": "TEXT/HTML"}, True),
        ("GET", {"sec-fetch-mode": "navigate"}, True),
        ("GET", {"sec-fetch-mode": "navigate", "accept": "*/*"}, True),
        ("GET", {"sec-fetch-mode": "cors", "accept": "text/html"}, False),  # a fetch() asking for HTML
        ("GET", {"accept": "application/json"}, False),
        ("GET", {}, False),
        ("POST", {"accept": "text/html", "sec-fetch-mode": "navigate"}, False),
        ("get", {"accept": "text/html"}, True),
    ],
)
def test_only_a_browser_navigation_is_sent_to_sign_in(
    method: str, headers: dict[str, str], navigation: bool
) -> None:
    assert is_navigation(method, headers) is navigation


@pytest.mark.parametrize(
    ("path", "query", "expected"),
    [
        ("/app/orders", "page=2", "/app/orders?page=2"),
        ("/", "", "/"),
        ("/app/", "", "/app/"),
        ("//evil.example/x", "", "/"),
        ("/\\evil.example", "", "/"),
        ("/\t/evil.example", "", "/"),
        ("/\n/evil.example", "", "/"),
        ("/ /evil.example", "", "/"),
        ("https://evil.example/", "", "/"),
        ("evil.example", "", "/"),
        ("", "", "/"),
        ("/app\\..\\x", "", "/"),
        ("/caf\u00e9", "", "/"),
        ("/app", "next=//evil.example", "/app?next=//evil.example"),  # a query is the app's own business
        ("/a" * 300, "", "/"),  # over 512 characters: the cookie stays small
    ],
)
def test_the_return_path_is_only_ever_a_path_on_this_host(path: str, query: str, expected: str) -> None:
    assert return_path(path, query) == expected


def test_transactions_are_fresh_and_pkce_is_s256() -> None:
    a, b = new_transaction("/app"), new_transaction("/app")
    assert len({a.state, b.state, a.nonce, b.nonce, a.verifier, b.verifier}) == 6
    assert 43 <= len(a.verifier) <= 128 and a.return_to == "/app"
    digest = base64.urlsafe_b64encode(hashlib.sha256(a.verifier.encode()).digest()).rstrip(b"=").decode()
    assert a.challenge == digest
    assert new_transaction("//evil.example").return_to == "/"


def test_the_authorization_url_keeps_the_endpoints_own_parameters() -> None:
    t = new_transaction("/app")
    url = authorization_url(
        "https://login.example.com/tenant/oauth2/v2.0/authorize?p=b2c_signin&state=stale",
        client_id="orders-web",
        redirect_uri="https://app.example.com/oauth2/callback",
        scopes=["openid", "profile", "email"],
        transaction=t,
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "login.example.com",
        "/tenant/oauth2/v2.0/authorize",
    )
    q = parse_qs(parts.query)
    assert q["p"] == ["b2c_signin"] and q["state"] == [t.state]  # ours replaces theirs
    assert q["response_type"] == ["code"] and q["code_challenge_method"] == ["S256"]
    assert q["scope"] == ["openid profile email"] and q["nonce"] == [t.nonce]
    assert q["code_challenge"] == [t.challenge] and "code_verifier" not in q
    assert q["redirect_uri"] == ["https://app.example.com/oauth2/callback"]


ISSUER = "https://idp.example.com/"


def callback(query: str, transaction: object, *, iss_required: bool = False) -> object:
    from ext_authz.sessions.signin import Transaction, read_callback

    assert transaction is None or isinstance(transaction, Transaction)
    return read_callback(query, transaction, issuer=ISSUER, iss_required=iss_required)


def test_a_callback_with_its_state_and_one_code_goes_on() -> None:
    from ext_authz.sessions.signin import CallbackCode

    t = new_transaction("/app")
    answer = callback(f"code=abc&state={t.state}&iss={ISSUER}", t)
    assert answer == CallbackCode("abc", t)
    assert callback(f"code=abc&state={t.state}", t) == CallbackCode("abc", t)  # no iss, none promised


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("code=abc&state=forged", 400, "invalid_state"),
        ("code=abc", 400, "invalid_state"),
        ("code=abc&state={s}&state={s}", 400, "invalid_state"),
        ("state={s}&error=access_denied&error_description=no", 403, "sign_in_refused"),
        ("code=abc&state={s}&iss=https://evil.example/", 400, "wrong_issuer"),
        ("code=abc&state={s}&iss={i}&iss={i}", 400, "wrong_issuer"),
        ("state={s}", 400, "invalid_request"),
        ("code=&state={s}", 400, "invalid_request"),
        ("code=a&code=b&state={s}", 400, "invalid_request"),
        ("code=" + "x" * 5000 + "&state={s}", 400, "invalid_request"),
    ],
)
def test_every_other_callback_is_refused_with_a_page(query: str, status: int, code: str) -> None:
    from ext_authz.sessions.signin import CallbackRefused

    t = new_transaction("/app")
    answer = callback(query.format(s=t.state, i=ISSUER), t)
    assert isinstance(answer, CallbackRefused) and (answer.status, answer.code) == (status, code)


def test_no_transaction_cookie_and_a_required_iss() -> None:
    from ext_authz.sessions.signin import CallbackRefused

    t = new_transaction("/app")
    assert isinstance(callback(f"code=abc&state={t.state}", None), CallbackRefused)  # replayed, cookie gone
    refused = callback(f"code=abc&state={t.state}", t, iss_required=True)
    assert isinstance(refused, CallbackRefused) and refused.code == "wrong_issuer"


def test_the_idps_error_text_is_shown_only_when_plain() -> None:
    from ext_authz.sessions.signin import CallbackRefused

    t = new_transaction("/app")
    shown = callback(f"state={t.state}&error=access_denied", t)
    assert isinstance(shown, CallbackRefused) and "(access_denied)" in shown.description
    odd = callback(f"state={t.state}&error=%3Cscript%3E", t)
    assert isinstance(odd, CallbackRefused) and "<script>" not in odd.description


def test_transaction_cookies_round_trip_and_are_named_per_state() -> None:
    from ext_authz.sessions.signin import from_data, to_data, transaction_cookie

    a, b = new_transaction("/app"), new_transaction("/other")
    assert transaction_cookie("__Host-ext-authz", a.state) != transaction_cookie("__Host-ext-authz", b.state)
    assert transaction_cookie("__Host-ext-authz", a.state).startswith("__Host-ext-authz-signin-")
    assert from_data(to_data(a)) == a
    assert from_data({**to_data(a), "r": "//evil.example"}).return_to == "/"  # type: ignore[union-attr]
    junk: list[object] = [
        None,
        [],
        {"s": "x"},
        {**to_data(a), "extra": "1"},
        {**to_data(a), "n": 5},
        {**to_data(a), "v": ""},
    ]
    for data in junk:
        assert from_data(data) is None
