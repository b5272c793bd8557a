"""Issuer keys: JWKS parsing (pure), fetching and OIDC discovery (the only network I/O)."""
