"""The rule a plain scan of every rule picks, beside the indexed ``Rules.choose``: what the rule
index's differential tests compare."""

from __future__ import annotations

from ext_authz import errors
from ext_authz.authorization import Matched, Rules, match_params
from ext_authz.paths import RequestView


def scan(rules: Rules, view: RequestView) -> Matched | None:
    """The first rule whose match holds, every rule tried in order (no index)."""
    for rule in rules.rules:
        params = match_params(rule.match, view)
        if params is not None:
            return Matched(rule, params)
    return None


def outcome(rules: Rules, view: RequestView, *, indexed: bool) -> object:
    """``rules.choose(view)`` as (rule name, params), None, or the refusal's class name; with
    ``indexed`` False, each reading is matched by :func:`scan` instead of the index."""
    if not indexed:
        rules.match = lambda view: scan(rules, view)  # type: ignore[method-assign]
    try:
        matched = rules.choose(view)
    except errors.AuthError as error:
        return type(error).__name__
    finally:
        if not indexed:
            del rules.match
    return None if matched is None else (matched.rule.name, dict(matched.params))
