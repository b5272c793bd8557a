"""ext-authz: an Envoy external authorization service that verifies bearer JWTs."""

__version__ = "0.1.0"
