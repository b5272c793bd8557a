"""Test support: a test OIDC issuer, an echo backend, and helpers that run Envoy and ext-authz.

Nothing here is imported by the service itself; these helpers exist so integration tests can
drive the real binaries over real sockets (127.0.0.1, ephemeral ports only).
"""
