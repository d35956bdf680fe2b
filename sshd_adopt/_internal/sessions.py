"""Find and verify the OpenSSH connection a broker client belongs to.

The peer (from SO_PEERCRED) claims nothing; we walk its ancestry and accept
it only if it descends, through processes of its own uid, from a genuine
per-connection sshd pair::

    sshd listener                 real uid 0, exe = system sshd
    └─ sshd: alice [priv]         real uid 0, exe = system sshd (9.8+: sshd-session)
       └─ sshd: alice@notty       real uid of alice, same exe
          └─ [shells …]           real uid of alice (at most ``max_intermediate``)
             └─ peer              real and effective uid of alice

Observed with OpenSSH 9.2 (Debian 12, UsePAM no): all three sshd processes
have ``/proc/<pid>/exe`` = ``/usr/sbin/sshd`` (sshd re-executes itself), the
titles are ``sshd: <user> [priv]`` and ``sshd: <user>@notty`` (``@pts/N``
with a tty), the monitor holds the client's TCP socket. While an
AuthorizedKeysCommand runs, the monitor's *effective* uid is temporarily the
command user's, so only real uids are checked. OpenSSH >= 9.8 runs the
per-connection processes from ``sshd-session``, titled ``sshd-session: …``.

What defeats the obvious forgeries: a copy of sshd (or anything renamed
``sshd``) has another exe path; a user running the real ``/usr/sbin/sshd``
gets a monitor whose real uid is not 0; a replaced binary shows as
``(deleted)``.
"""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from sshd_adopt._internal import procfs
from sshd_adopt._internal.connection import Connection
from sshd_adopt._internal.procfs import ProcInfo
from sshd_adopt.errors import NotAnSshSession, ProcError

DEFAULT_SSHD_EXECUTABLES = frozenset(
    {
        "/usr/sbin/sshd",
        "/usr/lib/openssh/sshd-session",
        "/usr/libexec/sshd-session",
        "/usr/sbin/sshd-session",
    }
)
_TITLE_PREFIXES = ("sshd: ", "sshd-session: ")


@dataclass(frozen=True)
class SshSession:
    """A verified ssh connection and the peer process inside it."""

    user: str
    uid: int
    peer_pid: int
    monitor_pid: int
    session_pid: int
    chain: tuple[int, ...]  # monitor, session, intermediates…, peer (top down)
    connection: Connection | None
    monitor_start: float
    peer_start: float


def _title(info: ProcInfo) -> str:
    return " ".join(info.cmdline)


def _is_sshd(info: ProcInfo, executables: frozenset[str]) -> bool:
    return info.exe is not None and info.exe in executables


def _check_exe(info: ProcInfo, executables: frozenset[str], role: str) -> None:
    if info.exe is None or info.exe.endswith(" (deleted)"):
        raise NotAnSshSession(f"{role} {info.pid}: executable {info.exe!r} is gone or replaced")
    if info.exe not in executables:
        raise NotAnSshSession(f"{role} {info.pid}: {info.exe} is not a system sshd")


def _titled(info: ProcInfo, user: str, suffix: str) -> bool:
    title = _title(info)
    return any(title.startswith(f"{prefix}{user}{suffix}") for prefix in _TITLE_PREFIXES)


def find_session(
    peer_pid: int,
    peer_uid: int,
    *,
    sshd_executables: frozenset[str] = DEFAULT_SSHD_EXECUTABLES,
    max_intermediate: int = 4,
) -> SshSession:
    """Verify that ``peer_pid`` runs inside an ssh connection of ``peer_uid``'s user.

    Raises NotAnSshSession with the precise reason, or NoSuchProcess when a
    process of the chain vanished while we looked (the login is ending).
    """
    try:
        user = pwd.getpwuid(peer_uid).pw_name
    except KeyError as err:
        raise NotAnSshSession(f"uid {peer_uid} has no passwd entry") from err
    peer = procfs.proc_info(peer_pid)
    if peer.real_uid != peer_uid or peer.effective_uid != peer_uid:
        raise NotAnSshSession(f"peer {peer_pid} does not run as uid {peer_uid}")
    if _is_sshd(peer, sshd_executables):
        raise NotAnSshSession(f"peer {peer_pid} is itself an sshd process")
    chain = [peer]
    current = peer
    for _ in range(max_intermediate + 1):
        parent = procfs.proc_info(current.ppid)
        if parent.real_uid != peer_uid:
            raise NotAnSshSession(
                f"ancestor {parent.pid} ({parent.name}) of peer {peer_pid} runs as uid "
                f"{parent.real_uid}, before any sshd session process"
            )
        chain.append(parent)
        if parent.name.startswith("sshd") or _is_sshd(parent, sshd_executables):
            break
        current = parent
    else:
        raise NotAnSshSession(
            f"no sshd session process within {max_intermediate} ancestors of {peer_pid}"
        )
    session = chain[-1]
    _check_exe(session, sshd_executables, "session process")
    if not _titled(session, user, "@"):
        raise NotAnSshSession(
            f"session process {session.pid} is titled {_title(session)!r}, not {user}@…"
        )
    monitor = procfs.proc_info(session.ppid)
    if monitor.real_uid != 0:
        raise NotAnSshSession(f"monitor {monitor.pid} does not run as root")
    _check_exe(monitor, sshd_executables, "monitor")
    if not _titled(monitor, user, " [priv]"):
        raise NotAnSshSession(
            f"monitor {monitor.pid} is titled {_title(monitor)!r}, not {user} [priv]"
        )
    listener = procfs.proc_info(monitor.ppid)
    if listener.real_uid != 0:
        raise NotAnSshSession(f"listener {listener.pid} does not run as root")
    _check_exe(listener, sshd_executables, "listener")
    connection = procfs.connection_of(monitor.pid)
    pids = (monitor.pid, *(info.pid for info in reversed(chain)))
    found = SshSession(
        user=user,
        uid=peer_uid,
        peer_pid=peer_pid,
        monitor_pid=monitor.pid,
        session_pid=session.pid,
        chain=pids,
        connection=connection,
        monitor_start=monitor.start_time,
        peer_start=peer.start_time,
    )
    # The peer may have exited and its pid been reused while we walked: the
    # start times pin both ends of the chain to the processes we verified.
    if not still_alive(found):
        raise NotAnSshSession(f"peer {peer_pid} or its monitor changed while being verified")
    return found


def still_alive(session: SshSession) -> bool:
    """True while the verified peer and monitor are still the same processes."""
    return procfs.still_running(session.peer_pid, session.peer_start) and procfs.still_running(
        session.monitor_pid, session.monitor_start
    )


def sessions_of_monitor(monitor_pid: int) -> list[int]:
    """The monitor and all its descendants: everything adoption must move."""
    try:
        return [monitor_pid, *procfs.children(monitor_pid, recursive=True)]
    except ProcError:
        return [monitor_pid]
