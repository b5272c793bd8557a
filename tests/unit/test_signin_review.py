"""Adversarial review of ext_authz/sessions/signin.py and the Set-Cookie helpers: each attack
must fail. (Blank ``error=`` / ``iss=``, unchecked cookie names, a re-encoded endpoint query and
the cookie bomb failed before the fixes.)"""

from __future__ import annotations

import itertools
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

from ext_authz.sessions import cookies, signin
from ext_authz.sessions.signin import CallbackCode, read_callback

ISSUER = "https://idp.example"
PROBES = [
    "//evil", "/\\evil", "/\t/evil", "/%2F/evil", "/.//evil", "/..//evil", "/@evil", "/:evil",
    "/x?//evil", "\\/evil", "https://evil/", "/\u3002/evil", "/\uff0f/evil", "/\x00/evil", " //evil",
    "/x\r\nLocation: //evil", "/#//evil",
]  # fmt: skip


def _same_host(path: str) -> bool:
    return urlsplit(urljoin("https://app.example/cb", path)).netloc == "app.example"


@pytest.mark.parametrize("probe", PROBES)
def test_return_paths_stay_on_the_host(probe: str) -> None:
    r = signin.return_path(probe)
    assert r.startswith("/") and not r.startswith(("//", "/\\")) and _same_host(r)
    assert all(0x20 < ord(c) < 0x7F and c != "\\" for c in r)


def test_every_two_characters_after_the_slash() -> None:
    alphabet = [chr(c) for c in range(0x80)] + ["\u00a0", "\u2044", "\uff0f", "\ufe68"]
    for a, b in itertools.product(alphabet, repeat=2):
        r = signin.return_path("/" + a + b + "evil")
        assert r == "/" or (r[1] not in "/\\" and r.isascii() and all(0x20 < ord(c) < 0x7F for c in r))


@pytest.mark.parametrize(
    "query",
    [
        "error=&code=abc&state={s}",  # a blank error is an error
        "iss=&code=abc&state={s}",  # a blank iss is a wrong issuer (RFC 9207)
        "code=a&code=b&state={s}",
        "code=a&error=x&state={s}",
        "code=a&iss=https://evil&state={s}",
        "code=a&iss=https://idp.example&iss=https://idp.example&state={s}",
        "code=&state={s}",
        "state2=1&code=a&state=WRONG",
        "code=a&state={s}x",
        "code=a&state=",
    ],
)
def test_refused_callbacks(query: str) -> None:
    t = signin.new_transaction("/app")
    answer = read_callback(query.format(s=t.state), t, issuer=ISSUER, iss_required=False)
    assert not isinstance(answer, CallbackCode)


@pytest.mark.parametrize(
    "query",
    ["state=%ED%B3%BF", "state={s}&error", "state={s}&error=%ED%B3%BF", "state=", "state={s}&code=%00&iss"],
)
def test_odd_callbacks_never_raise(query: str) -> None:
    t = signin.new_transaction("/app")
    read_callback(query.format(s=t.state), t, issuer=ISSUER, iss_required=False)
    read_callback(query.format(s=t.state), None, issuer=ISSUER, iss_required=True)
    state = signin.callback_state(query.format(s=t.state))
    assert state is None or isinstance(state, str)
    signin.transaction_cookie("s", "\udcff")


def test_config_values_cannot_inject_parameters() -> None:
    t = signin.new_transaction("/app")
    url = signin.authorization_url(
        "https://idp/authorize?state=x&p=1",
        client_id="c&state=evil",
        redirect_uri="https://app/cb?x=1&state=evil",
        scopes=["openid", "a&state=evil"],
        transaction=t,
    )
    q = parse_qs(urlsplit(url).query)
    assert q["state"] == [t.state] and q["client_id"] == ["c&state=evil"] and q["p"] == ["1"]


def test_the_endpoints_own_query_is_kept_as_written() -> None:
    t = signin.new_transaction("/app")
    url = signin.authorization_url(
        "https://idp/authorize?p=%FF&flag&nonce=old",
        client_id="c",
        redirect_uri="r",
        scopes=["openid"],
        transaction=t,
    )
    query = urlsplit(url).query
    assert query.startswith("p=%FF&flag&") and "nonce=old" not in query
    assert parse_qs(query)["nonce"] == [t.nonce]


@pytest.mark.parametrize(
    ("name", "value"),
    [("sid; Domain=example.com", "v"), ("sid", "v; Domain=example.com"), ("s id", "v"), ("", "v")],
)
def test_set_cookie_refuses_what_would_add_attributes(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="RFC 6265"):
        cookies.set_cookie(name, value, max_age_seconds=60)


def test_a_cookie_bomb_stays_small() -> None:
    """Pages elsewhere starting sign-ins (top-level navigations set Lax cookies): long return
    paths go back to "/", and a browser holds at most MAX_TRANSACTIONS + 1 transaction cookies."""
    sealer = cookies.Sealer([b"k" * 32])
    jar: dict[str, str] = {}
    for i in range(25):
        for gone in signin.transactions_to_expire("__Host-ext-authz", jar):
            del jar[gone]
        t = signin.new_transaction("/" + "a" * 2040 + f"{i:03d}")
        name = signin.transaction_cookie("__Host-ext-authz", t.state)
        jar[name] = sealer.seal("signin", name, signin.to_data(t), now=0, lifetime_seconds=600)
        assert len(jar) <= signin.MAX_TRANSACTIONS
    assert len("; ".join(f"{k}={v}" for k, v in jar.items())) < 4 * 1024
