"""Find and verify the OpenSSH connection a broker client belongs to.

The peer (pid and uid from SO_PEERCRED) claims nothing; we walk its ancestry
in /proc and accept it only if it descends, through processes of its own uid,
from a genuine per-connection sshd pair under a genuine root listener::

    sshd listener                 real uid 0, exe = system sshd
    └─ sshd: alice [priv]         real uid 0, exe = system sshd   (the monitor)
       └─ sshd: alice@notty       real uid alice, exe = system sshd (the session)
          └─ [shells …]           real uid alice (at most ``max_intermediate``)
             └─ peer              real and effective uid alice

Observed live with OpenSSH 9.2p1 (Debian 12, ``UsePAM no``, ForceCommand
``/bin/sh`` script that ``exec``s ``sleep``; ``ps``, ``/proc/<pid>/status``,
``/proc/<pid>/fd``, ``ss -tnp``):

* all three sshd processes have ``/proc/<pid>/exe`` = ``/usr/sbin/sshd`` and
  ``comm`` = ``sshd`` (the listener re-executes itself per connection);
* listener: uids 0/0/0, title ``sshd: /usr/sbin/sshd -D -f … [listener] 0 of
  10-100 startups`` (argv kept, so psutil splits it into words);
* monitor: uids 0/0/0, title ``sshd: alice [priv]`` written over argv and
  padded with NULs (psutil returns trailing ``''`` arguments); holds the
  client's TCP socket (fd 4) plus unix socketpairs;
* session: uids alice/alice/alice, title ``sshd: alice@notty`` (``@pts/N``
  with a tty; several ttys are comma-joined), also holds the TCP socket (fd 4);
* the ForceCommand runs via the login shell's ``-c``, which ``exec``s a
  single command, so the wrapper's parent is the session process directly;
  the wrapper holds no socket (its fds are three pipes).

Documented but not observed here: while an AuthorizedKeysCommand runs the
monitor's *effective* uid is the command user's (DESIGN.md fact 5), so only
real uids are checked. OpenSSH >= 9.8 runs the per-connection processes from
``sshd-session`` and titles them ``sshd-session: alice [priv]`` and
``sshd-session: alice@notty`` (seen in this repo's Debian 13 lab); from 10.5 the monitor
retitles itself ``sshd-session: alice [postauth]`` after authentication (seen in the
Debian testing "forky" lab).

What defeats the obvious forgeries, and why the anchor is the monitor: a user
can run any binary under any title, but cannot make a process of theirs the
child of a root process, nor create a root process. So the chain is pinned
by the *root* monitor with a genuine exe and the ``<user> [priv]`` title,
whose parent is a root listener with a genuine exe. A copy of sshd (or
anything renamed or retitled ``sshd``) has another exe path; a user running
the real ``/usr/sbin/sshd`` gets a monitor whose real uid is not 0; a binary
replaced on disk shows ``(deleted)``. The user-owned session process's exe
is a weaker fact (a user namespace can bind-mount over paths), which is why it
is not the anchor.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt.errors import NoSuchProcess, NotAnSshSession

DEFAULT_SSHD_EXECUTABLES = frozenset(
    {
        "/usr/sbin/sshd",  # OpenSSH < 9.8: every per-connection process is sshd itself
        "/usr/lib/openssh/sshd-session",  # Debian/Ubuntu, OpenSSH >= 9.8
        "/usr/libexec/sshd-session",  # upstream default and RHEL/Fedora
        "/usr/sbin/sshd-session",
    }
)
# setproctitle() prefixes the title with the program name: "sshd" before 9.8,
# "sshd-session" since (the monitor and the session process run sshd-session; the
# pre-authentication child, sshd-auth in 10.0, never carries a user's title).
TITLE_PREFIXES = ("sshd: ", "sshd-session: ")
_DELETED = " (deleted)"
# The monitor titles itself ``<user> [priv]`` once the client names its user
# (``monitor.c``), and, since OpenSSH 10.5 (upstream commit addd12a5e, first tagged
# V_10_5_P1; Debian forky's 10.6p1), ``<user> [postauth]`` once that user authenticated
# (``sshd-session.c``: ``main`` after ``privsep_preauth``). Both are the root monitor's.
_MONITOR_TITLE = re.compile(r"(?:sshd|sshd-session): (\S+) \[(?:priv|postauth)\]")
# ``setproctitle("%s [listener] %d of %d-%d startups", ...)`` in sshd.c (9.2, 10.0):
# the whole title, so that a monitor of a user named ``x[listener]`` is not one.
_LISTENER_TITLE = re.compile(r"(?:sshd|sshd-session): .+ \[listener\] \d+ of \d+-\d+ startups")
# A session's title: ``<user>@notty``, ``<user>@<ttys>`` (``pts/0,pts/3`` with several
# sessions on one connection: ``session_tty_list`` in session.c), or just ``<user>``.
_SESSION_SUFFIX = re.compile(r"(?:@[A-Za-z0-9/]+(?:,[A-Za-z0-9/]+)*)?")


def monitor_user(title: str) -> str | None:
    """The user named by a monitor's title ``sshd: <user> [priv]`` (or ``[postauth]``,
    OpenSSH >= 10.5), else None.

    The title is set when the client names its user, *before* authentication: it
    says who is trying, never that anyone got in.
    """
    found = _MONITOR_TITLE.fullmatch(title)
    return found.group(1) if found else None


def is_session_title(title: str, user: str) -> bool:
    """``sshd: <user>@notty`` / ``@pts/N`` (a session), or ``sshd: <user>`` (no session yet).

    The whole title must match: a monitor of an account named ``alice@notty`` is not
    a session of alice.
    """
    for prefix in TITLE_PREFIXES:
        head = f"{prefix}{user}"
        if title.startswith(head) and _SESSION_SUFFIX.fullmatch(title, len(head)):
            return True
    return False


def is_listener_title(title: str) -> bool:
    """sshd's listener titles itself ``sshd: <argv> [listener] N of A-B startups``."""
    return monitor_user(title) is None and _LISTENER_TITLE.fullmatch(title) is not None


@dataclass(frozen=True)
class SshSession:
    """A verified ssh connection and the peer process inside it.

    ``chain`` lists the monitor, the session process, any intermediates and
    the peer, top down: what the broker adopts first. ``monitor_start`` and
    ``peer_start`` pin those pids to the processes that were verified (see
    :func:`still_alive`).
    """

    user: str
    uid: int
    peer_pid: int
    monitor_pid: int
    session_pid: int
    chain: tuple[int, ...]
    connection: Connection | None
    monitor_start: float
    peer_start: float


def _looks_like_sshd(info: ProcInfo, executables: frozenset[str]) -> bool:
    """Whether ``info`` claims to be sshd (and so must pass the session checks).

    Deliberately broad (exe, comm or title): a process that merely *looks*
    like sshd is not walked past as an ordinary shell, it is checked as the
    session process and refused with the precise reason.
    """
    exe = info.exe or ""
    return (
        exe in executables
        or exe.removesuffix(_DELETED) in executables
        # comm exactly (our own wrapper's comm is "sshd-adopt", and its
        # keys command "sshd-adopt-keys": those are not sshd)
        or info.name in ("sshd", "sshd-session", "sshd-auth")
        or info.title.startswith(TITLE_PREFIXES)
    )


def _check_exe(info: ProcInfo, executables: frozenset[str], role: str) -> None:
    if info.exe is None:
        raise NotAnSshSession(f"{role} {info.pid} has no executable (kernel thread?)")
    if info.exe.endswith(_DELETED):
        raise NotAnSshSession(
            f"{role} {info.pid} runs {info.exe!r}: the binary was replaced or removed on disk "
            "since it started (sshd upgraded and not restarted?)"
        )
    if info.exe not in executables:
        raise NotAnSshSession(
            f"{role} {info.pid} runs {info.exe}, not a system sshd "
            f"({', '.join(sorted(executables))})"
        )


def _check_parent(parent: ProcInfo, child: ProcInfo) -> None:
    """A parent started no later than its child; otherwise ``ppid`` was reused.

    Race: ``child`` read its ppid, then that parent exited and the pid was
    given to a new process before we read it. The new process is younger
    than the child, which no real parent can be.
    """
    if parent.start_time > child.start_time:
        raise NoSuchProcess(
            f"parent {parent.pid} of {child.pid} is younger than its child: "
            "the parent exited and its pid was reused"
        )


def _parent_of(child: ProcInfo) -> ProcInfo:
    if child.ppid <= 0:
        raise NotAnSshSession(f"process {child.pid} has no parent: reached the top of the tree")
    parent = procfs.proc_info(child.ppid)
    _check_parent(parent, child)
    return parent


def _check_unchanged(infos: Iterable[ProcInfo]) -> None:
    """Re-verify every process of the chain after the walk.

    Race: the walk reads one process at a time; any of them may exit (the
    login is ending) or be reparented meanwhile. Same pid, start time and
    ppid for all of them means the chain we verified existed as a whole.
    """
    for info in infos:
        if not procfs.same_process(info):
            raise NoSuchProcess(
                f"process {info.pid} ({info.title or info.name}) exited or changed parent "
                "while the session was being verified"
            )


def find_session(
    peer_pid: int,
    peer_uid: int,
    *,
    sshd_executables: frozenset[str] = DEFAULT_SSHD_EXECUTABLES,
    max_intermediate: int = 4,
) -> SshSession:
    """Verify that ``peer_pid`` runs inside an ssh connection of ``peer_uid``'s user.

    ``peer_pid``/``peer_uid`` must come from SO_PEERCRED, never from the
    request. The user name comes from the passwd database for ``peer_uid``,
    never from the environment (it is compared with the sshd titles).

    Raises NotAnSshSession with the precise reason (the broker logs it), or
    NoSuchProcess when a process of the chain vanished or was replaced while
    we looked (the login is ending, or a pid was reused).
    """
    try:
        user = pwd.getpwuid(peer_uid).pw_name
    except KeyError as err:
        raise NotAnSshSession(f"uid {peer_uid} has no passwd entry") from err

    peer = procfs.proc_info(peer_pid)
    if peer.real_uid != peer_uid or peer.effective_uid != peer_uid:
        raise NotAnSshSession(
            f"peer {peer_pid} runs as uid {peer.real_uid} (effective {peer.effective_uid}), "
            f"not {peer_uid}"
        )
    if _looks_like_sshd(peer, sshd_executables):
        raise NotAnSshSession(f"peer {peer_pid} ({peer.title!r}) is itself an sshd process")

    # Walk up through the user's own processes (a login shell that did not
    # exec, a wrapper script) to the first one that claims to be sshd.
    chain = [peer]
    intermediates = 0
    while True:
        parent = _parent_of(chain[-1])
        if _looks_like_sshd(parent, sshd_executables):
            break
        if parent.real_uid != peer_uid:
            raise NotAnSshSession(
                f"ancestor {parent.pid} ({parent.name}) of peer {peer_pid} runs as uid "
                f"{parent.real_uid}, and no sshd session process comes before it"
            )
        intermediates += 1
        if intermediates > max_intermediate:
            raise NotAnSshSession(
                f"no sshd session process within {max_intermediate} intermediate "
                f"processes above peer {peer_pid}"
            )
        chain.append(parent)

    session = parent
    if session.real_uid != peer_uid:
        raise NotAnSshSession(
            f"session process {session.pid} runs as uid {session.real_uid}, not {peer_uid}"
        )
    _check_exe(session, sshd_executables, "session process")
    if not session.title.startswith(tuple(f"{p}{user}@" for p in TITLE_PREFIXES)):
        raise NotAnSshSession(
            f"session process {session.pid} is titled {session.title!r}, not 'sshd: {user}@…'"
        )

    monitor = _parent_of(session)
    # Real uid only: the monitor's effective uid is the AuthorizedKeysCommandUser's
    # while such a command runs (DESIGN.md fact 5).
    if monitor.real_uid != 0:
        raise NotAnSshSession(
            f"monitor {monitor.pid} runs as uid {monitor.real_uid}, not root "
            "(an sshd started by a user?)"
        )
    _check_exe(monitor, sshd_executables, "monitor")
    if monitor_user(monitor.title) != user:
        raise NotAnSshSession(
            f"monitor {monitor.pid} is titled {monitor.title!r}, not 'sshd: {user} [priv]'"
        )

    listener = _parent_of(monitor)
    if listener.real_uid != 0:
        raise NotAnSshSession(f"listener {listener.pid} runs as uid {listener.real_uid}, not root")
    _check_exe(listener, sshd_executables, "listener")

    connection = procfs.connection_of(monitor.pid)
    _check_unchanged([listener, monitor, session, *chain])
    return SshSession(
        user=user,
        uid=peer_uid,
        peer_pid=peer_pid,
        monitor_pid=monitor.pid,
        session_pid=session.pid,
        chain=(monitor.pid, session.pid, *(info.pid for info in reversed(chain))),
        connection=connection,
        monitor_start=monitor.start_time,
        peer_start=peer.start_time,
    )


def still_alive(session: SshSession) -> bool:
    """True while the verified peer and monitor are still the same processes.

    The broker calls this after adoption: if either pid now names another
    process (exit plus pid reuse), what was adopted is not what was verified.
    """
    return procfs.still_running(session.peer_pid, session.peer_start) and procfs.still_running(
        session.monitor_pid, session.monitor_start
    )


def sessions_of_monitor(monitor_pid: int) -> list[int]:
    """The monitor and all its descendants: everything adoption must move.

    Race: descendants that exit while listed are skipped by procfs; if the
    monitor itself is gone, only its pid is returned and adopting it fails
    loudly at the stepd, which is the right place to notice.
    """
    try:
        return [monitor_pid, *procfs.descendants(monitor_pid)]
    except NoSuchProcess:
        return [monitor_pid]


def check_root_sshd(info: ProcInfo, executables: frozenset[str], role: str) -> None:
    """``info`` is a genuine sshd process of root's (real uid 0, a system sshd executable).

    Raises NotAnSshSession naming ``role``.
    """
    if info.real_uid != 0:
        raise NotAnSshSession(f"{role} {info.pid} does not run as root")
    _check_exe(info, executables, role)


# --------------------------------------------------------------------------- the gate's peer

#: How many gate-user processes may sit between the monitor and the gate's peer
#: (a site's shell wrapper around ``sshd-adopt-keys``, ``timeout``, ...).
MAX_GATE_CHAIN = 3


@dataclass(frozen=True)
class GateContext:
    """The verified connection an AuthorizedKeysCommand request belongs to."""

    user: str
    uid: int
    monitor: ProcInfo
    connection: Connection | None


def verify_gate_peer(
    peer_pid: int, peer_uid: int, user: str, *, gate_uid: int, executables: frozenset[str],
    netns: str,
) -> GateContext:
    """Check that ``peer_pid`` is sshd's AuthorizedKeysCommand for ``user`` on this node.

    What is checked (observed on OpenSSH 9.2 and 10.0 while the command runs)::

        sshd listener            real uid 0, exe = system sshd
        └─ sshd: alice [priv]    real uid 0, *effective* uid = the gate user
           └─ sshd-adopt-keys    real and effective uid = the gate user  (the peer)

    The peer runs as the gate user and descends, through at most
    :data:`MAX_GATE_CHAIN` gate-user processes, from a genuine root sshd titled
    ``sshd: <user> [priv]`` whose effective uid is the gate user's right now (it is
    running the command), whose parent is a root sshd, and which lives in this
    broker's network namespace (a node answers only for itself). Raises
    NotAnSshSession with the reason, or ProcError if a process vanished.
    """
    if peer_uid != gate_uid:
        raise NotAnSshSession(f"peer uid {peer_uid} is not the gate user's ({gate_uid})")
    try:
        entry = pwd.getpwnam(user)
    except KeyError as err:
        raise NotAnSshSession(f"user {user!r} has no passwd entry") from err
    current = procfs.proc_info(peer_pid)
    if current.real_uid != gate_uid or current.effective_uid != gate_uid:
        raise NotAnSshSession(f"peer {peer_pid} does not run as the gate user")
    if current.exe in executables:
        raise NotAnSshSession(f"peer {peer_pid} is itself an sshd")
    for _ in range(MAX_GATE_CHAIN + 1):
        parent = _parent_of(current)
        if parent.real_uid == 0:
            break
        if parent.real_uid != gate_uid:
            raise NotAnSshSession(f"ancestor {parent.pid} of {peer_pid} is not the gate user's")
        current = parent
    else:
        raise NotAnSshSession(f"no root sshd within {MAX_GATE_CHAIN} ancestors of {peer_pid}")
    monitor = parent
    check_root_sshd(monitor, executables, "monitor")
    if monitor_user(monitor.title) != user:
        raise NotAnSshSession(f"monitor {monitor.pid} is titled {monitor.title!r}, "
                              f"not {user} [priv]")
    # While sshd runs the command, the monitor's effective uid is the command
    # user's: a monitor that is not doing that right now did not start us.
    if monitor.effective_uid != gate_uid:
        raise NotAnSshSession(f"monitor {monitor.pid} is not running an AuthorizedKeysCommand")
    check_root_sshd(procfs.proc_info(monitor.ppid), executables, "listener")
    if procfs.netns_of(monitor.pid) != netns:
        raise NotAnSshSession(f"monitor {monitor.pid} belongs to another node (network namespace)")
    connection = procfs.connection_of(monitor.pid)
    if not procfs.still_running(monitor.pid, monitor.start_time):
        raise NotAnSshSession(f"monitor {monitor.pid} changed while being verified")
    return GateContext(user=user, uid=entry.pw_uid, monitor=monitor, connection=connection)


# --------------------------------------------------------------------------- authenticated


@dataclass(frozen=True)
class Authenticated:
    """A connection sshd has just authenticated: its monitor and post-authentication child."""

    user: str
    uid: int
    monitor: ProcInfo
    child: ProcInfo
    connection: Connection | None


def verify_authenticated(
    monitor_pid: int, monitor_start: float, child_pid: int, *,
    executables: frozenset[str], netns: str, not_users: frozenset[int] = frozenset(),
) -> Authenticated:
    """Check that ``child_pid`` is the post-authentication child of a genuine monitor.

    sshd forks that child only after authentication succeeded, and it then takes the
    user's uid (sshd.c ``privsep_postauth`` / sshd-session.c, 9.2 and 10.0); before,
    the monitor forks only the pre-authentication child (running as the privsep user,
    chrooted to ``/run/sshd``; ``sshd-auth`` in 10.0) and AuthorizedKeysCommands. The
    monitor's title names the user before authentication, so it proves nothing on its
    own; what proves authentication is this child:

    * its parent is the monitor (same pid and start time as when it was first seen),
      a root sshd with a genuine executable, child of a root sshd listener, in this
      broker's network namespace;
    * it is the monitor's only child, runs the monitor's own executable, has the
      monitor's filesystem root (not the privsep chroot);
    * its real and effective uid are the uid of the user the title names, not 0, and
      not one of ``not_users`` (sshd's privsep user).

    Raises NotAnSshSession with the reason, or NoSuchProcess when something vanished.
    """
    monitor = procfs.proc_info(monitor_pid)
    if monitor.start_time != monitor_start:
        raise NoSuchProcess(f"monitor {monitor_pid} is another process than the one seen")
    check_root_sshd(monitor, executables, "monitor")
    user = monitor_user(monitor.title)
    if user is None:
        raise NotAnSshSession(f"monitor {monitor_pid} is titled {monitor.title!r}")
    if procfs.netns_of(monitor_pid) != netns:
        raise NotAnSshSession(f"monitor {monitor_pid} belongs to another node")
    check_root_sshd(_parent_of(monitor), executables, "listener")
    children = procfs.children_of(monitor_pid)
    if children != [child_pid]:
        raise NotAnSshSession(f"monitor {monitor_pid} has children {children[:5]}, "
                              f"not just {child_pid}")
    child = procfs.proc_info(child_pid)
    if child.ppid != monitor_pid or child.exe != monitor.exe:
        raise NotAnSshSession(f"process {child_pid} is not the monitor's own sshd child")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError as err:
        raise NotAnSshSession(f"user {user!r} has no passwd entry") from err
    if child.real_uid != uid or child.effective_uid != uid or uid == 0 or uid in not_users:
        raise NotAnSshSession(f"process {child_pid} runs as uid {child.real_uid}/"
                              f"{child.effective_uid}, not {user}'s")
    if procfs.root_of(child_pid) != procfs.root_of(monitor_pid):
        raise NotAnSshSession(f"process {child_pid} is chrooted: a pre-authentication child")
    connection = procfs.connection_of(monitor_pid)
    _check_unchanged([monitor, child])
    return Authenticated(user=user, uid=uid, monitor=monitor, child=child,
                         connection=connection)
