"""Converters for configuration values, and the pam_slurm_adopt option table.

Every converter takes a raw TOML value (or, for options, the text of a PAM
style ``key=value``) and returns the typed value or raises
:class:`~.settings.InvalidValue` with the reason; the caller adds file and key.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal.config.settings import InvalidValue, check_template
from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    LogLevel,
    NoJobsAction,
    UnknownAction,
)

#: Upper bound for every timeout, in seconds. Catches values written in
#: milliseconds (``decision_deadline = 5000``), which would otherwise hold a
#: login for over an hour.
MAX_SECONDS: Final = 300.0


# --------------------------------------------------------------------------- value checks


def suggest(word: str, candidates: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def toml_kind(value: object) -> str:
    """The TOML type of ``value``, for "expected X, got Y" messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def want_str(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"expected a string, got {toml_kind(value)}")
    return value


def words(values: Iterable[str]) -> str:
    return ", ".join(values)


def choice_text(value: str, allowed: tuple[str, ...]) -> str:
    """``value`` as one of ``allowed``: a whole word, case-insensitive (never a prefix)."""
    word = value.lower()
    if word in allowed:
        return word
    raise InvalidValue(f"{value!r} is not one of: {words(allowed)}{suggest(word, allowed)}")


_TRUE_WORDS: Final = ("1", "true")
_FALSE_WORDS: Final = ("0", "false")


def bool_text(value: str) -> bool:
    """pam-style boolean: ``1``/``0``/``true``/``false`` (case-insensitive)."""
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise InvalidValue(f"{value!r} is not one of: {words(_TRUE_WORDS + _FALSE_WORDS)}")


def bool_toml(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(f"expected true or false, got {toml_kind(value)}")
    return value


_LOG_LEVEL_NAMES: Final = tuple(level.name.lower() for level in LogLevel)
_LOG_LEVEL_DIGITS: Final = tuple(str(level.value) for level in LogLevel)


def log_level_text(value: str) -> LogLevel:
    """A Slurm level name or a single digit 0..9 (upstream clamps ≥ 10; we refuse)."""
    if value in _LOG_LEVEL_DIGITS:
        return LogLevel(int(value))
    word = value.lower()
    if word in _LOG_LEVEL_NAMES:
        return LogLevel[word.upper()]
    raise InvalidValue(
        f"{value!r} is not one of: {words(_LOG_LEVEL_NAMES)}, or an integer 0..9"
        + suggest(word, _LOG_LEVEL_NAMES)
    )


def log_level_toml(value: object) -> LogLevel:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidValue(f"expected a level name or an integer 0..9, got {toml_kind(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 9:
            raise InvalidValue(f"{value} is outside 0..9 (names: {words(_LOG_LEVEL_NAMES)})")
        return LogLevel(value)
    return log_level_text(value)


_NODENAME: Final = re.compile(r"[^\s/\x00]{1,255}")


def nodename_text(value: str) -> str:
    """A Slurm NodeName. It becomes part of stepd socket paths, so no ``/`` and no ``..``."""
    if not _NODENAME.fullmatch(value) or value in (".", ".."):
        raise InvalidValue(
            f"{value!r} is not a node name (1..255 characters, no whitespace or '/')"
        )
    return value


def absolute_path(value: object) -> str:
    text = want_str(value)
    if not text.startswith("/") or "\x00" in text:
        raise InvalidValue(f"{text!r} is not an absolute path")
    return text


def plain_name(value: object) -> str:
    """A user, group or syslog ident: non-empty, no whitespace."""
    text = want_str(value)
    if not text or any(char.isspace() for char in text) or "\x00" in text:
        raise InvalidValue(f"{text!r} is not a name (non-empty, no whitespace)")
    return text


def list_of(item: Callable[[object], str]) -> Callable[[object], tuple[str, ...]]:
    def convert(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise InvalidValue(f"expected an array, got {toml_kind(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except InvalidValue as err:
                raise InvalidValue(f"item {index}: {err}") from None
        return tuple(out)

    return convert


def keys_file(value: object) -> str:
    """An authorized_keys path: relative to the home, or absolute; no ``..``."""
    text = want_str(value)
    if not text or "\x00" in text or ".." in text.split("/"):
        raise InvalidValue(f"{text!r} is not a keys file path (non-empty, no '..')")
    return text


def optional(item: Callable[[object], str]) -> Callable[[object], str]:
    """``item``, or the empty string (meaning "not set")."""
    def convert(value: object) -> str:
        return "" if value == "" else item(value)

    return convert


def non_empty_paths(value: object) -> tuple[str, ...]:
    paths = list_of(absolute_path)(value)
    if not paths:
        raise InvalidValue("is empty: no sshd could ever be recognised, so every login would fail")
    return paths


def name_set(value: object) -> frozenset[str]:
    return frozenset(list_of(plain_name)(value))


def positive_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(f"expected a number of seconds, got {toml_kind(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidValue(f"{value} must be a positive number of seconds")
    if seconds > MAX_SECONDS:
        raise InvalidValue(f"{value} seconds is over {MAX_SECONDS:g} (is it in milliseconds?)")
    return seconds


def count_upto(maximum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue(f"expected an integer, got {toml_kind(value)}")
        if not 1 <= value <= maximum:
            raise InvalidValue(f"{value} is outside 1..{maximum}")
        return value

    return convert


_MODE: Final = re.compile(r"(?:0o|0)?([0-7]{3})")


def octal_mode(value: object) -> int:
    """A permission mode as an octal *string*.

    A TOML integer is refused on purpose: ``socket_mode = 660`` would be
    decimal 660 (0o1224), and ``= 438`` is a correct 0o666 nobody can read.
    """
    if not isinstance(value, str):
        raise InvalidValue(
            f'expected an octal string such as "0666", got {toml_kind(value)} '
            "(a bare 666 would be decimal)"
        )
    match = _MODE.fullmatch(value)
    if match is None:
        raise InvalidValue(f'{value!r} is not an octal mode such as "0666" or "0660"')
    return int(match.group(1), 8)


def one_of(allowed: tuple[str, ...]) -> Callable[[object], str]:
    return lambda value: choice_text(want_str(value), allowed)


def message_template(value: object) -> str:
    text = want_str(value)
    check_template(text)
    return text


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class OptionSpec:
    """How one pam_slurm_adopt option is read from TOML and from ``key=value`` text."""

    from_toml: Callable[[object], object]
    from_text: Callable[[str], object]


def enum_values(kind: type[enum.StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in kind)


def enum_spec(allowed: tuple[str, ...], make: Callable[[str], object]) -> OptionSpec:
    def from_text(value: str) -> object:
        return make(choice_text(value, allowed))

    return OptionSpec(lambda value: from_text(want_str(value)), from_text)


_BOOL: Final = OptionSpec(bool_toml, bool_text)

#: Every field of :class:`Options`, by its pam_slurm_adopt name.
POLICY: Final[Mapping[str, OptionSpec]] = {
    "action_no_jobs": enum_spec(enum_values(NoJobsAction), NoJobsAction),
    "action_unknown": enum_spec(enum_values(UnknownAction), UnknownAction),
    "action_adopt_failure": enum_spec(enum_values(AdoptFailureAction), AdoptFailureAction),
    "action_generic_failure": enum_spec(enum_values(GenericFailureAction), GenericFailureAction),
    "fallthrough": enum_spec(enum_values(FallThrough), FallThrough),
    "ignore_root": _BOOL,
    "single_job_skip_rpc": _BOOL,
    "disable_x11": _BOOL,
    "join_container": _BOOL,
    "nodename": OptionSpec(lambda value: nodename_text(want_str(value)), nodename_text),
    "log_level": OptionSpec(log_level_toml, log_level_text),
}

#: pam_slurm_adopt options with no meaning here, so a carried-over PAM line
#: gets an explanation instead of a bare "unknown key".
UPSTREAM_ONLY: Final[Mapping[str, str]] = {
    "service": "is a pam_slurm_adopt option with no meaning here: sshd-adopt only ever "
    "serves sshd; choose users with sshd_config Match blocks instead",
}

#: Options an override may never set, and why (in the rejection message).
NEVER_OVERRIDDEN: Final[Mapping[str, str]] = {
    "nodename": "may not be overridden: it chooses whose stepd sockets are consulted",
    "ignore_root": "may not be overridden: root is always let in unadopted",
    "join_container": "may not be overridden: whether a session enters its job's namespaces "
    "is decided when the connection is adopted, before the ForceCommand line is read",
}

