"""Test support for fetching keys over a real (and awkward) network, and for real IdPs' key sets.

`SlowIdP` is a raw asyncio HTTP/1.1 server on 127.0.0.1 (port 0, its own thread and event loop,
optionally TLS) that writes each answer — status line, headers and body alike — in many small
pieces with a pause between them, as a key set arrives over a real network in several TCP
segments. Per path it answers with a `Reply`: a status, a body, extra headers (`Location`,
`Cache-Control`), the framing (`length`: Content-Length; `chunked`: Transfer-Encoding: chunked;
`close`: neither, the body ends when the connection closes), a Content-Length that lies, and
`hang` (after the answer, the connection stays open and silent until the server stops) or
`close` (the server closes the connection after the answer).

`idp_jwks` builds JSON documents shaped exactly like the published key sets of Google,
Microsoft Entra ID, Okta, Auth0, Keycloak and Amazon Cognito (members, their order, `x5c`
chains, `x5t`, `x5t#S256`, Entra's `issuer`), with keys and certificates generated here.
`tls_pair` makes a CA and a server certificate for 127.0.0.1, for an https `SlowIdP`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import ipaddress
import json
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.support.idp import b64url, public_jwk
from tests.support.lifecycle import StopOnExit

Framing = Literal["length", "chunked", "close"]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    framing: Framing = "length"
    content_length: int | None = None  # sent instead of len(body) (framing "length"): a lie
    piece: int = 61  # bytes per write
    pause: float = 0.001  # seconds between writes
    hang: bool = False  # after the answer: keep the connection open, send nothing more
    close: bool = False  # after the answer: close the connection (always so for framing "close")


def json_reply(document: object, **options: Any) -> Reply:
    return Reply(
        body=json.dumps(document).encode(), headers=(("Content-Type", "application/json"),), **options
    )


def redirect(location: str, status: int = 302) -> Reply:
    return Reply(status=status, headers=(("Location", location),), piece=1 << 16, pause=0)


def _wire(reply: Reply) -> bytes:
    reason = {200: "OK", 404: "Not Found"}.get(reply.status, "Whatever")
    head = [f"HTTP/1.1 {reply.status} {reason}", *(f"{name}: {value}" for name, value in reply.headers)]
    body = reply.body
    if reply.framing == "length":
        head.append(f"Content-Length: {len(body) if reply.content_length is None else reply.content_length}")
    elif reply.framing == "chunked":
        head.append("Transfer-Encoding: chunked")
        # Chunks of varying sizes (the pieces written cut across chunk boundaries, too).
        chunks, start, size = [], 0, 1
        while start < len(body):
            chunk = body[start : start + size]
            chunks.append(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            start, size = start + len(chunk), size * 3 % 1021 + 1
        body = b"".join(chunks) + b"0\r\n\r\n"
    else:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class SlowIdP(StopOnExit):
    """An HTTP/1.1 server on 127.0.0.1 that answers in small, delayed pieces (see the module)."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._replies: dict[str, Reply] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._port = 0

    # ---- control (any thread) ----

    def reply(self, path: str, reply: Reply | None) -> None:
        with self._lock:
            if reply is None:
                self._replies.pop(path, None)
            else:
                self._replies[path] = reply

    def count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    # ---- lifecycle ----

    def start(self) -> Self:
        if self._thread is not None:
            return self
        started = threading.Event()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._open())
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="slow-idp", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the slow IdP did not start")
        return self

    def __enter__(self) -> Self:
        return self.start()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(RuntimeError):  # the loop may already be gone
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        assert self._server is not None and self._stopping is not None
        self._stopping.set()
        self._server.close()
        for writer in list(self._writers):  # idle keep-alive connections wait in readuntil
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    # ---- serving ----

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._stopping is not None
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while not self._stopping.is_set():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                parts = head.split(b"\r\n", 1)[0].split()
                path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) >= 2 else ""
                with self._lock:
                    self._counts[path] += 1
                    reply = self._replies.get(path, Reply(status=404, body=b"not found"))
                wire = _wire(reply)
                for start in range(0, len(wire), reply.piece):
                    writer.write(wire[start : start + reply.piece])
                    await writer.drain()
                    if reply.pause:
                        await asyncio.sleep(reply.pause)
                if reply.hang:
                    await self._stopping.wait()
                    return
                if reply.close or reply.framing == "close":
                    return
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)


# ---- certificates -----------------------------------------------------------------------------


@functools.cache
def rsa_key(name: str) -> rsa.RSAPrivateKey:
    """One 2048-bit RSA key per name, made once per test session (generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    *,
    issuer: tuple[str, rsa.RSAPrivateKey] | None = None,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (its name and key) or self-signed."""
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True, slots=True)
class TlsPair:
    server: ssl.SSLContext  # for the https SlowIdP
    client: ssl.SSLContext  # trusts only the test CA


def tls_pair(directory: Path) -> TlsPair:
    """A test CA and a certificate for 127.0.0.1 it signed; the files go into ``directory``."""
    ca_key, server_key = rsa_key("tls-ca"), rsa_key("tls-server")
    ca = certificate("ext-authz test CA", ca_key, ca=True)
    leaf = certificate("127.0.0.1", server_key, issuer=("ext-authz test CA", ca_key), ip="127.0.0.1")
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return TlsPair(server, client)


# ---- real IdPs' key sets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdPKeySet:
    """A JWKS shaped like one IdP's, and what ext-authz must make of it."""

    idp: str
    document: dict[str, Any]
    signing: Mapping[str, rsa.RSAPrivateKey]  # kid -> private key of every usable key
    skipped: tuple[str, ...] = field(default=())  # kids published but not for signatures


def _x5c(chain: list[x509.Certificate]) -> list[str]:
    # RFC 7517 §4.7: standard base64 (not base64url) DER, the key's own certificate first.
    return [base64.b64encode(der(cert)).decode("ascii") for cert in chain]


def _thumbprints(cert: x509.Certificate) -> dict[str, str]:
    return {
        "x5t": b64url(hashlib.sha1(der(cert), usedforsecurity=False).digest()),  # RFC 7517 §4.8
        "x5t#S256": b64url(hashlib.sha256(der(cert)).digest()),  # §4.9
    }


def _rsa_members(key: rsa.RSAPrivateKey) -> dict[str, str]:
    jwk = public_jwk(key.public_key(), kid="-", alg="RS256")
    return {"n": jwk["n"], "e": jwk["e"]}


def _chain(leaf_name: str, key: rsa.RSAPrivateKey, length: int) -> list[x509.Certificate]:
    """[leaf, intermediate, root][:length] (length 1: a self-signed certificate)."""
    if length == 1:
        return [certificate(leaf_name, key)]
    root_key, intermediate_key = rsa_key("x5c-root"), rsa_key("x5c-intermediate")
    root = certificate("Test Root CA", root_key, ca=True)
    intermediate = certificate(
        "Test Issuing CA", intermediate_key, issuer=("Test Root CA", root_key), ca=True
    )
    leaf = certificate(leaf_name, key, issuer=("Test Issuing CA", intermediate_key))
    return [leaf, intermediate, root][:length]


def google() -> IdPKeySet:
    # https://www.googleapis.com/oauth2/v3/certs: two RS256 keys, 40-hex-digit kids, no x5c.
    keys = {
        hashlib.sha1(f"google-{i}".encode(), usedforsecurity=False).hexdigest(): rsa_key(f"google-{i}")
        for i in range(2)
    }
    document = {
        "keys": [
            {"e": m["e"], "kty": "RSA", "alg": "RS256", "n": m["n"], "use": "sig", "kid": kid}
            for kid, m in ((kid, _rsa_members(key)) for kid, key in keys.items())
        ]
    }
    return IdPKeySet("google", document, keys)


def entra() -> IdPKeySet:
    # https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys: no alg, kid = x5t, x5c
    # chains, and the issuer each key is for.
    tenant = "9188040d-6c67-4c5b-b112-36a304b66dad"
    keys: dict[str, rsa.RSAPrivateKey] = {}
    members = []
    for i in range(4):
        key = rsa_key(f"entra-{i}")
        chain = _chain(f"accounts.accesscontrol.windows.net {i}", key, 3 if i % 2 == 0 else 2)
        x5t = _thumbprints(chain[0])["x5t"]
        keys[x5t] = key
        members.append(
            {
                "kty": "RSA",
                "use": "sig",
                "kid": x5t,
                "x5t": x5t,
                **_rsa_members(key),
                "x5c": _x5c(chain),
                "cloud_instance_name": "microsoftonline.com",
                "issuer": f"https://login.microsoftonline.com/{tenant}/v2.0",
            }
        )
    return IdPKeySet("entra", {"keys": members}, keys)


def okta() -> IdPKeySet:
    # https://{org}.okta.com/oauth2/default/v1/keys
    key = rsa_key("okta-0")
    kid = b64url(hashlib.sha256(b"okta-0").digest())
    document = {"keys": [{"kty": "RSA", "alg": "RS256", "kid": kid, "use": "sig", **_rsa_members(key)}]}
    return IdPKeySet("okta", document, {kid: key})


def auth0() -> IdPKeySet:
    # https://{tenant}.auth0.com/.well-known/jwks.json: x5t and an x5c chain, alg last.
    keys: dict[str, rsa.RSAPrivateKey] = {}
    members = []
    for i in range(2):
        key = rsa_key(f"auth0-{i}")
        chain = _chain("dev-example.us.auth0.com", key, 2)
        kid = b64url(hashlib.sha256(f"auth0-{i}".encode()).digest())[:22]
        keys[kid] = key
        members.append(
            {
                "kty": "RSA",
                "use": "sig",
                **_rsa_members(key),
                "kid": kid,
                "x5t": _thumbprints(chain[0])["x5t"],
                "x5c": _x5c(chain),
                "alg": "RS256",
            }
        )
    return IdPKeySet("auth0", {"keys": members}, keys)


def keycloak() -> IdPKeySet:
    # /realms/{realm}/protocol/openid-connect/certs: an RSA-OAEP encryption key beside the
    # RS256 signature key, each with a self-signed certificate and both thumbprints.
    members = []
    keys: dict[str, rsa.RSAPrivateKey] = {}
    for i, (alg, use) in enumerate((("RSA-OAEP", "enc"), ("RS256", "sig"))):
        key = rsa_key(f"keycloak-{use}")
        cert = _chain("example-realm", key, 1)[0]
        kid = b64url(hashlib.sha256(f"keycloak-{i}".encode()).digest())
        if use == "sig":
            keys[kid] = key
        else:
            enc_kid = kid
        members.append(
            {
                "kid": kid,
                "kty": "RSA",
                "alg": alg,
                "use": use,
                **_rsa_members(key),
                "x5c": _x5c([cert]),
                **_thumbprints(cert),
            }
        )
    return IdPKeySet("keycloak", {"keys": members}, keys, skipped=(enc_kid,))


def cognito() -> IdPKeySet:
    # https://cognito-idp.{region}.amazonaws.com/{pool}/.well-known/jwks.json: two RS256 keys,
    # members in alphabetical order, kids in standard base64 (with "+", "/" and "=").
    keys: dict[str, rsa.RSAPrivateKey] = {}
    members = []
    for i in range(2):
        key = rsa_key(f"cognito-{i}")
        kid = base64.b64encode(hashlib.sha256(f"cognito-{i}>?".encode()).digest()).decode()
        keys[kid] = key
        m = _rsa_members(key)
        members.append({"alg": "RS256", "e": m["e"], "kid": kid, "kty": "RSA", "n": m["n"], "use": "sig"})
    return IdPKeySet("cognito", {"keys": members}, keys)


IDP_KEY_SETS: Mapping[str, Callable[[], IdPKeySet]] = {
    "google": google,
    "entra": entra,
    "okta": okta,
    "auth0": auth0,
    "keycloak": keycloak,
    "cognito": cognito,
}


@functools.cache
def idp_jwks(idp: str) -> IdPKeySet:
    """The key set shaped like ``idp``'s (one of IDP_KEY_SETS), made once per session."""
    return IDP_KEY_SETS[idp]()
