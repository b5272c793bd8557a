"""TLS on the listeners, with renewed certificate files taken up without a restart.

cert-manager (and the kubelet, which swaps a Secret volume's ``..data`` symlink) replaces the
files in place. ``watch()`` reads them again every second, off the event loop; a changed, valid
pair becomes the certificate for new connections, while connections already open keep theirs.
A changed pair that does not check out (a half-written renewal: new certificate, old key) is
logged once and the old certificate stays in force until the files are whole again.

- gRPC: ``grpc.dynamic_ssl_server_credentials``. gRPC core calls the fetcher before every new
  handshake, on one of its own threads with the GIL held: it only hands over a configuration
  that ``poll`` prepared, never reads a file and never raises.
- The admin listener (aiohttp): an ``ssl.SSLContext`` whose server-name callback (OpenSSL runs
  it on every ClientHello, with or without SNI) moves each new connection to the newest context.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from datetime import UTC, datetime

import grpc

from ext_authz.config.model import TlsSettings
from ext_authz.tlsfiles import Material, TlsFileError, check, read_contents, read_material

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 1.0


class ServerTls:
    """The certificate in force for one process's listeners. Raises TlsFileError when built."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        files = (settings.cert_file, settings.key_file, settings.client_ca_file)
        self.material: Material = read_material(*files)
        self.renewals = 0
        self.refusals = 0  # distinct unusable states of the files seen
        # (generation, configuration): replaced as one value, so the fetcher reads it atomically.
        self._config = (0, self._grpc_config(self.material))
        self._served_generation = 0
        self._rejected: object = None  # the last refused state of the files, logged once
        self._admin: ssl.SSLContext | None = None
        self._http: ssl.SSLContext | None = None
        self._warn_if_expired(self.material)

    def state(self) -> tuple[float, int, int]:
        """For metrics: the served certificate's expiry, renewals, refusals."""
        return self.material.not_after, self.renewals, self.refusals

    @property
    def mutual(self) -> bool:
        return self.settings.client_ca_file is not None

    # ---- gRPC ----

    def grpc_credentials(self) -> grpc.ServerCredentials:
        # The stubs say the fetcher returns a configuration; grpc documents None as "no change".
        return grpc.dynamic_ssl_server_credentials(
            self._config[1],
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    @staticmethod
    def _grpc_config(material: Material) -> grpc.ServerCertificateConfiguration:
        contents = material.contents
        return grpc.ssl_server_certificate_configuration(
            [(contents.private_key, contents.cert_chain)], root_certificates=contents.client_ca
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher: the configuration once after each change, else None."""
        generation, config = self._config
        if generation == self._served_generation:
            return None  # unchanged: gRPC keeps the configuration it has
        self._served_generation = generation
        return config

    # ---- the admin listener ----

    def admin_context(self) -> ssl.SSLContext:
        """The context to serve the admin listener with; renewals reach it through its callback."""
        context = self._ssl_context()
        context.sni_callback = self._choose_context
        self._admin = context
        return context

    def http_context(self) -> ssl.SSLContext:
        """The HTTP authorization listener's context: the Check listener's settings (client
        certificates required with ``client_ca_file``); renewals reach it through its callback."""
        context = self._ssl_context(mutual=self.mutual)
        context.sni_callback = self._choose_http_context
        self._http = context
        return context

    def _ssl_context(self, *, mutual: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The ssl module loads certificates from files only; load_cert_chain checks the pair matches.
        context.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        if mutual and self.settings.client_ca_file is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.settings.client_ca_file)
        return context

    def _choose_context(self, connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext) -> None:
        current = self._admin
        if current is not None and current is not context:
            connection.context = current

    def _choose_http_context(
        self, connection: ssl.SSLObject, _name: str | None, context: ssl.SSLContext
    ) -> None:
        current = self._http
        if current is not None and current is not context:
            connection.context = current

    # ---- renewal ----

    def poll(self) -> bool:
        """Read the files again (blocking); True when a renewed certificate is now in force."""
        tls = self.settings
        try:
            contents = read_contents(tls.cert_file, tls.key_file, tls.client_ca_file)
        except TlsFileError as exc:  # e.g. a file missing for a moment during a swap
            self._reject(exc.message, exc.field, exc.message)
            return False
        if contents == self.material.contents or contents == self._rejected:
            return False
        try:
            material = check(contents, tls.cert_file, tls.key_file, tls.client_ca_file)
        except TlsFileError as exc:
            self._reject(contents, exc.field, exc.message)
            return False
        admin = http = None
        if self._admin is not None or self._http is not None:
            try:
                admin = self._ssl_context() if self._admin is not None else None
                http = self._ssl_context(mutual=self.mutual) if self._http is not None else None
            except (OSError, ssl.SSLError) as exc:
                self._reject(
                    f"admin: {exc}", "cert_file", f"the admin or HTTP listener cannot load the files: {exc}"
                )
                return False
            try:
                reread = read_contents(tls.cert_file, tls.key_file, tls.client_ca_file)
            except TlsFileError:
                return False
            if reread != contents:
                return False  # changed while the admin context loaded them: next time
        self.material = material
        self._rejected = None
        self._config = (self._config[0] + 1, self._grpc_config(material))
        if admin is not None:
            self._admin = admin
        if http is not None:
            http.sni_callback = self._choose_http_context
            self._http = http
        self.renewals += 1
        log.info(
            "TLS certificate renewed: new connections get it",
            extra={"fields": {"serial": f"{material.serial:x}", "not_after": _iso(material.not_after)}},
        )
        self._warn_if_expired(material)
        return True

    def _reject(self, state: object, field: str, message: str) -> None:
        """Log a refused state of the files once (polling sees it again every second)."""
        if state == self._rejected:
            return
        self._rejected = state
        self.refusals += 1
        log.warning(
            "renewed TLS files are not usable (yet): the old certificate stays in force",
            extra={"fields": {"key": f"tls.{field}", "error": message}},
        )

    async def watch(self, interval: float = POLL_INTERVAL_SECONDS) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.poll)
            except Exception:  # a bug here must not end renewals for the process's lifetime
                log.exception("TLS renewal check failed")

    @staticmethod
    def _warn_if_expired(material: Material) -> None:
        if material.not_after < time.time():
            log.warning(
                "the TLS certificate has expired: clients will refuse it",
                extra={"fields": {"serial": f"{material.serial:x}", "not_after": _iso(material.not_after)}},
            )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()
