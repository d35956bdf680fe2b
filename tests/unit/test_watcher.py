"""The watcher's routing rules, the proc connector's parser, and the event loop end to end.

``Watcher.dispatch`` gets hand-made events; the job table, adoption and the sweeper are
fakes that record what they are told, and ``procfs.started_at`` (the only /proc reader
the watcher uses) answers from a table, so the test decides which pid is what. The
parser gets datagrams packed by hand as the kernel lays them out
(``include/uapi/linux/cn_proc.h``: ``struct nlmsghdr``, ``struct cn_msg``, ``struct
proc_event``). The last test runs the watcher's own thread over a socketpair standing
in for the connector and a real inotify watch on a temporary spool directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshd_adopt._internal.broker import watcher as watcher_module
from sshd_adopt._internal.broker.watcher import Watcher
from sshd_adopt._internal.config import AdoptionSettings, Config
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.node import procfs, signals
from sshd_adopt._internal.node.procevents import (
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_UID,
    ProcEvent,
    parse_proc_events,
)
from sshd_adopt._internal.services.adoption import Adoption
from sshd_adopt._internal.services.holds import Holds
from sshd_adopt._internal.services.sweeper import Sweeper
from sshd_adopt._internal.slurm.jobtable import JobTable
from sshd_adopt.errors import NoSuchProcess
from tests.unit.fakes import broker_state, slurm_facts

P = ParamSpec("P")
T = TypeVar("T")

LISTENER = 100  # root sshd listener
MONITOR = 200  # a connection's monitor ("sshd: alice [priv]")
CHILD = 300  # the monitor's post-authentication child ("sshd: alice@notty")
SHELL = 400  # what the child forks
STEPD = 500  # an extern slurmstepd
OTHER = 900  # an unrelated process
OTHER_CHILD = 901
STARTS = {LISTENER: 10.0, MONITOR: 20.0, CHILD: 30.0, SHELL: 40.0, STEPD: 50.0, OTHER: 90.0,
          OTHER_CHILD: 91.0}
ALICE = 2001

PROC_EVENT_NONE = 0x0  # the subscription's acknowledgement
PROC_EVENT_SID = 0x80
PROC_EVENT_COMM = 0x200


# --------------------------------------------------------------------------- fakes


class Recorder:
    """Every call on the fakes, in order, as (name, arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def record(self, name: str, *args: object) -> None:
        self.calls.append((name, args))

    def named(self, name: str) -> list[tuple[object, ...]]:
        return [args for called, args in self.calls if called == name]


class FakeTable:
    def __init__(self, log: Recorder) -> None:
        self.log = log

    def process_exited(self, pid: int) -> None:
        self.log.record("table.process_exited", pid)

    def has_pending(self) -> bool:
        return False

    def settle_pending(self) -> None:
        self.log.record("table.settle_pending")

    def reconcile(self) -> None:
        self.log.record("table.reconcile")

    def socket_appeared(self, name: str) -> None:
        self.log.record("table.socket_appeared", name)

    def socket_vanished(self, name: str) -> None:
        self.log.record("table.socket_vanished", name)


class FakeAdoption:
    def __init__(self, log: Recorder) -> None:
        self.log = log
        self.holds = Holds()  # the real one: pure bookkeeping

    def authenticated(self, monitor_pid: int, monitor_start: float, child_pid: int, *,
                      held: bool = False) -> None:
        self.log.record("adoption.authenticated", monitor_pid, monitor_start, child_pid)
        if held:
            self.log.record("adoption.held", child_pid)

    def monitor_gone(self, monitor_pid: int) -> None:
        self.log.record("adoption.monitor_gone", monitor_pid)

    def key_check(self, monitor_pid: int, monitor_start: float) -> None:
        self.log.record("adoption.key_check", monitor_pid, monitor_start)

    def doomed_ended(self, monitor_pid: int, why: str, pids: list[int]) -> None:
        self.log.record("adoption.doomed_ended", monitor_pid, why, pids)


class FakeSweeper:
    def __init__(self, log: Recorder) -> None:
        self.log = log
        self.listeners: frozenset[int] = frozenset({LISTENER})
        self.started: set[int] = set()  # listeners the last full pass did not see

    def listener_found(self, pid: int) -> bool:
        self.log.record("sweeper.listener_found", pid)
        if pid not in self.started:
            return False
        self.listeners = self.listeners | {pid}
        return True

    def connection_opened(self, monitor_pid: int) -> None:
        self.log.record("sweeper.connection_opened", monitor_pid)

    def forked(self, parent: int, child: int) -> None:
        self.log.record("sweeper.forked", parent, child)

    def executed(self, pid: int) -> None:
        self.log.record("sweeper.executed", pid)

    def exited(self, pid: int) -> None:
        self.log.record("sweeper.exited", pid)

    def wake_after(self, seconds: float) -> None:
        self.log.record("sweeper.wake_after", seconds)


class InlinePool(Executor):
    """Runs submitted work at once, on the caller's thread."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:
            future.set_exception(err)
        return future


class Node:
    """A watcher over fakes, and the record of what it told them."""

    def __init__(self, state: BrokerState | None = None) -> None:
        self.log = Recorder()
        self.exes: dict[int, str] = {}  # procfs.executable
        self.parents: dict[int, int] = {}  # procfs.parent_of
        self.state = state or broker_state()
        self.watcher = Watcher(
            lambda: self.state, table=cast(JobTable, FakeTable(self.log)),
            adoption=cast(Adoption, FakeAdoption(self.log)),
            sweeper=cast(Sweeper, FakeSweeper(self.log)), pool=InlinePool())

    def feed(self, *events: ProcEvent) -> None:
        for event in events:
            self.watcher.dispatch(event)

    def authenticated(self) -> list[tuple[object, ...]]:
        return self.log.named("adoption.authenticated")


@pytest.fixture
def alive(monkeypatch: pytest.MonkeyPatch) -> dict[int, float]:
    """The processes that exist, by pid, with their start times (``procfs.started_at``)."""
    table = dict(STARTS)

    def started_at(pid: int) -> float:
        if pid not in table:
            raise NoSuchProcess(f"no process {pid}")
        return table[pid]

    monkeypatch.setattr(procfs, "started_at", started_at)
    return table


@pytest.fixture
def node(alive: dict[int, float], monkeypatch: pytest.MonkeyPatch) -> Node:
    made = Node()

    def hold(pid: int) -> bool:  # never a real SIGSTOP to a made-up pid
        made.log.record("signals.hold", pid)
        return True

    def kill_connection(monitor: int, pids: list[int]) -> list[int]:  # nor a real SIGKILL
        made.log.record("signals.kill_connection", monitor, pids)
        return [monitor, *(pid for pid in pids if pid != monitor)]

    def parent_of(pid: int) -> int:
        if pid not in made.parents:
            raise NoSuchProcess(f"no process {pid}")
        return made.parents[pid]

    monkeypatch.setattr(procfs, "executable", made.exes.get)
    monkeypatch.setattr(procfs, "parent_of", parent_of)
    monkeypatch.setattr(signals, "hold", hold)
    monkeypatch.setattr(signals, "kill_connection", kill_connection)
    return made


def fork(parent: int, child: int) -> ProcEvent:
    return ProcEvent(PROC_EVENT_FORK, child, parent=parent)


def uid(pid: int, ruid: int, euid: int) -> ProcEvent:
    return ProcEvent(PROC_EVENT_UID, pid, ruid=ruid, euid=euid)


def exits(pid: int) -> ProcEvent:
    return ProcEvent(PROC_EVENT_EXIT, pid)


def execs(pid: int) -> ProcEvent:
    return ProcEvent(PROC_EVENT_EXEC, pid)


# --------------------------------------------------------------------------- dispatch


def test_a_listener_fork_opens_a_connection_for_the_monitor(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR))
    assert node.log.calls == [("sweeper.connection_opened", (MONITOR,))]


def test_the_monitors_child_taking_the_users_uid_is_authenticated_once(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)]
    assert node.log.named("sweeper.forked") == [(MONITOR, CHILD)]


def test_a_login_that_may_be_keyless_is_held_at_its_uid_change(node: Node) -> None:
    """The key check's answer says the user may come in without a key (hostbased): the
    child is stopped the moment it takes the user's uid, before anything is decided."""
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(MONITOR, LISTENER, keyless=True)
    node.feed(uid(MONITOR, 0, 0), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.log.named("signals.hold") == [(CHILD,)]
    assert node.log.named("adoption.held") == [(CHILD,)]


def test_a_login_whose_key_check_is_still_running_is_not_held(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, 0, ALICE), uid(MONITOR, 0, 0),
              fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.log.named("signals.hold") == []  # FakeAdoption never answers


PREAUTH, KEYS_COMMAND, OTHER_MONITOR = 905, 906, 907


def test_a_doomed_connection_is_killed_when_authentication_is_over(node: Node) -> None:
    """The key check refused a user who may come in without a key: when sshd's pre-auth
    child exits, the monitor and what it forked are killed, and so is any later child."""
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, PREAUTH), uid(MONITOR, 0, ALICE))
    holds = node.watcher._adoption.holds
    holds.checked(MONITOR, LISTENER, keyless=True)
    holds.doom(MONITOR, "user has no jobs on this node")
    node.feed(fork(MONITOR, KEYS_COMMAND))  # before authentication ends: left alone
    assert node.log.named("signals.kill_connection") == []
    node.feed(exits(KEYS_COMMAND))
    assert node.log.named("signals.kill_connection") == []
    node.feed(exits(PREAUTH))
    assert node.log.named("signals.kill_connection") == [(MONITOR, [MONITOR])]
    assert node.log.named("adoption.doomed_ended") == [
        (MONITOR, "user has no jobs on this node", [MONITOR])]
    node.feed(fork(MONITOR, CHILD))
    assert node.log.named("signals.kill_connection") == [(MONITOR, [MONITOR]),
                                                         (MONITOR, [CHILD])]


def test_a_monitor_whose_key_check_has_not_answered_waits_at_authentication(
        node: Node) -> None:
    """On a listener that admitted a keyless login before, authentication completing
    before the key check answered stops the monitor (not its pre-auth child)."""
    node.feed(fork(LISTENER, OTHER_MONITOR), uid(OTHER_MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(OTHER_MONITOR, LISTENER, keyless=True)
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, PREAUTH), uid(MONITOR, 0, ALICE),
              exits(PREAUTH))
    assert node.log.named("signals.hold") == [(MONITOR,)]
    assert node.log.named("signals.kill_connection") == []


def test_a_key_check_after_authentication_stops_the_monitor_until_answered(
        node: Node) -> None:
    """GSSAPI: the monitor takes the user's uid only after authentication (storing the
    credentials), before it forks the session child: it waits for the answer there."""
    node.feed(fork(LISTENER, OTHER_MONITOR), uid(OTHER_MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(OTHER_MONITOR, LISTENER, keyless=True)
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, PREAUTH), exits(PREAUTH))
    assert node.log.named("signals.hold") == []
    node.feed(uid(MONITOR, 0, ALICE))
    assert node.log.named("signals.hold") == [(MONITOR,)]


def test_a_refused_user_keyless_after_authentication_is_killed_at_the_key_check(
        node: Node) -> None:
    """GSSAPI again, and this user was refused on this listener a moment ago."""
    node.feed(fork(LISTENER, OTHER_MONITOR), uid(OTHER_MONITOR, 0, ALICE))
    holds = node.watcher._adoption.holds
    holds.checked(OTHER_MONITOR, LISTENER, keyless=True)
    holds.checking(OTHER_MONITOR, ALICE, LISTENER)
    holds.doom(OTHER_MONITOR, "no jobs", LISTENER)
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, PREAUTH), exits(PREAUTH),
              uid(MONITOR, 0, ALICE))
    assert node.log.named("signals.kill_connection") == [(MONITOR, [MONITOR])]
    assert node.log.named("signals.hold") == []


def test_a_connection_not_doomed_is_left_alone_when_authentication_is_over(
        node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, PREAUTH), uid(MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(MONITOR, LISTENER, keyless=True)
    node.feed(exits(PREAUTH), fork(MONITOR, CHILD))
    assert node.log.named("signals.kill_connection") == []


def test_the_pre_authentication_child_is_not_held(node: Node) -> None:
    """It takes the privilege-separation user's uid (not the user's the key check saw)."""
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(MONITOR, LISTENER, keyless=True)
    node.feed(uid(MONITOR, 0, 0), fork(MONITOR, CHILD), uid(CHILD, 100, 100))
    assert node.log.named("signals.hold") == []


def test_a_publickey_only_login_is_not_held(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, 0, ALICE))
    node.watcher._adoption.holds.checked(MONITOR, LISTENER, keyless=False)
    node.feed(uid(MONITOR, 0, 0), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.log.named("signals.hold") == [] and node.log.named("adoption.held") == []
    assert node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)]


@pytest.mark.parametrize(("ruid", "euid"), [(0, ALICE), (ALICE, ALICE)])
def test_a_uid_change_of_the_monitor_itself_is_not_authentication(
        node: Node, ruid: int, euid: int) -> None:
    """The monitor switches its effective uid to read the user's keys before authentication."""
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, ruid, euid), uid(MONITOR, 0, 0))
    assert node.authenticated() == []


def test_the_monitors_key_check_is_reported_and_nothing_else(node: Node) -> None:
    """Only the monitor's own switch to a user's effective uid (real uid root) is a key
    check (adoption warms the cgroup path for it); returning to root, or a child, is not."""
    node.feed(fork(LISTENER, MONITOR), uid(MONITOR, 0, ALICE), uid(MONITOR, 0, 0),
              fork(MONITOR, CHILD), uid(CHILD, 0, ALICE))
    assert node.log.named("adoption.key_check") == [(MONITOR, STARTS[MONITOR])]


@pytest.mark.parametrize(("ruid", "euid"), [(0, ALICE), (ALICE, 0), (0, 0)])
def test_a_child_not_wholly_the_user_is_not_authenticated_yet(
        node: Node, ruid: int, euid: int) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), uid(CHILD, ruid, euid))
    assert node.authenticated() == []
    node.feed(uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)]


def test_without_early_adoption_nobody_is_authenticated_early(alive: dict[int, float]) -> None:
    node = Node(broker_state(Config(path="/x.toml", adoption=AdoptionSettings(early=False))))
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == []
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,)]


def test_a_fork_of_an_untracked_process_follows_nothing(node: Node) -> None:
    node.feed(fork(OTHER, OTHER_CHILD), uid(OTHER_CHILD, ALICE, ALICE))
    assert node.authenticated() == []
    assert node.log.named("sweeper.connection_opened") == []
    # the sweeper hears of every fork and keeps only those of connections it follows
    assert node.log.calls == [("sweeper.forked", (OTHER, OTHER_CHILD))]


def test_the_childs_own_children_are_not_the_authenticated_child(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), fork(CHILD, SHELL),
              uid(SHELL, ALICE, ALICE))
    assert node.authenticated() == []


def test_a_monitor_that_vanished_before_it_was_dated_is_not_followed(
        node: Node, alive: dict[int, float]) -> None:
    del alive[MONITOR]
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,)]
    assert node.authenticated() == []


def test_followed_monitors_are_bounded(node: Node, monkeypatch: pytest.MonkeyPatch,
                                       alive: dict[int, float]) -> None:
    monkeypatch.setattr(watcher_module, "MAX_FOLLOWED", 1)
    alive[MONITOR + 1] = 21.0
    alive[CHILD + 1] = 31.0
    node.feed(fork(LISTENER, MONITOR), fork(LISTENER, MONITOR + 1),
              fork(MONITOR + 1, CHILD + 1), uid(CHILD + 1, ALICE, ALICE))
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,), (MONITOR + 1,)]
    assert node.authenticated() == []


def test_forks_outside_connections_do_not_use_up_what_is_followed(
        node: Node, monkeypatch: pytest.MonkeyPatch, alive: dict[int, float]) -> None:
    monkeypatch.setattr(watcher_module, "MAX_FOLLOWED", 2)
    for child in range(1000, 1010):
        node.feed(fork(OTHER, child))
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)]


def test_an_exiting_stepd_is_told_to_the_job_table(node: Node) -> None:
    node.feed(exits(STEPD))
    assert node.log.named("table.process_exited") == [(STEPD,)]
    assert node.log.named("adoption.monitor_gone") == []


def test_an_exiting_monitor_is_gone_for_adoption_once(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), exits(MONITOR), exits(MONITOR))
    assert node.log.named("adoption.monitor_gone") == [(MONITOR,)]
    assert node.log.named("sweeper.exited") == [(MONITOR,), (MONITOR,)]
    # its child, orphaned, is no connection's authenticated child any more
    node.feed(uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == []


def test_an_exited_child_is_forgotten(node: Node) -> None:
    node.feed(fork(LISTENER, MONITOR), fork(MONITOR, CHILD), exits(CHILD))
    assert node.log.named("adoption.monitor_gone") == []
    node.feed(fork(OTHER, CHILD), uid(CHILD, ALICE, ALICE))  # the pid, reused elsewhere
    assert node.authenticated() == []


def test_exec_goes_to_the_sweeper_only(node: Node) -> None:
    node.feed(execs(OTHER))
    assert node.log.calls == [("sweeper.executed", (OTHER,))]


NEW_LISTENER = 150  # sshd restarted after the sweeper's last full pass


def test_a_connection_of_a_listener_started_since_the_last_scan_is_followed_from_its_exec(
        node: Node) -> None:
    """Its fork went unseen (the listener was unknown); its exec of sshd-session makes
    the listener known and the connection followed: its login is then adopted early."""
    sweeper = cast(FakeSweeper, node.watcher._sweeper)
    sweeper.started.add(NEW_LISTENER)
    node.feed(fork(NEW_LISTENER, MONITOR))
    assert node.log.named("sweeper.connection_opened") == []
    node.exes[MONITOR] = "/usr/lib/openssh/sshd-session"
    node.parents[MONITOR] = NEW_LISTENER
    node.feed(execs(MONITOR))
    assert node.log.named("sweeper.listener_found") == [(NEW_LISTENER,)]
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,)]
    node.feed(fork(MONITOR, CHILD), uid(CHILD, ALICE, ALICE))
    assert node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)]
    node.feed(fork(NEW_LISTENER, OTHER))  # its next connection: from the fork, as usual
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,), (OTHER,)]
    assert node.log.named("sweeper.listener_found") == [(NEW_LISTENER,)]


@pytest.mark.parametrize("exe, parent", [
    ("/usr/bin/bash", NEW_LISTENER),  # not sshd
    ("/usr/sbin/sshd", OTHER),  # sshd started by something that is no listener
    (None, NEW_LISTENER),  # gone before its exe could be read
])
def test_other_execs_follow_nothing(node: Node, exe: str | None, parent: int) -> None:
    cast(FakeSweeper, node.watcher._sweeper).started.add(NEW_LISTENER)
    if exe is not None:
        node.exes[MONITOR] = exe
    node.parents[MONITOR] = parent
    node.feed(execs(MONITOR))
    assert node.log.named("sweeper.connection_opened") == []


def test_the_brokers_own_sshd_runs_are_not_asked_about(node: Node) -> None:
    """``sshd -T`` (the key check's question) is an exec of sshd under the broker."""
    node.exes[MONITOR] = "/usr/sbin/sshd"
    node.parents[MONITOR] = os.getpid()
    node.feed(execs(MONITOR))
    assert node.log.named("sweeper.listener_found") == []
    assert node.log.named("sweeper.connection_opened") == []


def test_a_followed_connections_exec_asks_nothing(node: Node) -> None:
    node.exes[MONITOR] = "/usr/lib/openssh/sshd-session"
    node.parents[MONITOR] = LISTENER
    node.feed(fork(LISTENER, MONITOR), execs(MONITOR))
    assert node.log.named("sweeper.listener_found") == []
    assert node.log.named("sweeper.connection_opened") == [(MONITOR,)]


def test_unrelated_events_reach_nothing_but_the_owners_own_filters(node: Node) -> None:
    node.feed(uid(OTHER, ALICE, ALICE), uid(OTHER, 0, ALICE),
              ProcEvent(PROC_EVENT_SID, OTHER), ProcEvent(PROC_EVENT_COMM, OTHER),
              ProcEvent(PROC_EVENT_NONE, 0))
    assert node.log.calls == []
    node.feed(exits(OTHER))
    assert node.log.calls == [("table.process_exited", (OTHER,)), ("sweeper.exited", (OTHER,))]


# --------------------------------------------------------------------------- the parser


_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # id.idx, id.val, seq, ack, len, flags
_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_NLMSG_DONE = 3
#: sizeof(event_data) in struct proc_event: its largest members are six u32 (exit on
#: current kernels) and comm's pid, tgid and char[16].
_EVENT_DATA = 24


def message(what: int, data: bytes, *, stamp: int = 0, pad: bool = True, seq: int = 0) -> bytes:
    """One netlink message carrying one proc_event, laid out as the kernel sends it."""
    event = _HEAD.pack(what, 1, stamp) + (data.ljust(_EVENT_DATA, b"\0") if pad else data)
    cn = _CN_MSG.pack(1, 1, seq, 0, len(event), 0)
    return _NLMSG.pack(_NLMSG.size + len(cn) + len(event), _NLMSG_DONE, 0, seq, 0) + cn + event


def fork_msg(parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int, *,
             stamp: int = 0) -> bytes:
    return message(PROC_EVENT_FORK, struct.pack("=IIII", parent_pid, parent_tgid, child_pid,
                                                 child_tgid), stamp=stamp)


def exec_msg(pid: int, tgid: int, *, stamp: int = 0) -> bytes:
    return message(PROC_EVENT_EXEC, struct.pack("=II", pid, tgid), stamp=stamp)


def exit_msg(pid: int, tgid: int, *, stamp: int = 0) -> bytes:
    # exit_code, exit_signal, parent_pid, parent_tgid follow
    return message(PROC_EVENT_EXIT, struct.pack("=IIIIII", pid, tgid, 0, 17, 1, 1), stamp=stamp)


def uid_msg(pid: int, tgid: int, ruid: int, euid: int, *, stamp: int = 0) -> bytes:
    return message(PROC_EVENT_UID, struct.pack("=IIII", pid, tgid, ruid, euid), stamp=stamp)


def test_the_message_layout_is_the_kernels() -> None:
    # NLMSG_HDRLEN 16 + sizeof(struct cn_msg) 20 + sizeof(struct proc_event) 40
    assert len(exec_msg(1, 1)) == 76


def test_fork_of_a_process() -> None:
    assert parse_proc_events(fork_msg(100, 100, 200, 200, stamp=123)) == [
        ProcEvent(PROC_EVENT_FORK, 200, parent=100, timestamp_ns=123)]


def test_fork_from_a_thread_names_the_process_as_parent() -> None:
    assert parse_proc_events(fork_msg(101, 100, 200, 200)) == [
        ProcEvent(PROC_EVENT_FORK, 200, parent=100)]


@pytest.mark.parametrize("data", [fork_msg(100, 100, 201, 200), exec_msg(201, 200),
                                  exit_msg(201, 200), uid_msg(201, 200, ALICE, ALICE)],
                         ids=["fork", "exec", "exit", "uid"])
def test_threads_are_skipped(data: bytes) -> None:
    assert parse_proc_events(data) == []


def test_exec_exit_and_uid_of_a_process() -> None:
    assert parse_proc_events(exec_msg(200, 200, stamp=5)) == [
        ProcEvent(PROC_EVENT_EXEC, 200, timestamp_ns=5)]
    assert parse_proc_events(exit_msg(200, 200, stamp=6)) == [
        ProcEvent(PROC_EVENT_EXIT, 200, timestamp_ns=6)]
    assert parse_proc_events(uid_msg(300, 300, 0, ALICE, stamp=7)) == [
        ProcEvent(PROC_EVENT_UID, 300, ruid=0, euid=ALICE, timestamp_ns=7)]


def test_two_messages_in_one_datagram() -> None:
    data = fork_msg(200, 200, 300, 300) + uid_msg(300, 300, ALICE, ALICE)
    assert parse_proc_events(data) == [ProcEvent(PROC_EVENT_FORK, 300, parent=200),
                                       ProcEvent(PROC_EVENT_UID, 300, ruid=ALICE, euid=ALICE)]


def test_threads_and_unknown_events_between_others_do_not_stop_the_rest() -> None:
    data = (message(PROC_EVENT_NONE, b"") + fork_msg(100, 100, 201, 200)
            + message(PROC_EVENT_SID, struct.pack("=II", 5, 5)) + exit_msg(200, 200))
    assert parse_proc_events(data) == [ProcEvent(PROC_EVENT_EXIT, 200)]


def test_messages_are_aligned_to_four_bytes() -> None:
    odd = message(PROC_EVENT_EXEC, struct.pack("=II", 200, 200) + b"xy", pad=False)
    assert len(odd) % 4 == 2
    data = odd + b"\0\0" + exit_msg(300, 300)
    assert parse_proc_events(data) == [ProcEvent(PROC_EVENT_EXEC, 200),
                                       ProcEvent(PROC_EVENT_EXIT, 300)]


def test_a_cut_datagram_keeps_the_whole_messages_only() -> None:
    first, second = exec_msg(200, 200), exit_msg(300, 300)
    assert parse_proc_events(first + second[:-1]) == [ProcEvent(PROC_EVENT_EXEC, 200)]
    assert parse_proc_events(first[:10]) == []
    assert parse_proc_events(b"") == []


def test_an_event_too_short_for_its_kind_is_skipped() -> None:
    short = message(PROC_EVENT_FORK, struct.pack("=II", 100, 100), pad=False)
    assert parse_proc_events(short + exec_msg(200, 200)) == [ProcEvent(PROC_EVENT_EXEC, 200)]


@pytest.mark.parametrize("length", [0, 1, 15])
def test_a_length_below_the_header_ends_the_datagram(length: int) -> None:
    bogus = _NLMSG.pack(length, _NLMSG_DONE, 0, 0, 0)
    assert parse_proc_events(bogus + exec_msg(200, 200)) == []


def test_a_length_past_the_datagram_ends_it() -> None:
    data = bytearray(exec_msg(200, 200))
    struct.pack_into("=I", data, 0, len(data) + 4)
    assert parse_proc_events(bytes(data)) == []


_u32 = st.integers(0, 2**32 - 1)
_small = st.integers(1, 5)  # so that pid == tgid (a process) comes up often
_record = st.tuples(
    st.one_of(st.sampled_from([PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_UID,
                               PROC_EVENT_EXIT, PROC_EVENT_NONE, PROC_EVENT_SID]), _u32),
    _small, _small, st.one_of(_small, _u32), st.one_of(_small, _u32), st.integers(0, 2**64 - 1))
Record = tuple[int, int, int, int, int, int]


def _expected(record: Record) -> ProcEvent | None:
    """What cn_proc.h says the record means, for a process (threads are left out)."""
    what, a, b, c, d, stamp = record
    if what == PROC_EVENT_FORK:  # parent pid, parent tgid, child pid, child tgid
        return ProcEvent(what, d, parent=b, timestamp_ns=stamp) if c == d else None
    if what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT):  # pid, tgid
        return ProcEvent(what, b, timestamp_ns=stamp) if a == b else None
    if what == PROC_EVENT_UID:  # pid, tgid, ruid, euid
        return ProcEvent(what, b, ruid=c, euid=d, timestamp_ns=stamp) if a == b else None
    return None


@settings(max_examples=200, deadline=500)
@given(st.lists(_record, max_size=8), st.integers(0, 1000), st.binary(max_size=64))
def test_well_formed_datagrams_decode_exactly_and_damage_only_loses_the_tail(
        records: list[Record], cut: int, junk: bytes) -> None:
    data = b"".join(message(what, struct.pack("=IIII", a, b, c, d), stamp=stamp)
                    for what, a, b, c, d, stamp in records)
    expected = [event for event in map(_expected, records) if event is not None]
    assert parse_proc_events(data) == expected
    # cut anywhere: what is decoded is what the whole messages before the cut said
    cut_events = parse_proc_events(data[:cut])
    assert cut_events == expected[:len(cut_events)]
    whole = cut // len(message(0, b""))
    assert len(cut_events) == len([r for r in records[:whole] if _expected(r) is not None])
    # anything after the last message cannot change what came before it
    assert parse_proc_events(data + junk)[:len(expected)] == expected


# --------------------------------------------------------------------------- the loop


class FakeConnector:
    """The proc connector socket: datagrams from a socketpair; b"ENOBUFS" fails like lost
    events do."""

    def __init__(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)

    def fileno(self) -> int:
        return self.ours.fileno()

    def recv(self, size: int) -> bytes:
        data = self.ours.recv(size)
        if data == b"ENOBUFS":
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return data

    def close(self) -> None:
        self.ours.close()


@pytest.fixture
def spool() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sa-watch-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def eventually(check: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)


def test_the_loop_follows_the_connector_and_the_spool_dir(
        alive: dict[int, float], spool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    connector = FakeConnector()
    monkeypatch.setattr(watcher_module, "open_proc_connector", lambda: connector)
    node = Node(broker_state(slurm=slurm_facts(spool_dir=spool)))
    log = node.log
    alive[CHILD + 1] = 31.0
    node.watcher.start(proc_events=True)
    try:
        assert node.watcher.connector
        eventually(lambda: log.named("table.reconcile") == [()], "the first reconcile")

        connector.kernel.send(fork_msg(LISTENER, LISTENER, MONITOR, MONITOR))
        eventually(lambda: bool(log.named("sweeper.connection_opened")), "connection opened")
        connector.kernel.send(fork_msg(MONITOR, MONITOR, CHILD, CHILD)
                              + uid_msg(CHILD, CHILD, ALICE, ALICE))
        eventually(lambda: node.authenticated() == [(MONITOR, STARTS[MONITOR], CHILD)],
                   "authenticated")

        # lost events: whatever was followed may have ended unseen; look at everything
        connector.kernel.send(b"ENOBUFS")
        eventually(lambda: log.named("sweeper.wake_after") == [(0,)], "a scan now")
        assert len(log.named("table.reconcile")) == 2
        connector.kernel.send(fork_msg(MONITOR, MONITOR, CHILD + 1, CHILD + 1)
                              + uid_msg(CHILD + 1, CHILD + 1, ALICE, ALICE)
                              + exec_msg(CHILD + 1, CHILD + 1))
        eventually(lambda: log.named("sweeper.executed") == [(CHILD + 1,)], "the exec")
        assert len(node.authenticated()) == 1  # the monitor is no longer followed

        name = "n1_5.4294967292"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(os.path.join(spool, name))
        eventually(lambda: log.named("table.socket_appeared") == [(name,)], "socket appeared")
        os.unlink(os.path.join(spool, name))
        eventually(lambda: log.named("table.socket_vanished") == [(name,)], "socket vanished")
    finally:
        node.watcher.stop()
        connector.kernel.close()
    assert not node.watcher.connector
