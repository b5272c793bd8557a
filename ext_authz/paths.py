r"""How rules read a request's path and host: its readings, computed once per request. Pure.

Matching normalises the path once per request so that
``/public/../admin`` or ``/public/%2e%2e/admin`` is judged as ``/admin`` (RFC 3986 §6.2.2:
percent-decoding of unreserved characters, then removal of dot segments), and ``//admin`` as
``/admin``. Template parameters are percent-decoded after matching.

Backends do not all read a path the RFC 3986 way: Tomcat and Jetty drop ``;params`` from every
segment before resolving dot segments (``/public/..;/admin`` is ``/admin`` to them), others decode
``%2F`` / ``%5C`` or take ``\`` as a separator, decode twice, stop at ``%00``, or keep ``//``
(RFC 3986 to the letter: ``/admin//../x`` is ``/admin/x``). When a path contains any of ``;``,
``\``, ``//``, ``%2F``, ``%5C``, ``%25`` or ``%00`` (any case), or a ``%`` not followed by two hex
digits, ``path_readings`` lists every reading,
and under ``path_readings: all`` (the default) every reading must pick the same rule with the
same template parameters (else 400 ``ambiguous_path``) and the rule's requirements must hold under
each. Any other path has exactly one reading and costs nothing extra.

The host is compared in its one canonical spelling (``hosts.py``); a malformed authority is 400
``invalid_host``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from ext_authz import errors
from ext_authz.hosts import canonical_host
from ext_authz.model import Request

_UNRESERVED_ESCAPE = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
_SLASHES = re.compile(r"/{2,}")


def normalise_path(path: str, *, merge_slashes: bool = True) -> str:
    """The path as rules see it: unreserved escapes decoded, dot segments removed, '//' merged.

    ``merge_slashes=False`` is RFC 3986 to the letter (Java's URI.normalize, WHATWG URL parsers):
    ``/admin//../x`` is ``/admin/x`` there, ``/x`` after merging.
    """
    if not path:
        return path
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    if merge_slashes and "//" in path:
        path = _SLASHES.sub("/", path)
    if "." not in path:
        return path
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        elif segment == ".":
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/".join(output) or "/"


# ---- the readings of a path that backends may take ----

PathReadings = Literal["all", "rfc3986"]

_SEPARATOR_ESCAPE = re.compile(r"%(?:2[fF]|5[cC])")
# A "%" not followed by two hex digits is a stray one: a lenient decoder keeps it, and the escapes
# after it may spell a new escape once decoded (`%%32%65` is `%2e`).
_READING_TRIGGER = re.compile(r"[;\\]|//|%(?:2[fF]|5[cC]|25|00|(?![0-9a-fA-F]{2}))")
_STRAY_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")


def _strip_params(path: str) -> str:
    """Tomcat, Jetty, Spring: ``;params`` removed from every segment (``/a;x=1/b`` is ``/a/b``)."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _cut_params(path: str) -> str:
    """Servers that end the path at its first ``;`` (``/a;x/../b`` is ``/a``)."""
    return path.partition(";")[0]


def _cut_nul(path: str) -> str:
    """C-based servers that decode ``%00`` and stop there (``/a%00/../b`` is ``/a``)."""
    return path.partition("%00")[0]


def _separators(path: str) -> str:
    """Servers that decode ``%2F`` and ``%5C``, or take ``\\`` as ``/`` (IIS, Windows, some proxies)."""
    return _SEPARATOR_ESCAPE.sub("/", path).replace("\\", "/")


_PERCENT_ESCAPES = re.compile(r"%(?:25)+")


def _decode_percent(path: str) -> str:
    """Servers that decode again: ``%252e`` is ``%2e`` (then ``.``), ``%25252e`` too: ``%25`` is
    decoded until none is left, in one linear pass (a loop of ``replace`` would be quadratic).

    The first decoding decodes the unreserved escapes too, so that escaped hex digits after a
    ``%`` count: ``%25%32%65`` is ``%2e`` to a double decoder, and ``%%32%65`` to a single one."""
    if "%" in path:
        path = _UNRESERVED_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), path)
    return _PERCENT_ESCAPES.sub("%", path)


_TRANSFORMS: tuple[tuple[str, tuple[Callable[[str], str], ...]], ...] = (
    ("rfc3986", ()),
    (";params stripped per segment", (_strip_params,)),
    ("path cut at ';'", (_cut_params,)),
    ("%2F %5C \\ as '/'", (_separators,)),
    (";params stripped, then %2F %5C \\ as '/'", (_strip_params, _separators)),
    ("%2F %5C \\ as '/', then ;params stripped", (_separators, _strip_params)),
    ("%2F %5C \\ as '/', path cut at ';'", (_separators, _cut_params)),
    ("path cut at %00", (_cut_nul,)),
)


def has_other_readings(path: str) -> bool:
    """Whether a backend could read ``path`` otherwise than RFC 3986 does (the fast test)."""
    return (
        ";" in path
        or "\\" in path
        or "//" in path
        or ("%" in path and _READING_TRIGGER.search(path) is not None)
    )


def path_readings(path: str) -> tuple[tuple[str, str], ...]:
    """(how, normalised path) for every distinct reading of ``path``, the RFC 3986 one first."""
    readings = {normalise_path(path): "rfc3986"}
    if not has_other_readings(path):
        return tuple((how, p) for p, how in readings.items())
    bases = [("", path)]
    if "%25" in path or _STRAY_PERCENT.search(path):
        bases.append(("%25 decoded again", _decode_percent(path)))
    for again, base in bases:
        for how, steps in _TRANSFORMS:
            text = base
            for step in steps:
                text = step(text)
            label = ", ".join(filter(None, (again, how if steps else ""))) or how
            readings.setdefault(normalise_path(text), label)
            if "//" in text:
                readings.setdefault(normalise_path(text, merge_slashes=False), f"{label}, '//' kept")
    return tuple((how, p) for p, how in readings.items())


def host_name(authority: str) -> str:
    """The host of an :authority value in its canonical spelling ("" when there is none).

    Raises InvalidHost when the authority is malformed: a spelling ext-authz cannot read with
    certainty is refused rather than judged as some other host.
    """
    if not authority:
        return ""
    host = canonical_host(authority)
    if host is None:
        raise errors.InvalidHost()
    return host


@dataclass(frozen=True, slots=True)
class RequestView:
    """What rules look at, computed once per request.

    ``path`` is the RFC 3986 reading; ``other_paths`` the other readings a backend could take,
    when they differ (empty for nearly every request).
    """

    request: Request
    method: str
    path: str
    host: str
    other_paths: tuple[str, ...] = ()

    @classmethod
    def of(cls, request: Request, readings: PathReadings = "all") -> RequestView:
        """Raises InvalidHost for a malformed authority."""
        path = request.path
        host = host_name(request.host)
        if readings == "all" and has_other_readings(path):
            normal, *others = (p for _, p in path_readings(path))
            return cls(request, request.method.upper(), normal, host, tuple(others))
        return cls(request, request.method.upper(), normalise_path(path), host)

    def reading(self, path: str) -> RequestView:
        """This request as judged under another reading of its path."""
        return replace(self, path=path, other_paths=())
