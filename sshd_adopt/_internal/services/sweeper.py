"""The session sweeper: ssh connections of managed users that are not inside a job.

The wrapper is a ForceCommand, and a ForceCommand is not a boundary: the
user's ``~/.bashrc`` runs first and can ``exec`` past it, a forwarding-only
connection (``ssh -N -L``) never runs it, and anything the session forks can
``setsid`` itself away. The auth-time gate keeps out users who may not be on
the node at all; the sweeper makes sure that what an admitted user runs
through ssh ends up in a job, as pam_slurm_adopt guarantees by adopting the
sshd process itself before any user code runs.

What it looks at: per-connection sshd monitors (``sshd: <user> [priv]``,
real uid 0, a system sshd executable, child of a root sshd listener) of *this*
node (the monitor's network namespace is the broker's: in the lab three
nodes' sshds share one kernel), whose user is managed (not root, not exempt),
that finished authentication (they have a ``sshd: <user>@…`` child), and that
are older than ``sweeper.grace`` (the wrapper adopts a normal session within
~50 ms). Such a connection is in order when the monitor and every process
descending from it — plus processes it forked that were reparented away
(``setsid -f``, double forks), which the proc connector lets us remember —
sit in an extern step of a job of that user. Otherwise:

* the monitor is in a job already (the wrapper ran) but some process is not:
  those processes are adopted into that same job;
* otherwise the connection is decided exactly like a wrapper request
  (:meth:`AdoptionService.adopt_connection`: one job, callerid for several,
  ``action_*``) and adopted; if the decision is a denial, the connection is
  ended: SIGTERM to the monitor and everything of it, SIGKILL after
  ``sweeper.kill_after``.

Root, exempt users and processes that do not descend from an sshd connection
of this node are never touched. Every action is logged with its reason.

When it runs: on proc connector events (fork/exec under a tracked process,
which needs CAP_NET_ADMIN; the kernel only offers the connector in the
initial network namespace, so a broker running in another one opens its
socket there through a short-lived thread that setns()es), debounced to the
grace period, and by a full scan every ``sweeper.interval`` seconds as the
safety net (lost events, ENOBUFS, no connector at all).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from sshd_adopt._internal import protocol
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.sessions import SshSession
from sshd_adopt._internal.services.admission import netns_of, own_netns
from sshd_adopt._internal.services.adoption import AdoptionService, BrokerState
from sshd_adopt._internal.slurm.stepd import EXTERN_STEP, StepdConnection
from sshd_adopt.errors import Error, ProcError, StepdError

_MONITOR_TITLE = re.compile(r"(?:sshd|sshd-session): (\S+) \[priv\]")
_EXTERN = re.compile(r"/job_(\d+)/step_extern(?:/|$)")
#: How many remembered (reparented) processes per monitor we keep at most:
#: a fork bomb must not grow the broker's memory without bound.
_MAX_TRACKED = 65536


# --------------------------------------------------------------------------- proc connector

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")
_FORK = struct.Struct("=IIII")
_PAIR = struct.Struct("=II")
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_EXIT = 0x80000000
_CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class ProcEvent:
    """One proc connector event: fork (parent → child), exec or exit of ``pid``."""

    what: int
    pid: int
    parent: int = 0


def _connector_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
    try:
        sock.bind((0, _CN_IDX_PROC))
        payload = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(payload), 0)
        header = _NLMSG.pack(_NLMSG.size + len(cn) + len(payload), _NLMSG_DONE, 0, 0, 0)
        sock.send(header + cn + payload)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    except OSError:
        sock.close()
        raise
    return sock


def _connector_in_netns(path: str) -> socket.socket:
    """Open the connector socket in the network namespace ``path`` names.

    A netlink socket keeps the namespace it was created in, so a throwaway
    thread enters the namespace, creates the socket and ends: no other thread
    of the broker ever changes namespace.
    """
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            errors.append(err)
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(target, _CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns into {path}: {os.strerror(errno)}")
            result.append(_connector_socket())
        except BaseException as err:  # handed to the caller
            errors.append(err)
        finally:
            os.close(target)

    thread = threading.Thread(target=work, name="sweeper-netns")
    thread.start()
    thread.join()
    if errors or not result:
        raise errors[0] if errors else OSError(f"no connector socket in {path}")
    return result[0]


def _other_netns(limit: int = 16) -> list[str]:
    """/proc paths of up to ``limit`` distinct network namespaces other than ours.

    The kernel offers the proc connector in the initial namespace only. Its
    canonical handle, /proc/1/ns/net, may be refused (a pid 1 with more
    capabilities than ours fails the ptrace access check), so any process
    living in another namespace is a candidate; the kernel tells us which
    one is right by accepting the subscription.
    """
    mine = own_netns()
    seen = {mine}
    paths: list[str] = []
    for pid in [1, *psutil.pids()]:
        path = f"/proc/{pid}/ns/net"
        try:
            name = os.readlink(path)
        except OSError:
            continue
        if name not in seen:
            seen.add(name)
            paths.append(path)
            if len(paths) >= limit:
                break
    return paths


def open_proc_connector() -> socket.socket:
    """A subscribed proc connector socket; OSError if the kernel will not give us one."""
    try:
        return _connector_socket()
    except OSError as first:
        for path in _other_netns():
            try:
                sock = _connector_in_netns(path)
            except OSError:
                continue
            logger().info("sweeper: proc connector opened in the network namespace of %s", path)
            return sock
        raise first


def parse_proc_events(data: bytes) -> list[ProcEvent]:
    """Decode one datagram of proc connector messages (unknown events are skipped)."""
    events: list[ProcEvent] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, offset)[0]
        if length < _NLMSG.size or offset + length > len(data):
            break
        body = offset + _NLMSG.size
        start = body + _CN_MSG.size
        if start + _EVENT_HEAD.size <= offset + length:
            what = _EVENT_HEAD.unpack_from(data, start)[0]
            detail = start + _EVENT_HEAD.size
            if what == PROC_EVENT_FORK and detail + _FORK.size <= offset + length:
                _ppid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(data, detail)
                if child_pid == child_tgid:  # a new process, not a thread
                    events.append(ProcEvent(what, child_tgid, parent_tgid))
            elif what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) and (
                detail + _PAIR.size <= offset + length
            ):
                pid, tgid = _PAIR.unpack_from(data, detail)
                if pid == tgid:
                    events.append(ProcEvent(what, tgid))
        offset += (length + 3) & ~3
    return events


# --------------------------------------------------------------------------- cgroups


def extern_job_of(pid: int, nodename: str) -> int | None:
    """The job whose extern step ``pid`` is in on this node, from /proc/<pid>/cgroup.

    cgroup v1 paths name the node (``/slurm_<node>/uid_<u>/job_<j>/step_extern``);
    v2 paths live under a ``slurmstepd.scope``. Other nodes' jobs never count.
    """
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            text = handle.read(65536)
    except OSError:
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        found = _EXTERN.search(path)
        if found and (f"/slurm_{nodename}/" in path or "slurmstepd.scope" in path):
            return int(found.group(1))
    return None


# --------------------------------------------------------------------------- the sweeper


@dataclass
class _Tracked:
    """A process remembered as part of a connection (it may have been reparented)."""

    monitor: int
    start: float


class Sweeper:
    """Background thread of the broker: event-driven and periodic sweeps."""

    def __init__(self, state: Callable[[], BrokerState], service: AdoptionService) -> None:
        self._state = state
        self._service = service
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._netns = own_netns()
        self._connector: socket.socket | None = None
        # pid -> the monitor it belongs to; filled from fork events and scans.
        self._owner: dict[int, _Tracked] = {}
        # monitors we decided to leave alone (Allow) or are ending: (pid, start) -> why
        self._settled: dict[tuple[int, float], str] = {}
        self._due = float("inf")
        self._listeners: frozenset[int] = frozenset()
        # (monitor pid, start) -> monotonic time we first saw it. Ages are
        # measured on our own clock: psutil's start times are derived from the
        # boot time and can be off by a second on VMs, enough to skip a grace.
        self._first_seen: dict[tuple[int, float], float] = {}

    def start(self) -> None:
        """Start the sweeper thread (idempotent)."""
        if self._thread is not None:
            return
        if self._state().config.sweeper.use_proc_connector:
            try:
                self._connector = open_proc_connector()
                logger().info("sweeper: listening to proc connector events")
            except OSError as err:
                logger().warning("sweeper: no proc connector (%s); periodic scans only", err)
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._connector is not None:
            self._connector.close()
            self._connector = None

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            wait = max(0.0, min(next_scan, self._due) - now)
            if self._connector is not None:
                try:
                    readable, _, _ = select.select([self._connector], [], [], wait)
                except (OSError, ValueError):
                    readable = []
                if readable:
                    self._drain_events()
            else:
                self._stop.wait(wait)
            now = time.monotonic()
            if now >= next_scan or now >= self._due:
                if now < next_scan:
                    logger().debug("sweeper: event-driven scan")
                self._due = float("inf")
                try:
                    self.scan()
                except Exception:  # the safety net must survive anything
                    logger().exception("sweeper: scan failed")
                next_scan = time.monotonic() + self._state().config.sweeper.interval

    def _drain_events(self) -> None:
        """Read all pending events; a fork/exec inside a tracked connection schedules a scan."""
        assert self._connector is not None
        grace = self._state().config.sweeper.grace
        for _ in range(256):
            try:
                data = self._connector.recv(65536)
            except BlockingIOError:
                return
            except OSError as err:  # ENOBUFS: events were lost; scan everything now
                logger().debug("sweeper: proc connector: %s; full scan", err)
                self._due = time.monotonic()
                return
            for event in parse_proc_events(data):
                if event.what == PROC_EVENT_FORK:
                    owner = self._owner.get(event.parent)
                    if owner is not None and len(self._owner) < _MAX_TRACKED:
                        with contextlib.suppress(ProcError):
                            start = procfs.started_at(event.pid)
                            self._owner[event.pid] = _Tracked(owner.monitor, start)
                            self._due = min(self._due, time.monotonic() + grace)
                    elif event.parent in self._listeners:
                        # A new connection's monitor: remember it so that what
                        # it forks is tracked, and look at it after the grace.
                        with contextlib.suppress(ProcError):
                            start = procfs.started_at(event.pid)
                            self._owner[event.pid] = _Tracked(event.pid, start)
                            self._first_seen[(event.pid, start)] = time.monotonic()
                        self._due = min(self._due, time.monotonic() + grace)
                elif event.what == PROC_EVENT_EXEC and event.pid in self._owner:
                    self._due = min(self._due, time.monotonic() + grace)
                elif event.what == PROC_EVENT_EXIT:
                    self._owner.pop(event.pid, None)

    # ----------------------------------------------------------------- scanning

    def scan(self) -> None:
        """One full pass over this node's ssh connections."""
        state = self._state()
        slurm = state.slurm
        nodename = state.config.options.nodename or (slurm.nodename if slurm else None)
        executables = frozenset(state.config.slurm.sshd_executables)
        grace = state.config.sweeper.grace
        listeners: set[int] = set()
        monitors: list[tuple[psutil.Process, str]] = []
        links: list[tuple[int, int, float]] = []
        # One pass over /proc reads each process's stat once (name, ppid,
        # start); status and cmdline only for sshd's root processes. During
        # an MPI fan-out there are hundreds of processes and a scan every
        # grace period, so this pass is what the sweeper costs.
        for proc in psutil.process_iter(["name", "ppid", "create_time"]):
            info = proc.info
            if info["ppid"] is not None and info["create_time"] is not None:
                links.append((proc.pid, info["ppid"], info["create_time"]))
            if not info["name"] or not info["name"].startswith("sshd"):
                continue
            try:
                if proc.uids().real != 0:
                    continue
                title = " ".join(proc.cmdline()).strip()  # setproctitle pads it
            except psutil.Error:
                continue  # gone meanwhile (or a zombie): nothing to sweep
            found = _MONITOR_TITLE.fullmatch(title)
            if found is None:
                if "[listener]" in title and netns_of(proc.pid) == self._netns:
                    listeners.add(proc.pid)
                continue
            monitors.append((proc, found.group(1)))
        self._listeners = frozenset(listeners)
        tree = procfs.ProcessTree.of(links)
        live: set[tuple[int, float]] = set()
        for proc, user in monitors:
            try:
                key = (proc.pid, proc.create_time())
                live.add(key)
                if key in self._settled:
                    continue
                self._check_monitor(
                    state, proc, user, tree, nodename=nodename, executables=executables,
                    grace=grace,
                )
            except (psutil.Error, ProcError):
                continue  # the connection ended while we looked
        self._settled = {key: why for key, why in self._settled.items() if key in live}
        self._first_seen = {key: t for key, t in self._first_seen.items() if key in live}
        self._owner = {
            pid: tracked for pid, tracked in self._owner.items()
            if procfs.still_running(pid, tracked.start)
        }

    def _check_monitor(  # noqa: PLR0912, PLR0915  (one linear checklist, in order)
        self, state: BrokerState, proc: psutil.Process, user: str, tree: procfs.ProcessTree,
        *, nodename: str | None, executables: frozenset[str], grace: float,
    ) -> None:
        monitor = procfs.proc_info(proc.pid)
        if monitor.real_uid != 0 or monitor.exe not in executables:
            return
        if netns_of(monitor.pid) != self._netns:
            return  # another node's sshd (the lab shares one kernel)
        listener = procfs.proc_info(monitor.ppid)
        if listener.real_uid != 0 or listener.exe not in executables:
            return
        import pwd  # noqa: PLC0415

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return
        if entry.pw_uid == 0 or state.config.exempt.covers(entry):
            return  # never touched
        descendants = tree.descendants(monitor.pid)
        session_pid = None
        for child in tree.children(monitor.pid):
            with contextlib.suppress(ProcError):
                title = " ".join(procfs.proc_info(child).cmdline).strip()
                # "user@notty"/"user@pts/N" with a session, plain "user" for -N
                if re.fullmatch(rf"(?:sshd|sshd-session): {re.escape(user)}(?:@\S+)?", title):
                    session_pid = child
        if session_pid is None:
            return  # still authenticating (the gate's business) or closing
        now = time.monotonic()
        age = now - self._first_seen.setdefault((monitor.pid, monitor.start_time), now)
        if age < grace:
            self._due = min(self._due, time.monotonic() + grace - age + 0.01)
            return
        for pid in descendants:
            if pid not in self._owner:
                with contextlib.suppress(ProcError):
                    self._owner[pid] = _Tracked(monitor.pid, procfs.started_at(pid))
        strays = [
            pid for pid, tracked in self._owner.items()
            if tracked.monitor == monitor.pid and pid != monitor.pid and pid not in descendants
            and procfs.still_running(pid, tracked.start)
        ]
        members = [monitor.pid, *descendants, *strays]
        if nodename is None:
            return
        jobs = {pid: extern_job_of(pid, nodename) for pid in members}
        monitor_job = jobs[monitor.pid]
        outside = [pid for pid, job in jobs.items() if job is None or job != monitor_job]
        if monitor_job is not None and not outside:
            return  # the normal case: the wrapper adopted it
        session = SshSession(
            user=user, uid=entry.pw_uid, peer_pid=session_pid, monitor_pid=monitor.pid,
            session_pid=session_pid, chain=(monitor.pid, session_pid),
            connection=procfs.connection_of(monitor.pid), monitor_start=monitor.start_time,
            peer_start=procfs.proc_info(session_pid).start_time,
        )
        where = f"user={user} monitor={monitor.pid} from={session.connection or '?'}"
        if monitor_job is not None:
            logger().warning(
                "sweeper: %s: %d process(es) %s outside job %d of its connection; adopting them",
                where, len(outside), outside[:10], monitor_job,
            )
            self._adopt_pids(state, nodename, monitor_job, entry.pw_uid, outside)
            return
        logger().warning(
            "sweeper: %s: connection outside any job (age %.2fs, %d process(es): wrapper "
            "bypassed or forwarding-only); deciding", where, age, len(members),
        )
        reply = self._service.adopt_connection(session)
        result = reply.get("result")
        if result == protocol.ADOPTED:
            job = int(reply["job"])
            logger().warning("sweeper: %s: adopted into job %d", where, job)
            if strays:
                self._adopt_pids(state, nodename, job, entry.pw_uid, strays)
        elif result == protocol.ALLOWED:
            self._settled[(monitor.pid, monitor.start_time)] = "allowed unadopted"
            logger().info("sweeper: %s: policy allows it unadopted; left alone", where)
        else:
            self._settled[(monitor.pid, monitor.start_time)] = "ending"
            why = reply.get("message", "").splitlines()[0:1]
            logger().warning("sweeper: %s: may not be here (%s); ending the connection",
                             where, why[0] if why else result)
            self._terminate(state, members)

    def _adopt_pids(
        self, state: BrokerState, nodename: str, job: int, uid: int, pids: list[int]
    ) -> None:
        """Add individual processes to ``job``'s extern step (after checking its owner)."""
        slurm = state.slurm
        if slurm is None or slurm.spool_dir is None:
            return
        path = os.path.join(slurm.spool_dir, f"{nodename}_{job}.{EXTERN_STEP}")
        try:
            with StepdConnection.open(path, timeout=state.config.broker.stepd_timeout) as stepd:
                if stepd.step_uid() != uid:
                    raise StepdError(f"job {job} does not belong to uid {uid}")
                for pid in pids:
                    try:
                        stepd.add_extern_pid(pid)
                        logger().info("sweeper: process %d adopted into job %d", pid, job)
                    except StepdError as err:
                        logger().debug("sweeper: pid %d not adopted: %s", pid, err)
        except (StepdError, Error) as err:
            logger().error("sweeper: could not adopt %s into job %d: %s", pids[:10], job, err)

    def _terminate(self, state: BrokerState, pids: list[int]) -> None:
        """SIGTERM every process of the connection, SIGKILL the survivors later."""
        starts: dict[int, float] = {}
        for pid in pids:
            with contextlib.suppress(ProcError):
                starts[pid] = procfs.started_at(pid)
        for pid in starts:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        logger().warning("sweeper: SIGTERM sent to %s", sorted(starts)[:20])

        def finish() -> None:
            for pid, start in starts.items():
                if procfs.still_running(pid, start):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                    logger().warning("sweeper: SIGKILL sent to %d", pid)

        timer = threading.Timer(state.config.sweeper.kill_after, finish)
        timer.daemon = True
        timer.start()
