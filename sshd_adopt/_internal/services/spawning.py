"""Sessions inside a job's namespaces: check a wrapper's "spawn" request, then start it.

With a namespace plugin (``job_container/tmpfs``, ``namespace/tmpfs``...) a job has a
private ``/tmp`` and ``/dev/shm`` in a mount namespace of its own. pam_slurm_adopt
joins it from sshd's privileged monitor; sshd-adopt adopts from outside, and only a
privileged process can enter a mount namespace, so the session's command is started
for the wrapper by a fresh privileged process, :mod:`sshd_adopt._internal.node.nsexec`.

The request names nothing but whether the session has a terminal and what
``internal-sftp`` runs; it brings the wrapper's standard input, output and error. Who,
where and as whom are derived here, as for every request; what the user chose (the
command, the environment) runs only with the user's own rights:

* who: the peer from SO_PEERCRED, verified as an ssh session's process
  (:func:`~sshd_adopt._internal.node.sessions.find_session`), never root or exempt,
  with the node's root directory (never one of its own making);
* which job: the one this broker adopted the connection into (its own record of the
  monitor, pid and start time), which the job's namespaces were seen in, and the peer
  must be in its extern step now; the step's owner must be the peer's uid;
* the namespaces: from that job's stepd (``REQUEST_GET_NS_FD(S)``);
* the credentials: the peer's own (``/proc/<pid>/status``: four equal uids, four gids
  equal to its SO_PEERCRED gid, groups, umask; ``/proc/<pid>/limits``), re-checked to
  be the same process afterwards: what sshd gave the session;
* the command and environment: sshd's, as the wrapper would run them
  (:mod:`sshd_adopt._internal.sessioncmd`), from the peer's ``/proc/<pid>/environ``;
* a terminal only if it is the peer's own controlling terminal (device number, checked
  by the helper on the descriptor that arrives).

Everything is checked before a helper is started (:meth:`Spawner.check`). The broker
never takes the wrapper's streams itself: the helper asks for them on the wrapper's
connection, and checks the terminal (a descriptor of the user's choosing, one whose
close or fstat blocks, can then only hold up that one session). The helper is put into
the job's extern step before it is told anything, so all it forks is in the job, and
dies with it.
"""

from __future__ import annotations

import array
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypedDict

from sshd_adopt._internal import protocol
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.outcomes import Adopted, Outcome
from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import cgroups, procfs
from sshd_adopt._internal.node.sessions import SshSession, find_session, still_alive
from sshd_adopt._internal.sessioncmd import EXPORTED, session_argv, session_environment
from sshd_adopt._internal.slurm.stepd import CLONE_NEWNS
from sshd_adopt.errors import NotAnSshSession, ProcError, StepdError

#: The helper, run by the interpreter the broker runs on, isolated (``-I``: no
#: PYTHON* variables, no user site, no current directory on the path).
HELPER: Final = ("-I", "-m", "sshd_adopt._internal.node.nsexec")
#: The only variable the helper starts with (the session's own come in its message).
HELPER_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@dataclass(frozen=True)
class Spawned:
    """The session's helper runs inside the job: ``pid``; ``process`` when it is the
    broker's child (to be reaped), None when systemd started it."""

    pid: int
    process: subprocess.Popen[bytes] | None


class HelperParams(TypedDict):
    """What the helper is told (JSON; :mod:`sshd_adopt._internal.node.nsexec` reads it)."""

    namespaces: list[int]
    uid: int
    gid: int
    groups: list[int]
    umask: int
    rlimits: dict[int, tuple[int, int]]
    tty: bool
    home: str
    path: str
    argv: list[str]
    env: dict[str, str]
    controlling_tty: int
    loginuid: int | None


@dataclass(frozen=True)
class Refused:
    """Not started; ``reason`` is for the user (and the log)."""

    reason: str


@dataclass(frozen=True)
class NoNamespaces:
    """The job has no namespaces (any more): the wrapper runs the session itself."""


SpawnOutcome = Spawned | Refused | NoNamespaces


class Decisions(Protocol):
    """What adoption decided for a connection (:class:`~.adoption.Adoption`)."""

    def decision(self, monitor_pid: int, monitor_start: float) -> tuple[Outcome, float] | None:
        ...


class NamespaceSteps(Protocol):
    """A job's extern step: adding a pid to it, and its namespaces
    (:class:`~sshd_adopt._internal.slurm.extern.ExternStepClient`)."""

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool,
             ask_namespaces: bool = True) -> Joined: ...

    def namespaces(self, job: int, uid: int) -> list[tuple[int, int]]: ...


#: Capabilities the helper needs in its bounding set: ``setns`` into a mount namespace
#: (CAP_SYS_ADMIN and CAP_SYS_CHROOT, setns(2)), stealing the terminal (CAP_SYS_ADMIN),
#: taking the user's ids (CAP_SETUID, CAP_SETGID).
NEEDED_CAPABILITIES: Final = {"CAP_SYS_ADMIN": 21, "CAP_SYS_CHROOT": 18, "CAP_SETUID": 7,
                              "CAP_SETGID": 6}


def spawn_problem(status: str) -> str | None:
    """Why a helper started by this process could not start sessions properly, from the
    text of ``/proc/self/status``; None when it can. A helper inherits its starter's
    sandbox for good: with ``NoNewPrivileges`` or a seccomp filter (the shipped unit's
    ``SystemCallFilter``, ``RestrictNamespaces``...) every session would run under them
    (no sudo, no user namespaces), and without the capabilities it cannot enter at all."""
    fields = dict(line.partition(":")[::2] for line in status.splitlines())
    if fields.get("NoNewPrivs", "0").strip() != "0":
        return "the broker runs with NoNewPrivileges, which its sessions would inherit"
    if fields.get("Seccomp", "0").strip() != "0":
        return "the broker runs under a seccomp filter, which its sessions would inherit"
    bounding = int(fields.get("CapBnd", "0").strip() or "0", 16)
    missing = [name for name, bit in NEEDED_CAPABILITIES.items() if not bounding >> bit & 1]
    if missing:
        return f"the broker's capability bounding set lacks {', '.join(missing)}"
    return None


Launch = Callable[[BrokerState], tuple[subprocess.Popen[bytes] | None, socket.socket]]


def launch(state: BrokerState) -> tuple[subprocess.Popen[bytes] | None, socket.socket]:
    """Start a helper; return it (None: systemd started it) and a connection to it.

    Where the spawn socket exists (``broker.spawn_socket``: sshd-adopt-spawn.socket,
    ``Accept=yes``), systemd starts one outside the broker's sandbox for the
    connection. Otherwise the broker starts it as its child, with one end of a socket
    pair as its standard input (fork and exec in C: safe in a threaded broker).
    Raises OSError.
    """
    path = state.config.broker.spawn_socket
    if spawn_socket_usable(path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(state.config.broker.request_timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return None, sock
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, *HELPER], stdin=theirs.fileno(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, env=HELPER_ENV,
            cwd="/")
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.settimeout(state.config.broker.request_timeout)
    return process, ours


def spawn_socket_usable(path: str) -> bool:
    """Whether the spawn socket is there and only root can have put it there: a socket
    in a directory of root's that nobody else may write to (else a listener of someone
    else's could pose as the spawner and be handed other users' terminals)."""
    try:
        info, directory = os.lstat(path), os.stat(os.path.dirname(path))
    except OSError:
        return False
    return (stat.S_ISSOCK(info.st_mode) and info.st_uid == 0 and directory.st_uid == 0
            and not directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def helper_pid(ctl: socket.socket, process: subprocess.Popen[bytes] | None) -> int:
    """The pid the helper announces first (4 bytes, big-endian); checked against the child
    the broker started, or, for one systemd started, that it is root's. Raises
    SpawnFailed."""
    raw = b""
    while len(raw) < protocol.LENGTH_BYTES:
        chunk = ctl.recv(protocol.LENGTH_BYTES - len(raw))
        if not chunk:
            raise SpawnFailed("the helper closed its connection before saying its pid")
        raw += chunk
    pid = int.from_bytes(raw, "big")
    if process is not None and pid != process.pid:
        raise SpawnFailed(f"the helper says it is pid {pid}, not {process.pid}")
    if process is None and set(procfs.credentials(pid).uids) != {0}:
        raise SpawnFailed(f"the helper pid {pid} is not root's")
    return pid


class SpawnFailed(Exception):
    """The helper could not be started or reached."""


@dataclass(frozen=True)
class Checked:
    """A "spawn" request that passed every check: who, which job, and what the helper
    will be told (the terminal is checked by the helper, on the descriptor that comes)."""

    session: SshSession
    account: Account
    job: int
    params: HelperParams


class Spawner:
    """Checks "spawn" requests and starts their helpers (thread-safe: no state)."""

    def __init__(self, state: Callable[[], BrokerState], core: LoginCore, *,
                 decisions: Decisions, steps: NamespaceSteps,
                 job_named: cgroups.JobNamer = cgroups.no_sluids,
                 start: Launch = launch) -> None:
        self._state = state
        self._core = core
        self._decisions = decisions
        self._steps = steps
        self._job_named = job_named
        self._start = start
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            #: Why this broker may not start the helper itself (None: it may).
            self.problem = spawn_problem(handle.read())

    def ready(self) -> bool:
        """Whether sessions can be started inside their jobs' namespaces: the spawn socket
        is there, or the broker may start the helper itself (else they are adopted as
        before and see the node's /tmp; :attr:`problem` says why)."""
        return self.problem is None or spawn_socket_usable(
            self._state().config.broker.spawn_socket)

    def check(self, peer_pid: int, peer_uid: int, peer_gid: int,
              arguments: dict[str, str]) -> Checked | Refused | NoNamespaces:
        """Every check of a "spawn" request, before any helper starts (a client outside an
        adopted session never gets further). ``peer_*``: SO_PEERCRED, at connect time."""
        state = self._state()
        account = self._core.accounts.by_uid(peer_uid)
        if account is None or account.uid == 0 or self._core.exempt(account):
            return self._refuse(peer_pid, peer_uid, "root and exempt users are never adopted")
        try:
            session = find_session(peer_pid, peer_uid,
                                   sshd_executables=frozenset(state.config.sshd.executables))
        except (NotAnSshSession, ProcError) as err:  # gone, unreadable
            return self._refuse(peer_pid, peer_uid, f"not an ssh session: {err}")
        record = self._decisions.decision(session.monitor_pid, session.monitor_start)
        outcome = record[0] if record is not None else None
        if not isinstance(outcome, Adopted):
            return self._refuse(peer_pid, peer_uid, "this connection was not adopted into a job")
        if not outcome.namespaces or not self.ready():
            return NoNamespaces()
        if cgroups.outside_of(outcome.job, session.monitor_pid, [peer_pid], state.nodename or "",
                              self._job_named):
            return self._refuse(peer_pid, peer_uid, f"not in job {outcome.job}'s extern step")
        try:
            params = self._params(session, account, peer_gid, arguments, outcome)
        except (ProcError, ValueError) as err:
            return self._refuse(peer_pid, peer_uid, str(err))
        return Checked(session, account, outcome.job, params)

    def _params(self, session: SshSession, account: Account, peer_gid: int,
                arguments: dict[str, str], outcome: Adopted) -> HelperParams:
        """What the helper is told (raises ValueError or ProcError when the peer's own
        facts do not add up, or it is no longer the process that was checked)."""
        pid = session.peer_pid
        # The session's root must be this broker's: a root of the user's making (a chroot
        # in a user namespace of their own) must never become the helper's.
        if procfs.root_of(pid) != "/":
            raise ValueError("its root directory is not the node's (sshd's ChrootDirectory "
                             "sessions are not started in job namespaces)")
        creds = procfs.credentials(pid)
        if set(creds.uids) != {account.uid}:
            raise ValueError(f"uids {creds.uids} are not all {account.uid}")
        if set(creds.gids) != {peer_gid} or peer_gid == 0:
            raise ValueError(f"gids {creds.gids} are not all its gid at connect time, "
                             f"{peer_gid}, or are root's")
        env = procfs.environment(pid)
        limits = procfs.resource_limits(pid)
        if not still_alive(session):  # every fact above is this very process's
            raise ValueError("the session's process changed while it was looked at")
        return {
            "namespaces": [CLONE_NEWNS],
            "uid": account.uid, "gid": peer_gid, "groups": list(creds.groups),
            "umask": creds.umask, "rlimits": limits,
            "tty": arguments[protocol.SPAWN_TTY] == "1", "home": account.home,
            "path": account.shell,
            "argv": session_argv(account.shell, env.get("SSH_ORIGINAL_COMMAND"),
                                 arguments[protocol.SPAWN_SFTP]),
            "env": session_environment(env, {key: value for key, value in outcome.env.items()
                                             if key in EXPORTED}),
            "controlling_tty": creds.tty,
            "loginuid": procfs.loginuid(pid),
        }

    def start(self, checked: Checked, conn: socket.socket, *, deadline: float) -> SpawnOutcome:
        """Start the checked session; the helper takes the wrapper's connection ``conn``
        (this call's copy: closed here) and asks it for its streams. Nothing is handed to
        a helper after ``deadline`` (``time.monotonic()``): the wrapper has been answered."""
        try:
            return self._start_checked(checked, conn, deadline)
        finally:
            conn.close()

    def _start_checked(self, checked: Checked, conn: socket.socket,
                       deadline: float) -> SpawnOutcome:
        session, account, job = checked.session, checked.account, checked.job
        try:
            found = self._steps.namespaces(job, account.uid)
        except StepdError as err:
            return self._refuse(session.peer_pid, account.uid, f"job {job}'s namespaces: {err}")
        try:
            joining = [(kind, fd) for kind, fd in found if kind == CLONE_NEWNS]
            if len(joining) != len(found):
                logger().info("spawn: job %d has namespaces other than its mount namespace; "
                              "sessions join only that one", job)
            if not joining:
                return NoNamespaces()
            if time.monotonic() > deadline:
                return self._refuse(session.peer_pid, account.uid, "the broker timed out")
            return self._launch(checked, conn=conn, namespaces=joining, deadline=deadline)
        finally:
            for _kind, fd in found:
                os.close(fd)

    def _launch(self, checked: Checked, *, conn: socket.socket,
                namespaces: list[tuple[int, int]], deadline: float) -> SpawnOutcome:
        session, account, job = checked.session, checked.account, checked.job
        try:
            process, ctl = self._start(self._state())
        except OSError as err:
            return self._refuse(session.peer_pid, account.uid, f"no helper: {err}")
        try:
            pid = helper_pid(ctl, process)
            # In the job before it is told anything: all it forks is in the job.
            self._steps.join(job, account.uid, [pid], want_x11=False, ask_namespaces=False)
            if time.monotonic() > deadline:
                raise SpawnFailed("the broker timed out")
            body = json.dumps(checked.params).encode()
            fds = [conn.fileno(), *(fd for _kind, fd in namespaces)]
            ctl.sendmsg([len(body).to_bytes(protocol.LENGTH_BYTES, "big")],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            ctl.sendall(body)
        except (OSError, ProcError, SpawnFailed, StepdError) as err:
            # Closing ctl below ends a helper still waiting for its orders.
            if process is not None:
                process.kill()
                process.wait()
            return self._refuse(session.peer_pid, account.uid, f"the helper failed: {err}")
        finally:
            ctl.close()
        logger().info("spawn: user=%s pid=%d job=%d helper=%d: %s inside the job's mount "
                      "namespace", account.name, session.peer_pid, job, pid,
                      "login shell" if len(checked.params["argv"]) == 1 else "command")
        return Spawned(pid, process)

    @staticmethod
    def _refuse(pid: int, uid: int, why: str) -> Refused:
        logger().warning("spawn refused for pid %d uid %d: %s", pid, uid, why)
        return Refused(why)
