"""The node watcher: one thread that follows the kernel's news and hands out the work.

It reads two event sources and does nothing slow itself: the proc connector
(:mod:`sshd_adopt._internal.node.procevents`) and inotify on the slurmd spool
directory (:mod:`sshd_adopt._internal.node.inotify`). What it sees goes to:

* the job table: extern-step sockets appearing and vanishing, stepds exiting;
* adoption: a listener forks a connection's monitor, the monitor forks a child, the
  child takes a user's uid -- that connection has just been authenticated
  (:meth:`~sshd_adopt._internal.services.adoption.Adoption.authenticated`, on a worker);
  before that, the monitor taking the user's effective uid for the key check
  (:meth:`~sshd_adopt._internal.services.adoption.Adoption.key_check`: warm the
  cgroup-migration path for a managed connection);
* the sweeper: forks, execs and exits of processes of followed connections; an exec of
  sshd by a connection of a listener it does not know yet (sshd restarted since its
  last full pass) makes that listener known at once;
* holds (:mod:`sshd_adopt._internal.services.holds`): a login that may have met no key
  entry (hostbased, GSSAPI) is stopped when its session child takes the user's uid, or,
  when its key check already refused the user, killed as sshd's pre-authentication
  child exits -- here, on this thread, with a signal each: no worker could be as quick.

Timers drive the rest: settling new sockets whose stepd did not answer yet, the
periodic reconcile of the job table, and watching the spool directory again when it
(re)appears. Without the proc connector (no CAP_NET_ADMIN, a container), only the
spool directory is watched; the wrapper's request and the sweeper's scans carry on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Final

from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import procfs, signals
from sshd_adopt._internal.node.inotify import Change, DirWatch
from sshd_adopt._internal.node.procevents import (
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_UID,
    ProcEvent,
    open_proc_connector,
    parse_proc_events,
)
from sshd_adopt._internal.services.adoption import Adoption
from sshd_adopt._internal.services.sweeper import Sweeper
from sshd_adopt._internal.slurm.jobtable import JobTable
from sshd_adopt.errors import ProcError

#: How often new sockets whose stepd did not answer yet are asked again (seconds).
SETTLE_EVERY: Final = 0.05
#: How often a missing spool directory is looked for again (seconds).
REWATCH_EVERY: Final = 2.0
#: Most connections followed at once (monitors and their children).
MAX_FOLLOWED: Final = 65536
#: A monitor's pre-authentication child has exited: authentication is over.
AUTH_OVER: Final = 0


class Watcher:
    """The event thread (start once, stop once)."""

    def __init__(self, state: Callable[[], BrokerState], *, table: JobTable,
                 adoption: Adoption, sweeper: Sweeper, pool: Executor,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._table = table
        self._adoption = adoption
        self._sweeper = sweeper
        self._pool = pool
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connector: socket.socket | None = None
        #: Why the proc connector is not followed (None while it is).
        self.connector_problem: str | None = "not started"
        self._spool: DirWatch | None = None
        self._monitors: dict[int, float] = {}  # monitor pid -> start time
        self._listener_of: dict[int, int] = {}  # monitor pid -> the listener that forked it
        self._children: dict[int, int] = {}  # child pid -> its monitor
        #: monitor -> its first (pre-authentication) child, AUTH_OVER once that exited
        self._first_child: dict[int, int] = {}
        self._preauth_of: dict[int, int] = {}  # pre-authentication child -> its monitor
        self._reconciling: Future[None] | None = None
        self._settling: Future[None] | None = None

    @property
    def connector(self) -> bool:
        """Whether the proc connector is followed."""
        return self._connector is not None

    def start(self, *, proc_events: bool) -> None:
        if not proc_events:
            self.connector_problem = "turned off (broker.proc_events = false)"
        else:
            try:
                self._connector = open_proc_connector()
                self.connector_problem = None
                logger().info("following the proc connector (early adoption, stepd exits)")
            except OSError as err:
                self.connector_problem = err.strerror or str(err)
                logger().warning("no proc connector (%s): adoption waits for the wrapper, "
                                 "the sweeper scans periodically", err)
        self._watch_spool()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._connector is not None:
            self._connector.close()
            self._connector = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        next_reconcile = self._clock() + self._state().config.broker.reconcile_interval
        next_rewatch = self._clock() + REWATCH_EVERY
        while not self._stop.is_set():
            sources: list[socket.socket | DirWatch] = [
                s for s in (self._connector, self._spool) if s is not None]
            timeout = SETTLE_EVERY if self._table.has_pending() else 0.5
            try:
                readable, _, _ = select.select(sources, [], [], timeout)
            except (OSError, ValueError):
                readable = []
            for source in readable:
                try:
                    if source is self._connector:
                        self._drain_connector()
                    elif source is self._spool:
                        self._drain_spool()
                except Exception:  # the watcher must survive anything
                    logger().exception("watcher: event handling failed")
            now = self._clock()
            if self._table.has_pending():
                self._settling = self._submit(self._settling, self._table.settle_pending)
            if now >= next_reconcile:
                self._reconciling = self._submit(self._reconciling, self._table.reconcile)
                next_reconcile = now + self._state().config.broker.reconcile_interval
            if self._spool is None and now >= next_rewatch:
                self._watch_spool()
                next_rewatch = now + REWATCH_EVERY

    def _submit(self, running: Future[None] | None,
                work: Callable[[], None]) -> Future[None] | None:
        """Run ``work`` on a worker unless the previous run of it is not finished."""
        if running is not None and not running.done():
            return running
        try:
            return self._pool.submit(work)
        except RuntimeError:  # the pool is shutting down
            return None

    def _watch_spool(self) -> None:
        state = self._state()
        if state.spool_dir is None:
            return
        try:
            self._spool = DirWatch(state.spool_dir)
        except OSError as err:
            logger().debug("watcher: spool dir %s not watched yet: %s", state.spool_dir, err)
            self._spool = None
            return
        self._reconciling = self._submit(self._reconciling, self._table.reconcile)

    def _drain_spool(self) -> None:
        assert self._spool is not None
        for event in self._spool.read():
            if event.change is Change.APPEARED:
                self._settling = self._submit(
                    None, functools.partial(self._table.socket_appeared, event.name))
            elif event.change is Change.VANISHED:
                self._table.socket_vanished(event.name)
            elif event.change is Change.OVERFLOW:
                self._reconciling = self._submit(self._reconciling, self._table.reconcile)
            elif event.change is Change.GONE:
                logger().warning("watcher: spool dir %s went away", self._spool.path)
                self._spool.close()
                self._spool = None
                self._reconciling = self._submit(self._reconciling, self._table.reconcile)
                return

    def _drain_connector(self) -> None:
        assert self._connector is not None
        for _ in range(256):
            try:
                data = self._connector.recv(65536)
            except BlockingIOError:
                return
            except OSError as err:  # ENOBUFS: events were lost; look at everything now
                logger().debug("watcher: proc connector: %s; full reconcile and scan", err)
                self._monitors.clear()  # their exits may be among the lost events
                self._children.clear()
                self._reconciling = self._submit(self._reconciling, self._table.reconcile)
                self._sweeper.wake_after(0)
                return
            for event in parse_proc_events(data):
                self.dispatch(event)

    def dispatch(self, event: ProcEvent) -> None:
        """Route one proc connector event (on the watcher thread: nothing slow here)."""
        if event.what == PROC_EVENT_FORK:
            self._forked(event)
        elif event.what == PROC_EVENT_UID:
            self._uid_changed(event)
        elif event.what == PROC_EVENT_EXEC:
            self._executed(event.pid)
        elif event.what == PROC_EVENT_EXIT:
            self._exited(event.pid)

    def _forked(self, event: ProcEvent) -> None:
        if event.parent in self._sweeper.listeners:
            with contextlib.suppress(ProcError):
                if len(self._monitors) < MAX_FOLLOWED:
                    self._monitors[event.pid] = procfs.started_at(event.pid)
                    self._listener_of[event.pid] = event.parent
            self._sweeper.connection_opened(event.pid)
            return
        monitor = event.parent
        if monitor in self._monitors and len(self._children) < MAX_FOLLOWED:
            first = self._first_child.get(monitor)
            if first is None:  # the monitor's first child: sshd's pre-authentication one
                self._first_child[monitor] = event.pid
                self._preauth_of[event.pid] = monitor
            elif first == AUTH_OVER and self._adoption.holds.doomed(monitor) is not None:
                self._end_doomed(monitor, [event.pid])
            self._children[event.pid] = monitor
        self._sweeper.forked(monitor, event.pid)

    def _executed(self, pid: int) -> None:
        self._sweeper.executed(pid)
        if pid in self._monitors or pid in self._children:
            return
        # A connection's process execs sshd right after its listener forked it (OpenSSH
        # 9.2: ``sshd -R``; 9.8 and later: sshd-session). One whose fork was not followed
        # has a listener started since the sweeper's last full pass (sshd restarted):
        # follow that listener from now on, and this connection as if its fork was seen.
        if procfs.executable(pid) not in self._state().config.sshd.executables:
            return
        with contextlib.suppress(ProcError):
            parent = procfs.parent_of(pid)
            if parent != os.getpid() and (parent in self._sweeper.listeners
                                          or self._sweeper.listener_found(parent)):
                self._forked(ProcEvent(PROC_EVENT_FORK, pid, parent=parent))

    def _uid_changed(self, event: ProcEvent) -> None:
        if event.pid in self._monitors:
            # The monitor reads the user's keys with the user's effective uid: an
            # adoption may follow within milliseconds.
            if event.ruid == 0 and event.euid != 0 and self._state().config.adoption.early:
                listener = self._listener_of.get(event.pid)
                self._adoption.holds.checking(event.pid, event.euid, listener)
                if self._first_child.get(event.pid) == AUTH_OVER:
                    # After authentication (GSSAPI stores the user's credentials so,
                    # before the session child is forked): a refusal remembered ends it
                    # now, else it waits for this answer.
                    if self._adoption.holds.doomed(event.pid) is not None:
                        self._end_doomed(event.pid, self._connection(event.pid))
                    else:
                        self._adoption.holds.stop_if_awaiting(event.pid, listener)
                self._submit(None, functools.partial(
                    self._adoption.key_check, event.pid, self._monitors[event.pid]))
            return
        monitor = self._children.get(event.pid)
        if monitor is None or event.ruid != event.euid or event.ruid == 0:
            return
        start = self._monitors.get(monitor)
        if start is not None and self._state().config.adoption.early:
            # A login that may have met no key entry is stopped right here, before its
            # session handles a packet, until it is decided (services/holds.py).
            held = self._adoption.holds.should_hold(
                monitor, self._listener_of.get(monitor), event.ruid
            ) and signals.hold(event.pid)
            self._submit(None, functools.partial(
                self._adoption.authenticated, monitor, start, event.pid, held=held))

    def _exited(self, pid: int) -> None:
        monitor = self._preauth_of.pop(pid, None)
        if monitor is not None:
            self._first_child[monitor] = AUTH_OVER
            if self._adoption.holds.doomed(monitor) is not None:
                # Authentication is over: the session child is being (or about to be)
                # forked. Kill the connection before it handles a packet of the session.
                self._end_doomed(monitor, self._connection(monitor, leaving=pid))
            else:  # its key check may still doom it: the monitor waits for the answer
                self._adoption.holds.stop_if_awaiting(monitor, self._listener_of.get(monitor))
        self._table.process_exited(pid)
        if self._monitors.pop(pid, None) is not None:
            self._listener_of.pop(pid, None)
            self._first_child.pop(pid, None)
            self._adoption.monitor_gone(pid)
        self._children.pop(pid, None)
        self._sweeper.exited(pid)

    def _connection(self, monitor: int, leaving: int | None = None) -> list[int]:
        """The monitor and the children it is known to have (but ``leaving``, exiting)."""
        return [monitor, *(child for child, parent in self._children.items()
                           if parent == monitor and child != leaving)]

    def _end_doomed(self, monitor: int, pids: list[int]) -> None:
        """SIGKILL a doomed connection now (watcher thread: its monitor's process group and
        ``pids``), and have a worker log it."""
        killed = signals.kill_connection(monitor, pids)
        why = self._adoption.holds.doomed(monitor) or "refused"
        self._submit(None, functools.partial(self._adoption.doomed_ended, monitor, why, killed))
