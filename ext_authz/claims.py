"""Reading verified claims by path (``a.b``, ``["https://x/roles"]``). Pure."""

from __future__ import annotations

from collections.abc import Mapping


def claim_value(claims: Mapping[str, object], path: tuple[str, ...]) -> object:
    """The value at ``path``, None when any segment is missing or not an object."""
    value: object = claims
    for segment in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(segment)
    return value
