"""The ``tls:`` section (files checked at load, errors naming the key path) and the renewal logic
of ServerTls: which states of the files become the certificate in force, and what gRPC is handed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ext_authz import cli
from ext_authz.config.model import Settings, TlsSettings
from ext_authz.config.parse import parse as parse_config
from ext_authz.config.values import ConfigError
from ext_authz.tls import ServerTls
from tests.support.tls import CertificateAuthority, write_files

PROVIDER = {
    "name": "example",
    "issuer": "https://idp.example.com/",
    "audiences": ["api"],
    "jwks_uri": "https://idp.example.com/jwks.json",
}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def tls_dir(tmp_path: Path, ca: CertificateAuthority) -> Path:
    write_files(tmp_path / "tls", ca.issue(), ca)
    return tmp_path / "tls"


def parse(tmp_path: Path, tls: object) -> Settings:
    document = {"providers": [PROVIDER], "admin": "127.0.0.1:0", "tls": tls}
    return parse_config(document, base_dir=tmp_path)


def section(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cert_file": "tls/tls.crt",
        "key_file": "tls/tls.key",
        "client_ca_file": "tls/ca.crt",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_paths_are_relative_to_the_config_file(tmp_path: Path, tls_dir: Path) -> None:
    loaded = parse(tmp_path, section(admin=True))
    assert loaded.tls == TlsSettings(
        cert_file=str(tls_dir / "tls.crt"),
        key_file=str(tls_dir / "tls.key"),
        client_ca_file=str(tls_dir / "ca.crt"),
        admin=True,
    )
    assert parse_config({"providers": [PROVIDER]}).tls is None
    assert parse(tmp_path, section(client_ca_file=None)).tls == TlsSettings(
        str(tls_dir / "tls.crt"), str(tls_dir / "tls.key")
    )


def _garbage(path: Path) -> str:
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return str(path)


@pytest.mark.parametrize(
    ("change", "key_path", "words"),
    [
        (lambda d, ca: section(cert_file="tls/missing.crt"), "tls.cert_file", "cannot read"),
        (lambda d, ca: section(key_file="tls/ca.crt"), "tls.key_file", "no usable PEM private key"),
        (lambda d, ca: section(cert_file="tls/tls.key"), "tls.cert_file", "no PEM certificate"),
        (lambda d, ca: section(client_ca_file=_garbage(d / "bad-ca.crt")), "tls.client_ca_file", "no PEM"),
        (lambda d, ca: section(client_ca_file="tls/tls.crt"), "tls.client_ca_file", "not a CA"),
        (lambda d, ca: section(key_file=str(_other_key(d))), "tls.key_file", "does not match"),
        (lambda d, ca: section(key_file=str(_encrypted_key(d))), "tls.key_file", "encrypted"),
        (lambda d, ca: section(key_file=None), "tls.key_file", "is required"),
        (lambda d, ca: section(cert_file=None), "tls.cert_file", "is required"),
        (lambda d, ca: {**section(), "ca_file": "x"}, "tls.ca_file", "unknown key"),
        (lambda d, ca: section(admin="yes"), "tls.admin", "true or false"),
        (lambda d, ca: "on", "tls", "must be a mapping"),
    ],
    ids=[
        "missing-file",
        "key-is-a-cert",
        "cert-is-a-key",
        "garbage-ca",
        "ca-is-a-leaf",
        "key-mismatch",
        "encrypted-key",
        "no-key",
        "no-cert",
        "typo",
        "admin-not-bool",
        "not-a-mapping",
    ],
)
def test_bad_tls_files_name_the_key_path(
    tmp_path: Path, tls_dir: Path, ca: CertificateAuthority, change: Any, key_path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, change(tls_dir, ca))
    assert caught.value.key_path == key_path
    assert words in caught.value.message


def test_tls_admin_needs_an_admin_listener(tmp_path: Path, tls_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"providers": [PROVIDER], "tls": section(admin=True)}, base_dir=tmp_path)
    assert caught.value.key_path == "tls.admin"


def _other_key(directory: Path) -> Path:
    path = directory / "other.key"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _encrypted_key(directory: Path) -> Path:
    path = directory / "encrypted.key"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path


def test_check_config_exits_2_naming_the_file_and_key(
    tmp_path: Path, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ext-authz.yaml"
    config.write_text(
        "providers:\n"
        "  - {name: example, issuer: 'https://idp.example.com/', audiences: [api],"
        " jwks_uri: 'https://idp.example.com/jwks.json'}\n"
        f"tls: {{cert_file: tls/tls.crt, key_file: {_other_key(tls_dir)}}}\n"
    )
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-config", str(config)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"{config}: tls.key_file: " in error and "does not match" in error


# ---- ServerTls: renewal ----


def test_only_a_whole_new_pair_is_handed_to_grpc_once(
    tmp_path: Path, tls_dir: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = parse(tmp_path, section())
    assert loaded.tls is not None
    tls = ServerTls(loaded.tls)
    first = tls.material.serial
    assert tls.mutual
    assert tls.fetch() is None  # the initial configuration is the one gRPC has
    assert tls.poll() is False  # nothing changed

    renewed = ca.issue()
    (tls_dir / "tls.crt").write_bytes(renewed.cert_pem)  # the key is still the old one
    with caplog.at_level(logging.WARNING, logger="ext_authz.tls"):
        assert tls.poll() is False
        assert tls.poll() is False
        (tls_dir / "tls.key").unlink()  # and now missing for a moment
        assert tls.poll() is False
        assert tls.poll() is False
    assert [getattr(r, "fields", {})["key"] for r in caplog.records] == ["tls.key_file", "tls.key_file"]
    assert tls.material.serial == first
    assert tls.fetch() is None

    (tls_dir / "tls.key").write_bytes(renewed.key_pem)
    assert tls.poll() is True
    assert tls.material.serial == renewed.serial != first
    assert tls.fetch() is not None  # the new configuration, once
    assert tls.fetch() is None
    assert tls.poll() is False
