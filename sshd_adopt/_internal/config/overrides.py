"""Per-``Match`` overrides from the ForceCommand line: accepted only when they tighten.

The overrides reach the broker from the wrapper, i.e. from a process the user
controls (the user can run it by hand with any arguments), so they are never
trusted to loosen anything: a forged override can only hurt its forger.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Final

from sshd_adopt._internal.config.settings import InvalidValue
from sshd_adopt._internal.config.values import (
    NEVER_OVERRIDDEN,
    POLICY,
    UPSTREAM_ONLY,
    suggest,
    words,
)
from sshd_adopt._internal.core.options import Options

#: For each overridable option, its values from most permissive to strictest.
#: A per-``Match`` override arrives from the wrapper, i.e. from a process the
#: user controls, so the broker accepts it only when it is at least as strict
#: as the file's value: a forged override can only hurt its forger.
STRICTNESS: Mapping[str, tuple[str, ...]] = {
    "action_no_jobs": ("ignore", "deny"),
    "action_unknown": ("allow", "newest", "deny"),
    "action_adopt_failure": ("allow", "deny"),
    "action_generic_failure": ("allow", "ignore", "deny"),
    "fallthrough": ("allow", "deny"),
}

#: Options an override may set freely: they choose among the user's own jobs
#: or only change what is logged or exported, never who gets in.
FREE_OVERRIDES: frozenset[str] = frozenset({"single_job_skip_rpc", "disable_x11", "log_level"})

# --------------------------------------------------------------------------- overrides


def parse_option(key: str, value: str) -> object:
    """Parse one pam-style ``key=value`` option (values are text, as on a PAM line).

    Returns the typed value :class:`Options` holds (an enum member, a bool, a
    :class:`LogLevel` or a str). Booleans are ``1``/``0``/``true``/``false``;
    enum values and level names are whole words, case-insensitive. Raises
    :class:`ValueError` naming the key, with the allowed values.
    """
    spec = POLICY.get(key)
    if spec is None:
        if key in UPSTREAM_ONLY:
            raise ValueError(f"{key}: {UPSTREAM_ONLY[key]}")
        raise ValueError(
            f"{_shown_key(key)}: unknown option; options: {words(POLICY)}"
            + suggest(key, POLICY)
        )
    try:
        return spec.from_text(value)
    except InvalidValue as err:
        raise ValueError(f"{key}: {err}") from None


def _clip(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


_PLAIN_KEY: Final = re.compile(r"[a-z0-9_]{1,48}")


def _shown_key(key: str) -> str:
    """An untrusted key, safe for a log line (escaped and clipped unless plain)."""
    return key if _PLAIN_KEY.fullmatch(key) else repr(_clip(key))


def apply_overrides(
    options: Options, overrides: Mapping[str, str], *, source: str
) -> tuple[Options, list[str]]:
    """Apply per-``Match`` overrides from the ForceCommand line, tightening only.

    The overrides reach the broker from the wrapper, which runs as the user,
    who can run it by hand with any arguments. So an option in
    :data:`STRICTNESS` is taken only when its new value is at least
    as strict as the current one, options in :data:`FREE_OVERRIDES`
    (which only pick among the user's own jobs or change logging) are taken
    as given, and ``nodename``, ``ignore_root`` and unknown keys are refused.

    Nothing here raises: a bad override is skipped and described in the
    returned list (one line each, naming ``source``), and the rest still
    apply. Untrusted text in those lines is escaped and clipped.
    """
    changes: dict[str, Any] = {}
    rejected: list[str] = []
    for key, text in overrides.items():
        shown = f"{_shown_key(key)}={_clip(text)!r}"
        reason = _override_refusal(options, key, text, changes)
        if reason is not None:
            rejected.append(f"{source}: {shown} rejected: {reason}")
    if not changes:
        return options, rejected
    return dataclasses.replace(options, **changes), rejected


def _override_refusal(
    options: Options, key: str, text: str, changes: dict[str, Any]
) -> str | None:
    """Why ``key=text`` is refused, or None after recording it in ``changes``."""
    if key in NEVER_OVERRIDDEN:
        return NEVER_OVERRIDDEN[key]
    if key not in STRICTNESS and key not in FREE_OVERRIDES:
        if key in POLICY:
            return "may not be overridden"
        if key in UPSTREAM_ONLY:
            return UPSTREAM_ONLY[key]
        return "unknown option" + suggest(key, [*STRICTNESS, *FREE_OVERRIDES])
    try:
        value = parse_option(key, text)
    except ValueError as err:
        return str(err).removeprefix(f"{key}: ")
    if key in STRICTNESS:
        order = STRICTNESS[key]
        current = str(getattr(options, key))
        try:
            looser = order.index(str(value)) < order.index(current)
        except ValueError:  # a value missing from STRICTNESS: cannot rank it, refuse
            return "cannot be ranked by strictness"
        if looser:
            stricter = order[order.index(current) :]
            return (
                f"less strict than the configured {current!r} "
                f"(accepted here: {words(stricter)})"
            )
    changes[key] = value
    return None
