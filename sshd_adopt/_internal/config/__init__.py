"""The broker's TOML configuration, validated strictly with errors that name file and key.

One file (default :data:`DEFAULT_CONFIG_PATH`) holds everything: the
pam_slurm_adopt options under their upstream names in ``[policy]``, and the
broker's own settings in ``[broker]``, ``[exempt]``, ``[callerid]``,
``[messages]``, ``[slurm]`` and ``[log]``. ``docs/configuration.md`` is the
reference for every key.

Why strict: pam_slurm_adopt compares option names and values on a fixed prefix
and silently keeps the default for anything it does not recognise
(``action_unknown=newestFOO`` means ``newest``, ``action_unknown=dney`` means
``newest`` too, with one syslog line). For a component that decides who gets
onto a compute node, a typo must stop the broker at start (or be refused by
``sshd-adoptd --check``), not quietly change the policy. So: unknown sections
and keys are errors (with a "did you mean"), types are checked exactly (a
boolean is not an integer), values must be whole words from the allowed set
(case-insensitive, as upstream), and combinations that cannot work are errors.

All problems of a file are collected and raised together as one
:class:`InvalidConfig` (a :class:`~sshd_adopt.errors.ConfigError`), one
problem per line, so an admin fixes the file in one pass. Combination checks
run only once every key is individually valid, since they would otherwise
reason about values we already know to be wrong.

Choices that are legal but let users in unconfined are not errors; they come
back as :attr:`Config.warnings`, which the broker logs at every start.

The per-``Match`` overrides from the ForceCommand line arrive here through
:func:`apply_overrides`; they come from a process the user controls, so they
are never trusted to loosen anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import grp
import math
import os
import pwd
import re
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging.handlers import SysLogHandler
from typing import Any, Final, Literal, get_args

from sshd_adopt._internal import protocol
from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.options import (
    FREE_OVERRIDES,
    STRICTNESS,
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    LogLevel,
    NoJobsAction,
    Options,
    UnknownAction,
)
from sshd_adopt.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_MESSAGE_CHARS",
    "TEMPLATE_FIELDS",
    "BrokerSettings",
    "CallerIdMethod",
    "CallerIdSettings",
    "Config",
    "Exemptions",
    "GateSettings",
    "InvalidConfig",
    "LogSettings",
    "LogTarget",
    "Messages",
    "SlurmSettings",
    "SweeperSettings",
    "apply_overrides",
    "load_config",
    "parse_option",
]

DEFAULT_CONFIG_PATH: Final = "/etc/sshd-adopt/sshd-adopt.toml"

#: The only ``str.format`` fields a message template may use. A fixed set, so
#: a template can never reach attributes or indexes (``{user.__class__}``).
TEMPLATE_FIELDS: Final = frozenset({"user", "node", "job", "jobs"})

#: Longest template, and longest rendered message: a denial travels in one
#: broker reply frame (8 KiB, shared with the environment) and ends on a
#: terminal; ``{jobs}`` can expand, so the rendered text is clipped too.
MAX_MESSAGE_CHARS: Final = 1024

#: Upper bound for every timeout, in seconds. Catches values written in
#: milliseconds (``decision_deadline = 5000``), which would otherwise hold a
#: login for over an hour.
_MAX_SECONDS: Final = 300.0

#: The wrapper's default ``--timeout`` (``sshd_adopt/cli/wrapper.py``,
#: ``Settings.timeout``). Kept in step by hand: the wrapper may not import us.
_WRAPPER_DEFAULT_TIMEOUT: Final = protocol.DEFAULT_WRAPPER_TIMEOUT

CallerIdMethod = Literal["auto", "native", "scontrol"]
LogTarget = Literal["syslog", "stderr", "auto"]
GateOnDeny = Literal["restrict", "refuse"]


class InvalidConfig(ConfigError):
    """Every problem found in one configuration file, raised together.

    With one problem it reads exactly like that problem's
    :class:`~sshd_adopt.errors.ConfigError` (``path: key: problem``). With
    several, the message is ``path: N problems:`` followed by one complete
    ``path: key: problem`` line per problem, so each line can be grepped or
    logged on its own. :attr:`problems` holds them individually.
    """

    def __init__(self, problems: Iterable[ConfigError]) -> None:
        self.problems: tuple[ConfigError, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("InvalidConfig needs at least one problem")
        first = self.problems[0]
        if len(self.problems) == 1:
            super().__init__(first.path, first.key, first.problem)
        else:
            lines = "\n".join(f"  {problem}" for problem in self.problems)
            super().__init__(first.path, None, f"{len(self.problems)} problems:\n{lines}")


class _Invalid(ValueError):
    """One value is wrong; the text says why (the caller adds file and key)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BrokerSettings:
    """How the broker listens and how long it waits, in seconds.

    The limits bound what one user (``max_per_uid``) and everyone together
    (``max_connections``) can hold open, so a user cannot starve others'
    logins; the timeouts bound what a slow or malicious peer can cost.
    """

    socket_path: str = "/run/sshd-adopt/broker.sock"
    socket_mode: int = 0o666
    socket_group: str | None = None
    pid_file: str = "/run/sshd-adopt/sshd-adoptd.pid"
    request_timeout: float = 2.0  # to receive one request frame
    stepd_timeout: float = 2.0  # per slurmstepd exchange
    decision_deadline: float = 5.0  # one whole request, callerid and adoption included
    workers: int = 16
    max_connections: int = 512
    max_per_uid: int = 64


@dataclass(frozen=True)
class Exemptions:
    """Users and groups the broker lets in without adoption (admins, service accounts).

    Group names are resolved to gids once, when the configuration is loaded,
    because :meth:`is_exempt` runs on every login and must not hit NSS (LDAP)
    each time. A name that does not resolve is not an error, since the admin
    may create the group later; it matches nobody until it exists and the
    configuration is reloaded (SIGHUP), and it is listed in
    :attr:`unknown_groups` so the loader can warn.
    """

    users: frozenset[str] = frozenset({"root"})
    groups: frozenset[str] = frozenset()
    gids: frozenset[int] = field(init=False, default=frozenset(), compare=False)
    unknown_groups: frozenset[str] = field(init=False, default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        gids: set[int] = set()
        unknown: set[str] = set()
        for name in self.groups:
            try:
                gids.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                unknown.add(name)
        object.__setattr__(self, "gids", frozenset(gids))
        object.__setattr__(self, "unknown_groups", frozenset(unknown))

    def is_exempt(self, user: str, gids: Iterable[int]) -> bool:
        """Whether ``user``, a member of ``gids``, is let in without adoption."""
        return user in self.users or not self.gids.isdisjoint(gids)

    def covers(self, entry: pwd.struct_passwd) -> bool:
        """Whether the account ``entry`` is exempt, by name or by any of its groups.

        The one place the gate, adoption and the sweeper ask: all three must
        agree on who is never adopted and never refused.
        """
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return self.is_exempt(entry.pw_name, groups)


@dataclass(frozen=True)
class CallerIdSettings:
    """How the broker asks the source host which job a connection came from.

    ``deadline`` bounds what a source host that drops packets or hangs can
    cost a login (pam_slurm_adopt: 2 s to 10 s, from Slurm's own timeouts).
    ``scontrol_path`` and ``munge_path`` are absolute: the broker runs them as
    the connecting user, with a fixed environment, never found on a PATH.
    """

    deadline: float = 1.0
    method: CallerIdMethod = "auto"
    scontrol_path: str = "/usr/bin/scontrol"
    munge_path: str = "/usr/bin/munge"


def _check_template(template: str) -> None:
    """Raise :class:`ValueError` unless ``template`` renders with exactly our fields.

    Checked by parsing (only fields from :data:`TEMPLATE_FIELDS`, no
    positional ``{}``) and by a trial render with string values, which also
    catches format specs that cannot apply to a string (``{job:d}``).
    """
    if len(template) > MAX_MESSAGE_CHARS:
        raise _Invalid(f"is {len(template)} characters long; at most {MAX_MESSAGE_CHARS}")
    allowed = ", ".join("{" + name + "}" for name in sorted(TEMPLATE_FIELDS))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise _Invalid(f"is not a valid template ({err}); use {{{{ and }}}} for braces") from None
    for _text, name, _spec, _conversion in parsed:
        if name is not None and name not in TEMPLATE_FIELDS:
            raise _Invalid(f"uses the field {{{name}}}; allowed fields: {allowed}")
    try:
        template.format(**{name: name for name in TEMPLATE_FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise _Invalid(f"does not render ({err}); allowed fields: {allowed}") from None


@dataclass(frozen=True)
class Messages:
    """The denial texts, one ``str.format`` template per :class:`~decision.Message` kind.

    Field names equal the :class:`~decision.Message` values. Templates are
    validated on construction, so a broker can never fail while rendering.
    """

    no_jobs: str = "Access denied by sshd-adopt: you have no active jobs on this node"
    unknown_source: str = "Access denied by sshd-adopt: unable to determine source job"
    adopt_failed: str = "Access denied by sshd-adopt: failed to adopt the session into job {job}"
    no_node: str = (
        "Access denied by sshd-adopt: this host is not a Slurm compute node (no NodeName)"
    )

    def __post_init__(self) -> None:
        for kind in Message:
            _check_template(getattr(self, kind.value))

    def render(self, kind: Message, **fields: object) -> str:
        """The text for ``kind``, with ``fields`` (any of user, node, job, jobs) filled in.

        Fields not given render as ``?``. A name outside :data:`TEMPLATE_FIELDS`
        is a programming error and raises :class:`TypeError`. The result is
        clipped to :data:`MAX_MESSAGE_CHARS`.
        """
        unknown = set(fields) - TEMPLATE_FIELDS
        if unknown:
            raise TypeError(f"unknown message fields: {', '.join(sorted(unknown))}")
        values = dict.fromkeys(TEMPLATE_FIELDS, "?")
        values.update((name, str(value)) for name, value in fields.items())
        text: str = getattr(self, kind.value).format(**values)
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        return text


@dataclass(frozen=True)
class SlurmSettings:
    """Where Slurm's configuration is, and which binaries count as sshd.

    ``sshd_executables`` is what the broker accepts as the per-connection
    sshd processes above a peer (OpenSSH ≥ 9.8 splits off ``sshd-session``);
    anything else in the chain means "not an ssh session".
    """

    conf_path: str = "/etc/slurm/slurm.conf"
    sshd_executables: tuple[str, ...] = (
        "/usr/sbin/sshd",
        "/usr/lib/openssh/sshd-session",
        "/usr/libexec/sshd-session",
        "/usr/sbin/sshd-session",
    )


@dataclass(frozen=True)
class GateSettings:
    """The auth-time gate (``sshd-adopt-keys``, sshd's AuthorizedKeysCommand).

    ``user`` is sshd's ``AuthorizedKeysCommandUser``: the broker serves a
    "keys" request only from a process of that user forked by a genuine sshd
    monitor. The keys come from ``keys_command`` (run with the gate user's
    privileges, ``%u`` replaced by the user name) when it is set, else from
    ``keys_files`` (relative to the user's home; ``%u`` and ``%h`` expand),
    which the root broker reads with sshd's StrictModes rules. ``timeout``
    bounds the key source, since sshd imposes no bound on the command.

    ``on_deny`` says what a user who may not enter gets. ``refuse``
    (default): no key, so authentication fails before any session exists and
    the client prints only "Permission denied (publickey)" (the reason is in
    the broker's log). ``restrict``: the user's keys with the ``restrict``
    option, so authentication succeeds with forwarding, agent, X11 and pty
    off, the ForceCommand wrapper runs and the user sees the helpful denial
    message; but the user's shell rc files run before the wrapper, so a
    denied user can run code on the node until the sweeper ends the
    connection (its measured bound, docs/threat-model.md). ``refuse`` is the
    containment boundary; ``restrict`` trades it for the message.
    """

    user: str = "sshd-adopt-gate"
    on_deny: GateOnDeny = "refuse"
    keys_command: str = ""
    keys_files: tuple[str, ...] = (".ssh/authorized_keys",)
    timeout: float = 2.0
    max_keys_bytes: int = 64 * 1024


@dataclass(frozen=True)
class SweeperSettings:
    """The session sweeper: sessions of managed users found outside any job.

    ``interval`` is the period of the full scan (the safety net behind the
    proc connector's events); ``grace`` is how old a connection must be before
    the sweeper acts on it, so the wrapper adopts it first in the normal case;
    ``kill_after`` is how long a connection to be ended gets between SIGTERM
    and SIGKILL.
    """

    enabled: bool = True
    interval: float = 2.0
    grace: float = 0.5
    kill_after: float = 2.0
    use_proc_connector: bool = True


@dataclass(frozen=True)
class LogSettings:
    """Where the broker logs. The level is ``policy.log_level``, as in pam_slurm_adopt."""

    target: LogTarget = "auto"
    facility: str = "authpriv"
    ident: str = "sshd-adopt"


@dataclass(frozen=True)
class Config:
    """A validated configuration; ``warnings`` lists legal but risky choices to log."""

    path: str
    options: Options = field(default_factory=Options)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    exempt: Exemptions = field(default_factory=Exemptions)
    callerid: CallerIdSettings = field(default_factory=CallerIdSettings)
    messages: Messages = field(default_factory=Messages)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    log: LogSettings = field(default_factory=LogSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    sweeper: SweeperSettings = field(default_factory=SweeperSettings)
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- value checks


def _suggest(word: str, candidates: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: object) -> str:
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


def _want_str(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_kind(value)}")
    return value


def _words(values: Iterable[str]) -> str:
    return ", ".join(values)


def _choice_text(value: str, allowed: tuple[str, ...]) -> str:
    """``value`` as one of ``allowed``: a whole word, case-insensitive (never a prefix)."""
    word = value.lower()
    if word in allowed:
        return word
    raise _Invalid(f"{value!r} is not one of: {_words(allowed)}{_suggest(word, allowed)}")


_TRUE_WORDS: Final = ("1", "true")
_FALSE_WORDS: Final = ("0", "false")


def _bool_text(value: str) -> bool:
    """pam-style boolean: ``1``/``0``/``true``/``false`` (case-insensitive)."""
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _Invalid(f"{value!r} is not one of: {_words(_TRUE_WORDS + _FALSE_WORDS)}")


def _bool_toml(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_kind(value)}")
    return value


_LOG_LEVEL_NAMES: Final = tuple(level.name.lower() for level in LogLevel)
_LOG_LEVEL_DIGITS: Final = tuple(str(level.value) for level in LogLevel)


def _log_level_text(value: str) -> LogLevel:
    """A Slurm level name or a single digit 0..9 (upstream clamps ≥ 10; we refuse)."""
    if value in _LOG_LEVEL_DIGITS:
        return LogLevel(int(value))
    word = value.lower()
    if word in _LOG_LEVEL_NAMES:
        return LogLevel[word.upper()]
    raise _Invalid(
        f"{value!r} is not one of: {_words(_LOG_LEVEL_NAMES)}, or an integer 0..9"
        + _suggest(word, _LOG_LEVEL_NAMES)
    )


def _log_level_toml(value: object) -> LogLevel:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid(f"expected a level name or an integer 0..9, got {_kind(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 9:
            raise _Invalid(f"{value} is outside 0..9 (names: {_words(_LOG_LEVEL_NAMES)})")
        return LogLevel(value)
    return _log_level_text(value)


_NODENAME: Final = re.compile(r"[^\s/\x00]{1,255}")


def _nodename_text(value: str) -> str:
    """A Slurm NodeName. It becomes part of stepd socket paths, so no ``/`` and no ``..``."""
    if not _NODENAME.fullmatch(value) or value in (".", ".."):
        raise _Invalid(
            f"{value!r} is not a node name (1..255 characters, no whitespace or '/')"
        )
    return value


def _absolute_path(value: object) -> str:
    text = _want_str(value)
    if not text.startswith("/") or "\x00" in text:
        raise _Invalid(f"{text!r} is not an absolute path")
    return text


def _name(value: object) -> str:
    """A user, group or syslog ident: non-empty, no whitespace."""
    text = _want_str(value)
    if not text or any(char.isspace() for char in text) or "\x00" in text:
        raise _Invalid(f"{text!r} is not a name (non-empty, no whitespace)")
    return text


def _list_of(item: Callable[[object], str]) -> Callable[[object], tuple[str, ...]]:
    def convert(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"expected an array, got {_kind(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Invalid as err:
                raise _Invalid(f"item {index}: {err}") from None
        return tuple(out)

    return convert


def _keys_file(value: object) -> str:
    """An authorized_keys path: relative to the home, or absolute; no ``..``."""
    text = _want_str(value)
    if not text or "\x00" in text or ".." in text.split("/"):
        raise _Invalid(f"{text!r} is not a keys file path (non-empty, no '..')")
    return text


def _non_empty_paths(value: object) -> tuple[str, ...]:
    paths = _list_of(_absolute_path)(value)
    if not paths:
        raise _Invalid("is empty: no sshd could ever be recognised, so every login would fail")
    return paths


def _name_set(value: object) -> frozenset[str]:
    return frozenset(_list_of(_name)(value))


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected a number of seconds, got {_kind(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise _Invalid(f"{value} must be a positive number of seconds")
    if seconds > _MAX_SECONDS:
        raise _Invalid(f"{value} seconds is over {_MAX_SECONDS:g} (is it in milliseconds?)")
    return seconds


def _count(maximum: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_kind(value)}")
        if not 1 <= value <= maximum:
            raise _Invalid(f"{value} is outside 1..{maximum}")
        return value

    return convert


_MODE: Final = re.compile(r"(?:0o|0)?([0-7]{3})")


def _mode(value: object) -> int:
    """A permission mode as an octal *string*.

    A TOML integer is refused on purpose: ``socket_mode = 660`` would be
    decimal 660 (0o1224), and ``= 438`` is a correct 0o666 nobody can read.
    """
    if not isinstance(value, str):
        raise _Invalid(
            f'expected an octal string such as "0666", got {_kind(value)} '
            "(a bare 666 would be decimal)"
        )
    match = _MODE.fullmatch(value)
    if match is None:
        raise _Invalid(f'{value!r} is not an octal mode such as "0666" or "0660"')
    return int(match.group(1), 8)


def _choice(allowed: tuple[str, ...]) -> Callable[[object], str]:
    return lambda value: _choice_text(_want_str(value), allowed)


def _template(value: object) -> str:
    text = _want_str(value)
    _check_template(text)
    return text


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class _OptionSpec:
    """How one pam_slurm_adopt option is read from TOML and from ``key=value`` text."""

    from_toml: Callable[[object], object]
    from_text: Callable[[str], object]


def _values(kind: type[enum.StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in kind)


def _enum_spec(allowed: tuple[str, ...], make: Callable[[str], object]) -> _OptionSpec:
    def from_text(value: str) -> object:
        return make(_choice_text(value, allowed))

    return _OptionSpec(lambda value: from_text(_want_str(value)), from_text)


_BOOL: Final = _OptionSpec(_bool_toml, _bool_text)

#: Every field of :class:`Options`, by its pam_slurm_adopt name.
_POLICY: Final[Mapping[str, _OptionSpec]] = {
    "action_no_jobs": _enum_spec(_values(NoJobsAction), NoJobsAction),
    "action_unknown": _enum_spec(_values(UnknownAction), UnknownAction),
    "action_adopt_failure": _enum_spec(_values(AdoptFailureAction), AdoptFailureAction),
    "action_generic_failure": _enum_spec(_values(GenericFailureAction), GenericFailureAction),
    "fallthrough": _enum_spec(_values(FallThrough), FallThrough),
    "ignore_root": _BOOL,
    "single_job_skip_rpc": _BOOL,
    "disable_x11": _BOOL,
    "nodename": _OptionSpec(lambda value: _nodename_text(_want_str(value)), _nodename_text),
    "log_level": _OptionSpec(_log_level_toml, _log_level_text),
}

#: pam_slurm_adopt options with no meaning here, so a carried-over PAM line
#: gets an explanation instead of a bare "unknown key".
_UPSTREAM_ONLY: Final[Mapping[str, str]] = {
    "service": "is a pam_slurm_adopt option with no meaning here: sshd-adopt only ever "
    "serves sshd; choose users with sshd_config Match blocks instead",
    "join_container": "is a pam_slurm_adopt option that sshd-adopt does not implement",
}

#: Options an override may never set, and why (in the rejection message).
_NEVER_OVERRIDDEN: Final[Mapping[str, str]] = {
    "nodename": "may not be overridden: it chooses whose stepd sockets are consulted",
    "ignore_root": "may not be overridden: root is always let in unadopted",
}

_Schema = Mapping[str, Callable[[object], object]]

_SECTIONS: Final[Mapping[str, _Schema]] = {
    "policy": {key: spec.from_toml for key, spec in _POLICY.items()},
    "broker": {
        "socket_path": _absolute_path,
        "socket_mode": _mode,
        "socket_group": _name,
        "pid_file": _absolute_path,
        "request_timeout": _seconds,
        "stepd_timeout": _seconds,
        "decision_deadline": _seconds,
        "workers": _count(1024),
        "max_connections": _count(65536),
        "max_per_uid": _count(65536),
    },
    "exempt": {"users": _name_set, "groups": _name_set},
    "callerid": {
        "deadline": _seconds,
        "method": _choice(get_args(CallerIdMethod)),
        "scontrol_path": _absolute_path,
        "munge_path": _absolute_path,
    },
    "messages": {kind.value: _template for kind in Message},
    "slurm": {"conf_path": _absolute_path, "sshd_executables": _non_empty_paths},
    "log": {
        "target": _choice(get_args(LogTarget)),
        "facility": _choice(tuple(sorted(SysLogHandler.facility_names))),
        "ident": _name,
    },
    "gate": {
        "user": _name,
        "keys_command": _want_str,
        "on_deny": _choice(get_args(GateOnDeny)),
        "keys_files": _list_of(_keys_file),
        "timeout": _seconds,
        "max_keys_bytes": _count(protocol.MAX_REPLY_FRAME // 2),
    },
    "sweeper": {
        "enabled": _bool_toml,
        "interval": _seconds,
        "grace": _seconds,
        "kill_after": _seconds,
        "use_proc_connector": _bool_toml,
    },
}


# --------------------------------------------------------------------------- loading


class _Loader:
    """Reads one parsed TOML document, collecting every problem and warning."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[ConfigError] = []
        self.warnings: list[str] = []

    def problem(self, key: str | None, text: str) -> None:
        self.problems.append(ConfigError(self.path, key, text))

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {text}")

    def _home_of(self, key: str) -> str | None:
        """The section that owns ``key``, for "belongs in [x]" hints."""
        return next((name for name, schema in _SECTIONS.items() if key in schema), None)

    def document(self, doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Check every section and key; return the valid values per section."""
        values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for name, table in doc.items():
            if name not in _SECTIONS:
                home = self._home_of(name)
                if home is not None:
                    self.problem(name, f"is not a section; it belongs in [{home}]")
                else:
                    self.problem(
                        name,
                        f"unknown section; sections: {_words(_SECTIONS)}"
                        + _suggest(name, _SECTIONS),
                    )
                continue
            if not isinstance(table, dict):
                self.problem(name, f"must be a table ([{name}]), got {_kind(table)}")
                continue
            values[name] = self.section(name, table)
        return values

    def section(self, name: str, table: Mapping[str, Any]) -> dict[str, Any]:
        schema = _SECTIONS[name]
        out: dict[str, Any] = {}
        for key, raw in table.items():
            dotted = f"{name}.{key}"
            convert = schema.get(key)
            if convert is None:
                self.problem(dotted, self._unknown_key(name, key))
                continue
            try:
                out[key] = convert(raw)
            except _Invalid as err:
                self.problem(dotted, str(err))
        return out

    def _unknown_key(self, section: str, key: str) -> str:
        if section == "policy" and key in _UPSTREAM_ONLY:
            return _UPSTREAM_ONLY[key]
        home = self._home_of(key)
        if home is not None:
            return f"unknown key in [{section}]; it belongs in [{home}]"
        keys = _SECTIONS[section]
        return f"unknown key; [{section}] keys: {_words(keys)}" + _suggest(key, keys)

    def build(self, values: Mapping[str, Mapping[str, Any]]) -> Config:
        """Construct the settings from valid values; defaults fill the rest."""
        exempt = Exemptions(**values["exempt"])
        for group in sorted(exempt.unknown_groups):
            self.warn(
                "exempt.groups",
                f"no group {group!r} exists (yet); it exempts nobody until it exists "
                "and the configuration is reloaded (SIGHUP)",
            )
        return Config(
            path=self.path,
            options=Options(**values["policy"]),
            broker=BrokerSettings(**values["broker"]),
            exempt=exempt,
            callerid=CallerIdSettings(**values["callerid"]),
            messages=Messages(**values["messages"]),
            slurm=SlurmSettings(**values["slurm"]),
            log=LogSettings(**values["log"]),
            gate=GateSettings(**values["gate"]),
            sweeper=SweeperSettings(**values["sweeper"]),
        )

    def combinations(self, config: Config) -> None:
        """Errors for settings that cannot work together; warnings for ones that fail open."""
        options, broker = config.options, config.broker
        if not options.ignore_root:
            self.problem(
                "policy.ignore_root",
                "cannot be false: pam_slurm_adopt forces it back to true in every "
                "configuration that can occur, and sshd-adopt always lets root in "
                "unadopted; remove the key (to keep root out, use sshd's PermitRootLogin)",
            )
        if broker.socket_group is not None:
            try:
                grp.getgrnam(broker.socket_group)
            except KeyError:
                self.problem(
                    "broker.socket_group",
                    f"no group {broker.socket_group!r} exists, so the socket cannot be given to it",
                )
        for key, seconds in (
            ("callerid.deadline", config.callerid.deadline),
            ("broker.stepd_timeout", broker.stepd_timeout),
        ):
            if seconds >= broker.decision_deadline:
                self.problem(
                    key,
                    f"{seconds:g} s must be shorter than broker.decision_deadline "
                    f"({broker.decision_deadline:g} s), which bounds the whole request",
                )
        self._warnings(config)

    def _warnings(self, config: Config) -> None:
        options, broker = config.options, config.broker
        open_fallthrough = options.fallthrough is FallThrough.ALLOW
        if options.action_no_jobs is NoJobsAction.IGNORE and open_fallthrough:
            self.warn(
                "policy.action_no_jobs",
                "'ignore' with fallthrough='allow': users without jobs get in",
            )
        if options.action_generic_failure is GenericFailureAction.ALLOW or (
            options.action_generic_failure is GenericFailureAction.IGNORE and open_fallthrough
        ):
            self.warn(
                "policy.action_generic_failure",
                "lets every user in unconfined whenever sshd-adopt cannot work "
                "(slurm.conf unreadable, node name unknown)",
            )
        if options.action_adopt_failure is AdoptFailureAction.ALLOW:
            self.warn(
                "policy.action_adopt_failure",
                "'allow' lets users in unconfined when adoption fails "
                "(pam_slurm_adopt's default; its documentation recommends 'deny')",
            )
        if options.action_unknown is UnknownAction.ALLOW:
            self.warn(
                "policy.action_unknown",
                "'allow' lets users with several jobs in unconfined when the source "
                "job cannot be determined",
            )
        if config.gate.on_deny == "restrict":
            self.warn(
                "gate.on_deny",
                "'restrict' lets users who may not enter authenticate: their shell rc "
                "files run until the sweeper ends the connection",
            )
        group_ok = broker.socket_group is not None and broker.socket_mode & 0o020
        if not broker.socket_mode & 0o002 and not group_ok:
            self.warn(
                "broker.socket_mode",
                f"{broker.socket_mode:04o} lets no user connect to the broker "
                "(connecting needs write permission), so every wrapper request fails",
            )
        if broker.max_per_uid > broker.max_connections:
            self.warn(
                "broker.max_per_uid",
                f"{broker.max_per_uid} is above broker.max_connections "
                f"({broker.max_connections}), so it never applies",
            )
        if broker.decision_deadline >= _WRAPPER_DEFAULT_TIMEOUT:
            self.warn(
                "broker.decision_deadline",
                f"{broker.decision_deadline:g} s is not below the wrapper's default "
                f"--timeout ({_WRAPPER_DEFAULT_TIMEOUT:g} s): the wrapper may give up "
                "first; raise --timeout on the ForceCommand line",
            )

    def file_mode(self, st: os.stat_result) -> None:
        """Whoever can write this file decides who gets onto the node."""
        if st.st_mode & 0o002:
            self.problem(
                None, f"is writable by everyone (mode {st.st_mode & 0o7777:04o}); chmod o-w it"
            )
        elif st.st_mode & 0o020:
            self.warnings.append(
                f"{self.path}: is group-writable (mode {st.st_mode & 0o7777:04o}): "
                "members of its group control the login policy"
            )
        if os.geteuid() == 0 and st.st_uid != 0:
            self.warnings.append(
                f"{self.path}: is owned by uid {st.st_uid}, not root: "
                "that user controls the login policy"
            )


def load_config(path: str | None = None) -> Config:
    """Read and validate a configuration file.

    ``path`` None means :data:`DEFAULT_CONFIG_PATH`; if that file does not
    exist, the built-in defaults apply (with a warning), so a package works
    before the admin writes a file. A path given explicitly must exist: a
    mistyped ``--config`` must not silently run on defaults.

    Raises :class:`InvalidConfig` (a :class:`~sshd_adopt.errors.ConfigError`)
    listing every problem, or a plain ``ConfigError`` when the file cannot be
    read or is not TOML at all.
    """
    explicit = path is not None
    where = path if path is not None else DEFAULT_CONFIG_PATH
    loader = _Loader(where)
    try:
        with open(where, "rb") as handle:
            loader.file_mode(os.fstat(handle.fileno()))
            doc = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(where, None, "no such file") from None
        return Config(
            path=where,
            warnings=(f"{where}: no such file; using the built-in defaults",),
        )
    except OSError as err:
        raise ConfigError(where, None, f"cannot read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(where, None, f"not valid TOML: {err}") from None
    values = loader.document(doc)
    if loader.problems:
        raise InvalidConfig(loader.problems)
    config = loader.build(values)
    loader.combinations(config)
    if loader.problems:
        raise InvalidConfig(loader.problems)
    return dataclasses.replace(config, warnings=tuple(loader.warnings))


# --------------------------------------------------------------------------- overrides


def parse_option(key: str, value: str) -> object:
    """Parse one pam-style ``key=value`` option (values are text, as on a PAM line).

    Returns the typed value :class:`Options` holds (an enum member, a bool, a
    :class:`LogLevel` or a str). Booleans are ``1``/``0``/``true``/``false``;
    enum values and level names are whole words, case-insensitive. Raises
    :class:`ValueError` naming the key, with the allowed values.
    """
    spec = _POLICY.get(key)
    if spec is None:
        if key in _UPSTREAM_ONLY:
            raise ValueError(f"{key}: {_UPSTREAM_ONLY[key]}")
        raise ValueError(
            f"{_shown_key(key)}: unknown option; options: {_words(_POLICY)}"
            + _suggest(key, _POLICY)
        )
    try:
        return spec.from_text(value)
    except _Invalid as err:
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
    :data:`~options.STRICTNESS` is taken only when its new value is at least
    as strict as the current one, options in :data:`~options.FREE_OVERRIDES`
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
    if key in _NEVER_OVERRIDDEN:
        return _NEVER_OVERRIDDEN[key]
    if key not in STRICTNESS and key not in FREE_OVERRIDES:
        if key in _POLICY:
            return "may not be overridden"
        if key in _UPSTREAM_ONLY:
            return _UPSTREAM_ONLY[key]
        return "unknown option" + _suggest(key, [*STRICTNESS, *FREE_OVERRIDES])
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
                f"(accepted here: {_words(stricter)})"
            )
    changes[key] = value
    return None
