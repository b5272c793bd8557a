"""DEVELOPMENT ONLY: a local OIDC issuer, an echo backend, and the `make run` stack.

The issuer signs any token it is asked to: whoever can read its key directory can mint a token for
any subject and scope. It exists so that ext-authz can be tried and tested on one machine, and it
must never be trusted by a deployment that protects anything.

Key directory (default ``.ext-authz-dev/``, mode 0700)::

    issuer.json      {"issuer": "http://127.0.0.1:8999", "audience": "api"} (written by `serve`)
    key-0001.pem     private keys (PKCS#8 PEM, mode 0600); the highest number signs

A key's ``kid`` is its RFC 7638 JWK thumbprint, so it is derived from the key and needs no
bookkeeping. ``rotate`` adds a key; the running issuer publishes it at the next JWKS request, and
ext-authz fetches it when it first sees a token with the new ``kid`` (README: Keys, Rotation).

Commands (``ext-authz dev-issuer ...``, or ``python -m ext_authz.dev ...``):

- ``serve``: OIDC discovery at ``/.well-known/openid-configuration`` and the JWKS at
  ``/jwks.json``, on 127.0.0.1:8999 unless told otherwise (anything but loopback needs
  ``--allow-non-loopback``).
- ``rotate``: add a key and sign with it from now on; old keys stay published.
- ``mint``: print a signed token (issuer URL and default audience from the key directory).
- ``echo`` (module only): an HTTP backend that answers every request with what reached it.
- ``stack`` (module only, run by ``make run``): issuer + echo backend in this process, ext-authz and
  Envoy as child processes; prints curl commands with fresh tokens, stops everything on
  SIGINT/SIGTERM.

Modules, one job each: ``keys`` (the key directory), ``tokens`` (minting), ``http`` (sockets,
sites, signals shared by the servers), ``issuer`` (discovery + JWKS), ``echo`` (the backend),
``plan`` (where the stack listens, Envoy config rendering), ``stack`` (running it), ``cli``.
None imports the server: ext-authz runs as a child process of the stack. The product never
imports this package; ``ext-authz dev-issuer`` loads ``ext_authz.dev.cli`` only when it is run.
"""
