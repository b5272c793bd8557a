"""Typed readers for the configuration file: each raises ConfigError naming the key path."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from ext_authz.config.model import ClaimHeader

# RFC 9110 §5.6.2 token characters, lower-case (Envoy lower-cases header names).
HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")
# Headers an authorizer must never set or remove on the upstream request.
RESERVED_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
     "content-length", "trailer"}
)  # fmt: skip
CLAIM_SEGMENT = re.compile(r"""\[(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\]|([^.\[\]]+)""")


class ConfigError(Exception):
    """A configuration problem at ``key_path``."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.key_path = key_path
        self.message = message


def fail(path: str, message: str) -> NoReturn:
    raise ConfigError(path, message)


def type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def mapping(
    value: object, path: str, known: Sequence[str], *, required: Sequence[str] = ()
) -> Mapping[str, object]:
    """A mapping whose keys are all ``known`` and include every ``required`` one (in that order)."""
    if not isinstance(value, dict):
        fail(path, f"must be a mapping, not {type_name(value)}")
    for key in value:
        if not isinstance(key, str) or key not in known:
            fail(f"{path}.{key}" if path else str(key), f"unknown key (known keys: {', '.join(known)})")
    for key in required:
        if key not in value:
            fail(f"{path}.{key}" if path else key, "is required")
    return value


def string(value: object, path: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        fail(path, f"must be a string, not {type_name(value)}")
    if not allow_empty and not value.strip():
        fail(path, "must not be empty")
    return value


def boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        fail(path, f"must be true or false, not {type_name(value)}")
    return value


def number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(path, f"must be a number, not {type_name(value)}")
    if not low <= value <= high:
        fail(path, f"must be between {low:g} and {high:g}")
    return float(value)


def listof(value: object, path: str, *, allow_empty: bool = False) -> list[object]:
    if not isinstance(value, list):
        fail(path, f"must be a list, not {type_name(value)}")
    if not value and not allow_empty:
        fail(path, "must not be empty")
    return value


def str_list(value: object, path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    items = tuple(
        string(v, f"{path}[{i}]") for i, v in enumerate(listof(value, path, allow_empty=allow_empty))
    )
    for i, item in enumerate(items):
        if item in items[:i]:
            fail(f"{path}[{i}]", f"duplicate value {item!r}")
    return items


def header_name(value: object, path: str) -> str:
    name = string(value, path).lower()
    if name.startswith(":"):
        fail(path, "pseudo-headers cannot be used")
    if not HEADER_NAME.match(name):
        fail(path, f"{name!r} is not a valid HTTP header name")
    return name


def header_target(value: object, path: str) -> str:
    """A header ext-authz sets on allow: one Envoy will really set, and not one that steers Envoy.

    Envoy never removes pseudo-headers or ``host`` for an authorizer, and under header mutation
    rules ignores sets of them and of ``x-envoy-*`` (``allow_envoy`` is false by default); without
    the rules, setting them would reroute the request or steer Envoy itself (retry policies):
    either way, no claim should.
    """
    name = header_name(value, path)
    if name.startswith("x-envoy-"):
        fail(
            path, f"header {name!r} cannot be set by an authorizer (Envoy ignores or obeys x-envoy-* headers)"
        )
    if name in RESERVED_HEADERS:
        fail(path, f"header {name!r} cannot be set by an authorizer")
    return name


def parse_claim_path(text: str, path: str) -> tuple[str, ...]:
    """``a.b`` or ``["https://example.com/roles"]`` (a bracketed, quoted segment may hold dots)."""
    segments: list[str] = []
    pos = 0
    while pos < len(text):
        if segments and text[pos] == ".":
            pos += 1
        m = CLAIM_SEGMENT.match(text, pos)
        if not m or m.end() == pos:
            fail(path, f"invalid claim path {text!r}")
        quoted = m.group(1) if m.group(1) is not None else m.group(2)
        segments.append(re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else m.group(3))
        pos = m.end()
    if not segments or any(s == "" for s in segments):
        fail(path, f"invalid claim path {text!r}")
    return tuple(segments)


def claim_header(raw: object, path: str) -> ClaimHeader:
    c = mapping(raw, path, ("header", "claim"), required=("header", "claim"))
    claim = string(c["claim"], f"{path}.claim")
    return ClaimHeader(
        header=header_target(c["header"], f"{path}.header"),
        claim=claim,
        path=parse_claim_path(claim, f"{path}.claim"),
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[object, object]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError("", f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml_file(file: str | Path) -> object:
    """A YAML file's document; ConfigError (key path '') when unreadable, not YAML, or with duplicate keys."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", "the file is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
