"""The development tools' one error type."""


class DevIssuerError(Exception):
    """A usage or environment problem: reported in one line on standard error, exit status 2."""
