"""The sweeper: connections of managed users found outside any job, adopted or ended.

Early adoption puts a connection in its job before the session runs anything, and
whatever the session forks later is born there. The sweeper is the safety net for
what that misses: a broker without the proc connector (periodic scans only), an event
lost under load, a connection whose early decision was a refusal the wrapper was to
explain but which lingers (``ssh -N`` with ``restrict``-ed keys), a process that left
its connection (``setsid -f``) before being adopted.

What it looks at: per-connection sshd monitors of *this* node (root, a system sshd
executable, titled ``sshd: <user> [priv]``, child of a root sshd listener, in the
broker's network namespace), that finished authentication (they have a
``sshd: <user>@…`` child), older than ``sweeper.grace``, not being decided at this
moment nor refused less than ``sweeper.grace`` ago (the wrapper is saying why), of users
that are neither root nor exempt, and -- asked of sshd itself -- that sshd sends through
sshd-adopt: a connection outside the managed ``Match`` block is never judged. Such a
connection is in order when the monitor and every process of it (plus processes it
forked that were reparented away, remembered from fork events) sit in one job's extern
step. Otherwise: processes outside the monitor's job are adopted into it; a connection
in no job is decided by the login core like any other, and adopted, or ended (SIGTERM,
then SIGKILL after ``sweeper.kill_after``). Every action is logged with its reason.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import psutil

from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Outcome
from sshd_adopt._internal.core.ports import ExternSteps
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import cgroups, procfs, signals
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.node.sessions import (
    check_root_sshd,
    is_listener_title,
    is_session_title,
    monitor_user,
)
from sshd_adopt._internal.node.sshdconfig import ManagedQuery, SshdConfigError
from sshd_adopt.errors import NoSuchProcess, NotAnSshSession, ProcError, StepdError

#: How many remembered (reparented) processes we keep at most: a fork bomb must not
#: grow the broker's memory without bound.
MAX_TRACKED: Final = 65536
#: Seconds between two scans of every process of the node. In between, a scan reads
#: only the children of the listeners the last full one found (microseconds where a
#: full pass costs milliseconds per hundred processes); a listener that ended or was
#: replaced brings the full pass forward. A listener started beside the known ones is
#: found by the next full pass, at most this long after it started.
FULL_SCAN_EVERY: Final = 30.0


@dataclass
class _Tracked:
    """A process remembered as part of a connection (it may have been reparented)."""

    monitor: int
    start: float


class Decisions(Protocol):
    """What adoption knows of a connection (:class:`~.adoption.Adoption`)."""

    def in_flight(self, monitor_pid: int, monitor_start: float) -> bool: ...

    def decision(self, monitor_pid: int, monitor_start: float) -> tuple[Outcome, float] | None:
        ...


@dataclass(frozen=True)
class _Monitor:
    info: ProcInfo
    user: str


class Sweeper:
    """Judges this node's connections; runs on its own thread, fed by the event watcher."""

    def __init__(self, state: Callable[[], BrokerState], core: LoginCore, *,
                 steps: ExternSteps, managed: ManagedQuery, netns: str,
                 decisions: Decisions | None = None,
                 job_named: cgroups.JobNamer = cgroups.no_sluids,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._job_named = job_named
        self._decisions = decisions
        self._core = core
        self._steps = steps
        self._managed = managed
        self._netns = netns
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # pid -> the monitor it belongs to; filled from fork events and scans.
        self._owner: dict[int, _Tracked] = {}
        # monitors left alone (allowed) or being ended: (pid, start) -> why
        self._settled: dict[tuple[int, float], str] = {}
        # (monitor pid, start) -> our clock when first seen (psutil's start times come
        # from the boot time and can be off by a second on VMs, enough to skip a grace)
        self._first_seen: dict[tuple[int, float], float] = {}
        self.listeners: frozenset[int] = frozenset()
        self._listener_starts: dict[int, float] = {}  # from the last full pass
        self._monitors: dict[int, _Monitor] = {}  # pid -> as the last pass found it
        self._next_full = 0.0

    # ------------------------------------------------------------------ events

    def connection_opened(self, monitor_pid: int) -> None:
        """A listener forked a new connection's monitor: follow what it forks."""
        with contextlib.suppress(ProcError):
            start = procfs.started_at(monitor_pid)
            with self._lock:
                if len(self._owner) < MAX_TRACKED:
                    self._owner[monitor_pid] = _Tracked(monitor_pid, start)
                self._first_seen[(monitor_pid, start)] = self._clock()
        self.wake_after(self._state().config.sweeper.grace)

    def forked(self, parent: int, child: int) -> None:
        """A fork: a process of a followed connection stays part of it, even reparented."""
        with self._lock:
            owner = self._owner.get(parent)
        if owner is None:
            return
        with contextlib.suppress(ProcError):
            start = procfs.started_at(child)
            with self._lock:
                if len(self._owner) < MAX_TRACKED:
                    self._owner[child] = _Tracked(owner.monitor, start)
        self.wake_after(self._state().config.sweeper.grace)

    def executed(self, pid: int) -> None:
        with self._lock:
            followed = pid in self._owner
        if followed:
            self.wake_after(self._state().config.sweeper.grace)

    def exited(self, pid: int) -> None:
        with self._lock:
            self._owner.pop(pid, None)

    def wake_after(self, seconds: float) -> None:
        """Scan once ``seconds`` have passed (debounced: one scan for a burst)."""
        with self._lock:
            due = self._clock() + seconds
            if self._due is None or due < self._due:
                self._due = due
        self._wake.set()

    _due: float | None = None

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            now = self._clock()
            with self._lock:
                due = min(next_scan, self._due if self._due is not None else next_scan)
            if now < due:
                self._wake.wait(due - now)
                self._wake.clear()
                continue
            with self._lock:
                self._due = None
            try:
                self.scan(full=now >= self._next_full)
            except Exception:  # the safety net must survive anything
                logger().exception("sweeper: scan failed")
            next_scan = self._clock() + self._state().config.sweeper.interval

    # ------------------------------------------------------------------ judging

    def scan(self, *, full: bool = True) -> None:
        """One pass over this node's ssh connections.

        ``full``: look at every process of the node (finds listeners). Otherwise only
        at the children of the listeners the last full pass found, unless one of them
        ended (then the pass is full after all).
        """
        state = self._state()
        executables = frozenset(state.config.sshd.executables)
        found: tuple[list[_Monitor], procfs.ProcessTree | None] | None = (
            None if full else self._listener_pass())
        if found is None:
            found = self._full_pass()
            self._next_full = self._clock() + FULL_SCAN_EVERY
        monitors, tree = found
        self._monitors = {monitor.info.pid: monitor for monitor in monitors}
        live: set[tuple[int, float]] = set()
        for monitor in monitors:
            key = (monitor.info.pid, monitor.info.start_time)
            live.add(key)
            if key in self._settled:
                continue
            try:
                self._judge(state, monitor, tree, executables)
            except (ProcError, NotAnSshSession):
                continue  # the connection ended (or changed) while we looked
        with self._lock:
            self._settled = {k: why for k, why in self._settled.items() if k in live}
            self._first_seen = {k: t for k, t in self._first_seen.items() if k in live}
            owners = dict(self._owner)
        if tree is None:
            return  # exit events keep the followed processes current between full passes
        alive = {pid: t for pid, t in owners.items() if procfs.still_running(pid, t.start)}
        with self._lock:
            self._owner = {pid: t for pid, t in self._owner.items() if pid in alive}

    def _full_pass(self) -> tuple[list[_Monitor], procfs.ProcessTree]:
        """Every process of the node: listeners, monitors and the parent links."""
        listeners: dict[int, float] = {}
        monitors: list[_Monitor] = []
        links: list[tuple[int, int, float]] = []
        # One pass over /proc reads each process's stat once (name, ppid, start);
        # status and cmdline only for sshd's root processes.
        for proc in psutil.process_iter(["name", "ppid", "create_time"]):
            info = proc.info
            if info["ppid"] is not None and info["create_time"] is not None:
                links.append((proc.pid, info["ppid"], info["create_time"]))
            if not info["name"] or not info["name"].startswith("sshd"):
                continue
            with contextlib.suppress(ProcError):
                found = procfs.proc_info(proc.pid)
                if not self._ours(found):
                    continue
                if is_listener_title(found.title):
                    listeners[found.pid] = found.start_time
                    continue
                user = monitor_user(found.title)
                if user is not None:
                    monitors.append(_Monitor(found, user))
        self._listener_starts = listeners
        self.listeners = frozenset(listeners)
        return monitors, procfs.ProcessTree.of(links)

    def listener_found(self, pid: int) -> bool:
        """Whether ``pid`` is one of this node's sshd listeners that the last full pass did
        not see (started since: sshd was restarted); if so it is known from now on. The
        watcher asks when a connection of an unknown parent execs sshd. Same tests as the
        full pass (root, this network namespace, the listener's title); one /proc read."""
        try:
            found = procfs.proc_info(pid)
            if not (found.name.startswith("sshd") and is_listener_title(found.title)
                    and self._ours(found)):
                return False
        except ProcError:
            return False
        with self._lock:  # replaced, never changed in place: a pass may be reading them
            self._listener_starts = {**self._listener_starts, pid: found.start_time}
            self.listeners = frozenset(self._listener_starts)
        logger().info("sshd listener %d started since the last full scan: following its "
                      "connections", pid)
        return True

    def _ours(self, found: procfs.ProcInfo) -> bool:
        """A process of root's in this network namespace: this node's sshd may be it.
        Raises ProcError when it is gone."""
        return found.real_uid == 0 and procfs.netns_of(found.pid) == self._netns

    def _listener_pass(self) -> tuple[list[_Monitor], None] | None:
        """The monitors among the known listeners' children; None if a listener is gone
        (or none is known): the caller makes a full pass instead."""
        if not self._listener_starts:
            return None
        monitors: list[_Monitor] = []
        for pid, start in self._listener_starts.items():
            try:
                children = procfs.children_of(pid)
            except ProcError:
                return None
            if not procfs.still_running(pid, start):
                return None
            for child in children:
                known = self._monitors.get(child)
                if known is not None and procfs.still_running(child, known.info.start_time):
                    monitors.append(known)  # its title, ids and parent do not change
                    continue
                with contextlib.suppress(ProcError):
                    found = procfs.proc_info(child)
                    user = monitor_user(found.title) if found.real_uid == 0 else None
                    if user is not None:
                        monitors.append(_Monitor(found, user))
        return monitors, None

    def _judge(self, state: BrokerState, monitor: _Monitor, tree: procfs.ProcessTree | None,
               executables: frozenset[str]) -> None:
        info = monitor.info
        check_root_sshd(info, executables, "monitor")
        listener = procfs.proc_info(info.ppid)
        check_root_sshd(listener, executables, "listener")
        account = self._core.accounts.by_name(monitor.user)
        if account is None or self._core.exempt(account):
            return  # never touched
        children = tree.children(info.pid) if tree is not None else procfs.children_of(info.pid)
        session = next((c for c in children if self._is_session(c, account.name)), None)
        if session is None:
            return  # still authenticating (admission's business) or closing
        age = self._age(info)
        if self._not_yet(state, info, age):
            return
        connection = procfs.connection_of(info.pid)
        try:
            if not self._managed.managed(listener, account.name, connection):
                self._settled[(info.pid, info.start_time)] = "not managed"
                return
        except SshdConfigError as err:
            logger().warning("sweeper: user=%s monitor=%d: cannot ask sshd whether it is "
                             "managed (%s); left alone", account.name, info.pid, err)
            return
        members = self._members(info, tree)
        nodename = state.nodename
        if nodename is None:
            return
        jobs = {pid: cgroups.extern_job_of(pid, nodename, self._job_named) for pid in members}
        monitor_job = jobs[info.pid]
        outside = [pid for pid, job in jobs.items() if job is None or job != monitor_job]
        if monitor_job is not None and not outside:
            # In order, and it stays so: what these processes fork is born in the job, and
            # a user cannot move a process out of it (cgroup.procs above the step is
            # root's). Not judged again while it lives: a fan-out of many connections
            # would cost every scan a /proc and cgroup read of each of their processes.
            self._settled[(info.pid, info.start_time)] = f"in job {monitor_job}"
            return
        where = f"user={account.name} monitor={info.pid} from={connection or '?'}"
        if monitor_job is not None:
            logger().warning("sweeper: %s: %d process(es) %s outside job %d of its "
                             "connection; adopting them", where, len(outside), outside[:10],
                             monitor_job)
            self._join(account, monitor_job, outside)
            return
        logger().warning("sweeper: %s: connection outside any job (age %.2fs, %d process(es): "
                         "wrapper bypassed or forwarding-only); deciding", where, age,
                         len(members))
        settled = self._core.settle(account, connection, lambda: self._members(info, tree),
                                    state.config.options)
        outcome = settled.outcome
        if isinstance(outcome, Adopted):
            logger().warning("sweeper: %s: adopted into job %d (%s)", where, outcome.job,
                             outcome.reason)
        elif isinstance(outcome, Allowed):
            self._settled[(info.pid, info.start_time)] = "allowed unadopted"
            logger().info("sweeper: %s: policy allows it unadopted (%s); left alone", where,
                          outcome.reason)
        else:
            self._settled[(info.pid, info.start_time)] = "ending"
            signals.terminate(members, kill_after=state.config.sweeper.kill_after,
                              why=f"sweeper: {where}: may not be here ({outcome.reason})")

    def _age(self, info: ProcInfo) -> float:
        """Seconds since the connection was first seen (by its fork event, or a scan)."""
        now = self._clock()
        with self._lock:
            return now - self._first_seen.setdefault((info.pid, info.start_time), now)

    def _not_yet(self, state: BrokerState, info: ProcInfo, age: float) -> bool:
        """Whether to leave the connection for now: too young, being decided, allowed by
        policy, or refused a moment ago (the wrapper is telling the user why)."""
        grace = state.config.sweeper.grace
        if age < grace:
            self.wake_after(grace - age + 0.01)
            return True
        if self._decisions is None:
            return False
        key = (info.pid, info.start_time)
        if self._decisions.in_flight(*key):
            self.wake_after(grace)
            return True  # being decided right now
        decision = self._decisions.decision(*key)
        if decision is None:
            return False
        outcome, at = decision
        if isinstance(outcome, Allowed):
            self._settled[key] = "allowed unadopted"
            return True  # decided moments ago, under the same policy
        since = self._clock() - at
        if isinstance(outcome, Denied) and since < grace:
            self.wake_after(grace - since + 0.01)
            return True  # the wrapper is telling the user why; the session ends by itself
        return False

    @staticmethod
    def _is_session(pid: int, user: str) -> bool:
        try:
            return is_session_title(procfs.proc_info(pid).title, user)
        except ProcError:
            return False

    def _members(self, monitor: ProcInfo, tree: procfs.ProcessTree | None) -> list[int]:
        """The monitor, its descendants, and its remembered strays (still running)."""
        try:
            descendants = procfs.descendants(monitor.pid)
        except NoSuchProcess:
            descendants = tree.descendants(monitor.pid) if tree is not None else []
        with self._lock:
            for pid in descendants:
                if pid not in self._owner and len(self._owner) < MAX_TRACKED:
                    with contextlib.suppress(ProcError):
                        self._owner[pid] = _Tracked(monitor.pid, procfs.started_at(pid))
            strays = [(pid, tracked.start) for pid, tracked in self._owner.items()
                      if tracked.monitor == monitor.pid and pid != monitor.pid
                      and pid not in descendants]
        live = [pid for pid, start in strays if procfs.still_running(pid, start)]
        return [monitor.pid, *descendants, *live]

    def _join(self, account: Account, job: int, pids: list[int]) -> None:
        try:
            self._steps.join(job, account.uid, pids, want_x11=False)
        except (StepdError, NoSuchProcess) as err:
            logger().error("sweeper: could not adopt %s into job %d: %s", pids[:10], job, err)
