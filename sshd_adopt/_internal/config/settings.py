"""The broker's settings: one frozen dataclass per TOML section, with the defaults.

This module is the reference for what can be configured and what each default
is (``docs/configuration.md`` explains every key). Values are checked where
they are read (:mod:`.loader`); the few settings that validate themselves
(message templates, exempt groups) do it on construction.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Final, Literal

from sshd_adopt._internal import protocol
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
OnDeny = Literal["message", "refuse"]


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

    socket_path: str = protocol.DEFAULT_SOCKET
    socket_mode: int = 0o666
    socket_group: str | None = None
    pid_file: str = "/run/sshd-adopt/sshd-adoptd.pid"
    request_timeout: float = 2.0  # to receive one request frame
    stepd_timeout: float = 2.0  # per slurmstepd exchange
    decision_deadline: float = 5.0  # one whole request, callerid and adoption included
    workers: int = 16
    max_connections: int = 512
    max_per_uid: int = 64
    proc_events: bool = True  # follow logins and stepds through the kernel's proc connector
    reconcile_interval: float = 10.0  # full re-read of the node's extern steps
    #: Where the session spawner listens (sshd-adopt-spawn.socket): while it exists, the
    #: helper that starts sessions inside job namespaces is started there by systemd,
    #: outside the broker's sandbox; otherwise by the broker, only if it runs unsandboxed.
    spawn_socket: str = "/run/sshd-adopt-spawn/spawn.sock"


@dataclass(frozen=True)
class Exemptions:
    """Users and groups the broker lets in without adoption (admins, service accounts).

    Names only: the login core resolves the groups when it asks
    (:meth:`~sshd_adopt._internal.core.login.LoginCore.exempt`, cached briefly), so a
    directory-service group that appears after the broker started works without a
    reload. Root is always exempt.
    """

    users: frozenset[str] = frozenset({"root"})
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CallerIdSettings:
    """How the broker asks the source host which job a connection came from.

    ``deadline`` bounds what a source host that drops packets or hangs can
    cost a login (pam_slurm_adopt: 2 s to 10 s, from Slurm's own timeouts).
    ``scontrol_path`` and ``munge_path`` are absolute: the broker runs them as
    the connecting user, with a fixed environment, never found on a PATH.
    ``munge_path`` is the fallback for nodes where libmunge (``libmunge.so.2``)
    does not load; otherwise the credential is minted in-process.
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
    not_an_ssh_session: str = "sshd-adopt: not an ssh session"

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
    """Where Slurm's configuration is."""

    conf_path: str = "/etc/slurm/slurm.conf"


@dataclass(frozen=True)
class SshdSettings:
    """Which binaries count as sshd.

    ``executables`` is what the broker accepts as the per-connection sshd processes
    above a peer and as a listener (OpenSSH ≥ 9.8 splits off ``sshd-session``);
    anything else in the chain means "not an ssh session".
    """

    executables: tuple[str, ...] = (
        "/usr/sbin/sshd",
        "/usr/lib/openssh/sshd-session",
        "/usr/libexec/sshd-session",
        "/usr/sbin/sshd-session",
    )


@dataclass(frozen=True)
class AdmissionSettings:
    """Admission at authentication: the drop-in's AuthorizedKeysFile,
    AuthorizedPrincipalsFile and AuthorizedKeysCommand lines.

    ``keys_dir`` and ``principals_dir`` hold one entry per user who may enter now
    (sshd reads ``<keys_dir>/%u``): a symlink to ``keys_file`` (relative to the home;
    ``%h``, ``%u`` expand), and a file naming the user, or a symlink to
    ``principals_file`` when the site has one. Both directories must be root's alone
    (the broker refuses to start otherwise).

    The AuthorizedKeysCommand (``sshd-adopt-keys``, run as ``command_user``) is the
    fallback for users without an entry, and the primary path when keys come from
    ``keys_command`` (run as ``command_user``, ``%u`` replaced; e.g.
    ``/usr/bin/sss_ssh_authorizedkeys %u``). ``timeout`` bounds the key source.

    ``on_deny`` is what a user who may not enter gets. ``message`` (default): users
    whose login shell reads no startup file for ``-c`` under the drop-in's
    ``SetEnv SHLVL=1`` (``message_shells``: bash, dash/sh) authenticate with
    ``restrict``-ed keys (no forwarding, agent, X11 or pty), the wrapper prints why,
    and nothing of theirs runs on the node; every other shell is refused at
    authentication ("Permission denied (publickey)"). ``refuse``: everyone is.

    ``present_file`` lists, one name per line, the users with a job on this node now
    (root's, mode 0644, replaced whole at each change): the keyless profile's PAM
    service (``pam.d/sshd-adopt``, ``pam_listfile``) admits only them, in sshd's account
    phase, before authentication succeeds.
    """

    keys_dir: str = "/run/sshd-adopt/keys"
    principals_dir: str = "/run/sshd-adopt/principals"
    present_file: str = "/run/sshd-adopt/present"
    keys_file: str = ".ssh/authorized_keys"
    principals_file: str = ""
    command_user: str = "sshd-adopt-gate"
    keys_command: str = ""
    on_deny: OnDeny = "message"
    message_shells: tuple[str, ...] = ("bash", "sh", "dash")
    timeout: float = 2.0
    max_keys_bytes: int = 64 * 1024


@dataclass(frozen=True)
class AdoptionSettings:
    """Adoption as soon as sshd has authenticated a connection.

    With ``early`` (and the proc connector), the broker adopts the connection's
    monitor and post-authentication child the moment that child takes the user's
    uid, before the session runs anything; the wrapper then finds it done. Without,
    adoption waits for the wrapper's request (and the sweeper).

    With ``warm`` (read at start), the broker moves a process of its own between two
    cgroups of its own when a connection starts its key check, so that the adoption
    moments later takes the kernel's fast path
    (:mod:`sshd_adopt._internal.node.cgroupwarm`).
    """

    early: bool = True
    warm: bool = True


@dataclass(frozen=True)
class SweeperSettings:
    """The session sweeper: connections of managed users found outside any job.

    ``interval`` is the period of the sweeper's scan of the known listeners'
    connections (the safety net behind the proc connector's events; every
    process is looked at every 30 s, ``sweeper.FULL_SCAN_EVERY``); ``grace`` is
    how old a connection must be before the sweeper acts on it; ``kill_after`` is
    how long a connection to be ended gets between SIGTERM and SIGKILL. Times in
    seconds.
    """

    enabled: bool = True
    interval: float = 2.0
    grace: float = 0.5
    kill_after: float = 2.0


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
    sshd: SshdSettings = field(default_factory=SshdSettings)
    log: LogSettings = field(default_factory=LogSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    adoption: AdoptionSettings = field(default_factory=AdoptionSettings)
    sweeper: SweeperSettings = field(default_factory=SweeperSettings)
    warnings: tuple[str, ...] = ()


