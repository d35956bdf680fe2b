"""The broker's settings: one frozen dataclass per TOML section, with the defaults.

This module is the reference for what can be configured and what each default
is (``docs/configuration.md`` explains every key). Values are checked where
they are read (:mod:`.loader`); the few settings that validate themselves
(message templates, exempt groups) do it on construction.
"""

from __future__ import annotations

import grp
import os
import pwd
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.options import Options

DEFAULT_CONFIG_PATH: Final = "/etc/sshd-adopt/sshd-adopt.toml"

#: The only ``str.format`` fields a message template may use. A fixed set, so
#: a template can never reach attributes or indexes (``{user.__class__}``).
TEMPLATE_FIELDS: Final = frozenset({"user", "node", "job", "jobs"})

#: Longest template, and longest rendered message: a denial travels in one
#: broker reply frame (8 KiB, shared with the environment) and ends on a
#: terminal; ``{jobs}`` can expand, so the rendered text is clipped too.
MAX_MESSAGE_CHARS: Final = 1024

CallerIdMethod = Literal["auto", "native", "scontrol"]
LogTarget = Literal["syslog", "stderr", "auto"]
GateOnDeny = Literal["restrict", "refuse"]


class InvalidValue(ValueError):
    """One value is wrong; the text says why (the loader adds file and key)."""


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


def check_template(template: str) -> None:
    """Raise :class:`ValueError` unless ``template`` renders with exactly our fields.

    Checked by parsing (only fields from :data:`TEMPLATE_FIELDS`, no
    positional ``{}``) and by a trial render with string values, which also
    catches format specs that cannot apply to a string (``{job:d}``).
    """
    if len(template) > MAX_MESSAGE_CHARS:
        raise InvalidValue(f"is {len(template)} characters long; at most {MAX_MESSAGE_CHARS}")
    allowed = ", ".join("{" + name + "}" for name in sorted(TEMPLATE_FIELDS))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise InvalidValue(
            f"is not a valid template ({err}); use {{{{ and }}}} for braces") from None
    for _text, name, _spec, _conversion in parsed:
        if name is not None and name not in TEMPLATE_FIELDS:
            raise InvalidValue(f"uses the field {{{name}}}; allowed fields: {allowed}")
    try:
        template.format(**{name: name for name in TEMPLATE_FIELDS})
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise InvalidValue(f"does not render ({err}); allowed fields: {allowed}") from None


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
            check_template(getattr(self, kind.value))

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


