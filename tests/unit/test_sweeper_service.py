"""The sweeper's judgement of one connection: left, adopted, or ended, and never too soon.

/proc, cgroups and signals are replaced by a table of one connection (listener 10,
monitor 20, session process 30, the user's shell 40); the node's jobs and stepds by the
fakes of tests/unit/fakes.py; sshd's ``-T`` answer and the adoption service's
knowledge by small stand-ins. The clock is the test's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import psutil
import pytest

from sshd_adopt._internal.config import Config, Exemptions
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import LocalJob, Message
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.options import FallThrough, NoJobsAction, Options
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Outcome
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.node import cgroups, procfs, signals
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.node.sshdconfig import ManagedQuery, SshdConfigError
from sshd_adopt._internal.services import sweeper as sweeper_module
from sshd_adopt._internal.services.sweeper import Sweeper
from sshd_adopt.errors import NoSuchProcess
from tests.unit.fakes import (
    ALICE,
    BOB,
    ROOT,
    FakeAccounts,
    FakeJobs,
    FakeSource,
    FakeSteps,
    broker_state,
)

NETNS = "net:[4026531840]"
SSHD = "/usr/sbin/sshd"
CONN = Connection(ipaddress.IPv4Address("10.0.0.11"), 22,
                  ipaddress.IPv4Address("10.0.0.12"), 40000)
LISTENER, MONITOR, SESSION, SHELL = 10, 20, 30, 40
LISTENER_TITLE = "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"
MONITOR_START = 20.0
GRACE = 0.5  # sweeper.grace's default
JOB = (LocalJob(7, 1000.0),)


def proc(pid: int, ppid: int, uid: int, title: str, start: float, exe: str = SSHD) -> ProcInfo:
    return ProcInfo(pid=pid, ppid=ppid, real_uid=uid, effective_uid=uid, real_gid=uid,
                    name=exe.rsplit("/", 1)[-1], exe=exe, cmdline=tuple(title.split(" ")),
                    start_time=start)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class FakeManaged(ManagedQuery):
    """sshd -T's answer for every connection (or an error); records what was asked."""

    def __init__(self, answer: bool = True, error: SshdConfigError | None = None) -> None:
        super().__init__()
        self.answer = answer
        self.error = error
        self.asked: list[tuple[int, str, Connection | None]] = []

    def managed(self, listener: ProcInfo, user: str, connection: Connection | None) -> bool:
        self.asked.append((listener.pid, user, connection))
        if self.error is not None:
            raise self.error
        return self.answer


@dataclass
class FakeDecisions:
    """What the adoption service knows: connections being decided, and latest outcomes."""

    busy: set[tuple[int, float]] = field(default_factory=set)
    latest: dict[tuple[int, float], tuple[Outcome, float]] = field(default_factory=dict)

    def in_flight(self, monitor_pid: int, monitor_start: float) -> bool:
        return (monitor_pid, monitor_start) in self.busy

    def decision(self, monitor_pid: int, monitor_start: float) -> tuple[Outcome, float] | None:
        return self.latest.get((monitor_pid, monitor_start))


@dataclass
class FakeProcess:
    """What psutil.process_iter yields, as far as the scan reads it."""

    pid: int
    info: dict[str, object]


KEY = (MONITOR, MONITOR_START)


@dataclass
class World:
    """One Sweeper over a one-connection node, and what it did there."""

    sweeper: Sweeper
    state: BrokerState
    clock: Clock
    jobs: FakeJobs
    steps: FakeSteps
    managed: FakeManaged
    decisions: FakeDecisions
    user: str
    table: dict[int, ProcInfo]
    in_job: dict[int, int | None] = field(default_factory=dict)
    terminated: list[tuple[list[int], float]] = field(default_factory=list)
    full_passes: int = 0

    @property
    def tree(self) -> procfs.ProcessTree:
        return procfs.ProcessTree.of((p.pid, p.ppid, p.start_time) for p in self.table.values())

    def judge(self) -> None:
        monitor = sweeper_module._Monitor(self.table[MONITOR], self.user)
        self.sweeper._judge(self.state, monitor, self.tree,
                            frozenset(self.state.config.sshd.executables))

    def opened(self, ago: float) -> None:
        """The proc connector saw the connection open ``ago`` seconds before now."""
        self.clock.now -= ago
        self.sweeper.connection_opened(MONITOR)
        self.clock.now += ago

    def forget_actions(self) -> None:
        """As if nothing had been adopted yet: the next scan must find the work again."""
        self.steps.joined.clear()
        self.in_job.clear()

    def untouched(self) -> bool:
        return not self.steps.joined and not self.terminated and not self.jobs.asked


def make(monkeypatch: pytest.MonkeyPatch, account: Account = ALICE, *,
         jobs: Sequence[LocalJob] = JOB, config: Config | None = None,
         managed: FakeManaged | None = None, with_session: bool = True) -> World:
    state = broker_state(config)
    clock = Clock()
    fake_jobs = FakeJobs({account.uid: tuple(jobs)} if jobs else {})
    steps = FakeSteps(owners={job.job_id: account.uid for job in jobs})
    managed = managed if managed is not None else FakeManaged()
    decisions = FakeDecisions()
    core = LoginCore(lambda: state, jobs=fake_jobs, source=FakeSource(), steps=steps,
                     accounts=FakeAccounts(ALICE, BOB, ROOT))
    service = Sweeper(lambda: state, core, steps=steps, managed=managed, netns=NETNS,
                      decisions=decisions, clock=clock)
    user = account.name
    table = {
        1: proc(1, 0, 0, "init", 1.0, exe="/sbin/init"),
        LISTENER: proc(LISTENER, 1, 0, LISTENER_TITLE, 10.0),
        MONITOR: proc(MONITOR, LISTENER, 0, f"sshd: {user} [priv]", MONITOR_START),
    }
    if with_session:
        table[SESSION] = proc(SESSION, MONITOR, account.uid, f"sshd: {user}@notty", 30.0)
        table[SHELL] = proc(SHELL, SESSION, account.uid, "-bash", 40.0, exe="/bin/bash")
    world = World(service, state, clock, fake_jobs, steps, managed, decisions, user, table)

    def proc_info(pid: int) -> ProcInfo:
        if pid not in world.table:
            raise NoSuchProcess(f"no process {pid}")
        return world.table[pid]

    def started_at(pid: int) -> float:
        return proc_info(pid).start_time

    def still_running(pid: int, start: float) -> bool:
        return pid in world.table and world.table[pid].start_time == start

    def descendants(pid: int) -> list[int]:
        proc_info(pid)
        return world.tree.descendants(pid)

    def extern_job_of(pid: int, nodename: str, named: object = None) -> int | None:
        assert nodename == "n1"
        return world.in_job.get(pid)

    def terminate(pids: Sequence[int], *, kill_after: float, why: str) -> list[int]:
        world.terminated.append((list(pids), kill_after))
        return list(pids)

    def children_of(pid: int) -> list[int]:
        proc_info(pid)
        return list(world.tree.children(pid))

    def process_iter(attrs: list[str]) -> Iterator[FakeProcess]:
        world.full_passes += 1
        for info in list(world.table.values()):
            yield FakeProcess(info.pid, {"name": info.name, "ppid": info.ppid,
                                         "create_time": info.start_time})

    monkeypatch.setattr(procfs, "proc_info", proc_info)
    monkeypatch.setattr(procfs, "started_at", started_at)
    monkeypatch.setattr(procfs, "still_running", still_running)
    monkeypatch.setattr(procfs, "descendants", descendants)
    monkeypatch.setattr(procfs, "children_of", children_of)
    monkeypatch.setattr(procfs, "connection_of", lambda pid: CONN)
    monkeypatch.setattr(procfs, "netns_of", lambda pid: NETNS)
    monkeypatch.setattr(cgroups, "extern_job_of", extern_job_of)
    monkeypatch.setattr(signals, "terminate", terminate)
    monkeypatch.setattr(psutil, "process_iter", process_iter)
    return world


def denied(user: str = "alice") -> Denied:
    return Denied(Message.NO_JOBS, "user has no jobs on this node", user)


# --------------------------------------------------------------------------- not yet


def test_a_connection_younger_than_grace_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(GRACE - 0.1)
    world.judge()
    assert world.untouched() and world.managed.asked == []
    world.clock.now += 0.2
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_a_connection_first_seen_by_a_scan_waits_for_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.judge()  # first seen now: age 0
    assert world.untouched()
    world.clock.now += GRACE + 0.01
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_a_connection_being_decided_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.decisions.busy.add(KEY)
    world.judge()
    assert world.untouched() and world.managed.asked == []
    world.decisions.busy.clear()
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_one_allowed_by_policy_is_settled_and_never_judged_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.decisions.latest[KEY] = (Allowed("action_unknown=allow"), world.clock.now - 5)
    assert world.sweeper._not_yet(world.state, world.table[MONITOR], 10.0)
    world.sweeper.scan()
    assert world.untouched()
    world.decisions.latest.clear()  # even when the service forgot it
    world.clock.now += 60
    world.sweeper.scan()
    assert world.untouched() and world.managed.asked == []


def test_one_refused_a_moment_ago_is_left_then_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=())
    world.opened(10)
    world.decisions.latest[KEY] = (denied(), world.clock.now - GRACE / 2)
    world.judge()
    assert world.terminated == [] and world.managed.asked == []
    world.clock.now += GRACE
    world.judge()
    assert world.terminated == [([MONITOR, SESSION, SHELL], 2.0)]
    assert world.steps.joined == []
    world.sweeper.scan()  # being ended: not signalled again
    assert len(world.terminated) == 1


def test_an_old_adoption_is_judged_again(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.decisions.latest[KEY] = (Adopted(7, "user has only one job 7"), world.clock.now - 1)
    assert not world.sweeper._not_yet(world.state, world.table[MONITOR], 10.0)
    world.in_job = {MONITOR: 7, SESSION: 7}
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (SHELL,))]


# --------------------------------------------------------------------------- judged


def test_a_managed_connection_in_no_job_is_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.judge()
    assert world.managed.asked == [(LISTENER, "alice", CONN)]
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]
    assert world.terminated == []


def test_processes_outside_the_monitors_job_join_it(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=(LocalJob(7, 1000.0), LocalJob(8, 2000.0)))
    world.in_job = {MONITOR: 7, SESSION: 7, SHELL: 8}
    world.opened(10)
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (SHELL,))]
    assert world.jobs.asked == [] and world.terminated == []


def test_a_connection_wholly_in_its_job_is_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.in_job = {MONITOR: 7, SESSION: 7, SHELL: 7}
    world.opened(10)
    world.judge()
    assert world.untouched()


def test_a_connection_in_order_is_not_read_again_while_it_lives(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """64 adopted connections must not cost every scan of a fan-out 64 /proc and cgroup
    reads: what they fork is born in the job."""
    world = make(monkeypatch)
    world.in_job = {MONITOR: 7, SESSION: 7, SHELL: 7}
    world.opened(10)
    world.sweeper.scan()
    reads: list[int] = []

    def extern_job_of(pid: int, nodename: str, named: object = None) -> int:
        reads.append(pid)
        return 7

    monkeypatch.setattr(cgroups, "extern_job_of", extern_job_of)
    world.sweeper.scan()
    world.sweeper.scan(full=False)
    assert reads == [] and world.untouched()


def test_a_stray_that_left_its_connection_is_still_part_of_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.sweeper.forked(MONITOR, SESSION)
    world.sweeper.forked(SESSION, SHELL)
    world.table[50] = proc(50, SHELL, ALICE.uid, "sleep 1000", 50.0, exe="/bin/sleep")
    world.sweeper.forked(SHELL, 50)
    world.table[50] = proc(50, 1, ALICE.uid, "sleep 1000", 50.0, exe="/bin/sleep")  # setsid -f
    world.in_job = {MONITOR: 7, SESSION: 7, SHELL: 7}
    world.judge()
    assert world.steps.joined == [(7, ALICE.uid, (50,))]


def test_a_jobless_connection_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=())
    world.opened(10)
    world.judge()
    assert world.terminated == [([MONITOR, SESSION, SHELL], 2.0)]
    assert world.steps.joined == []


def test_a_connection_the_policy_allows_unadopted_is_decided_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    options = Options(action_no_jobs=NoJobsAction.IGNORE, fallthrough=FallThrough.ALLOW)
    world = make(monkeypatch, jobs=(),
                 config=Config(path="/etc/sshd-adopt/sshd-adopt.toml", options=options))
    world.opened(10)
    world.sweeper.scan()
    assert world.jobs.asked == [ALICE.uid]
    assert world.terminated == [] and world.steps.joined == []
    world.clock.now += 60
    world.sweeper.scan()
    assert world.jobs.asked == [ALICE.uid]


@pytest.mark.parametrize("jobs", [JOB, ()])
def test_an_unmanaged_connection_is_never_touched(monkeypatch: pytest.MonkeyPatch,
                                                  jobs: tuple[LocalJob, ...]) -> None:
    world = make(monkeypatch, jobs=jobs, managed=FakeManaged(answer=False))
    world.opened(10)
    world.sweeper.scan()
    assert world.managed.asked == [(LISTENER, "alice", CONN)]
    assert world.untouched()
    world.clock.now += 60
    world.sweeper.scan()
    assert world.untouched()
    assert len(world.managed.asked) == 1  # settled: sshd is not asked again


def test_when_sshd_cannot_say_the_connection_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=(), managed=FakeManaged(error=SshdConfigError("no -T")))
    world.opened(10)
    world.judge()
    world.judge()
    assert world.untouched()
    assert len(world.managed.asked) == 2  # asked again: nothing was settled


@pytest.mark.parametrize("account", [ROOT, BOB])
def test_root_and_exempt_users_are_never_touched(monkeypatch: pytest.MonkeyPatch,
                                                 account: Account) -> None:
    config = Config(path="/etc/sshd-adopt/sshd-adopt.toml",
                    exempt=Exemptions(users=frozenset({"root", "bob"})))
    world = make(monkeypatch, account, jobs=(), config=config)
    world.opened(10)
    world.judge()
    world.sweeper.scan()
    assert world.untouched() and world.managed.asked == []


def test_a_connection_still_authenticating_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=(), with_session=False)
    world.opened(10)
    world.judge()
    assert world.untouched() and world.managed.asked == []


def test_scan_finds_listeners_and_judges_monitors(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.sweeper.scan()
    assert world.sweeper.listeners == frozenset({LISTENER})
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_between_full_passes_a_scan_reads_only_the_listeners_children(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.sweeper.scan(full=True)
    assert world.full_passes == 1
    world.forget_actions()
    world.sweeper.scan(full=False)
    assert world.full_passes == 1  # no pass over every process
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_a_listener_that_ended_brings_the_full_pass_forward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.opened(10)
    world.sweeper.scan(full=True)
    # sshd restarted: a new listener (new pid), the connection now its child.
    del world.table[LISTENER]
    world.table[11] = proc(11, 1, 0, LISTENER_TITLE, 50.0)
    world.table[MONITOR] = proc(MONITOR, 11, 0, f"sshd: {world.user} [priv]", MONITOR_START)
    world.forget_actions()
    world.sweeper.scan(full=False)
    assert world.full_passes == 2
    assert world.sweeper.listeners == frozenset({11})
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, SESSION, SHELL))]


def test_a_listener_started_beside_the_known_ones_is_known_once_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher saw a connection of pid 11 exec sshd: 11 is a new listener; the next
    listener-only pass reads its children too, with no full pass."""
    world = make(monkeypatch)
    world.sweeper.scan(full=True)
    world.table[11] = proc(11, 1, 0, LISTENER_TITLE, 50.0)
    assert world.sweeper.listener_found(11)
    assert world.sweeper.listeners == frozenset({LISTENER, 11})
    world.table[12] = proc(12, 11, 0, f"sshd: {world.user} [priv]", 60.0)
    world.sweeper.scan(full=False)
    assert world.full_passes == 1
    assert 12 in world.sweeper._monitors


@pytest.mark.parametrize("title, uid, netns", [
    ("sshd: alice [priv]", 0, NETNS),  # a monitor, not a listener
    (LISTENER_TITLE, 1000, NETNS),  # not root
    (LISTENER_TITLE, 0, "net:[1]"),  # another network namespace's sshd
])
def test_only_a_root_listener_of_this_namespace_is_found(
        monkeypatch: pytest.MonkeyPatch, title: str, uid: int, netns: str) -> None:
    world = make(monkeypatch)
    world.sweeper.scan(full=True)
    world.table[11] = proc(11, 1, uid, title, 50.0)
    monkeypatch.setattr(procfs, "netns_of", lambda pid: netns if pid == 11 else NETNS)
    assert not world.sweeper.listener_found(11)
    assert not world.sweeper.listener_found(13)  # no such process
    assert world.sweeper.listeners == frozenset({LISTENER})


def test_a_pid_reused_by_another_process_is_not_taken_for_the_listener(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    world.sweeper.scan(full=True)
    world.table[LISTENER] = proc(LISTENER, 1, 0, LISTENER_TITLE, 99.0)  # same pid, later start
    world.sweeper.scan(full=False)
    assert world.full_passes == 2


def test_the_thread_passes_over_every_process_once_per_full_scan_every(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch)
    scans = 0
    real_scan = world.sweeper.scan

    def counted(*, full: bool) -> None:
        nonlocal scans
        scans += 1
        if scans == 40:
            world.sweeper._stop.set()
        real_scan(full=full)

    def wait(timeout: float | None = None) -> bool:
        world.clock.now += timeout or 0
        return False

    monkeypatch.setattr(world.sweeper, "scan", counted)
    monkeypatch.setattr(world.sweeper._wake, "wait", wait)
    assert world.state.config.sweeper.interval == 2.0
    assert sweeper_module.FULL_SCAN_EVERY == 30.0
    world.sweeper._run()
    # 40 scans 2 s apart span 78 s: full passes at 0, 30 and 60 s, lighter ones between.
    assert (scans, world.full_passes) == (40, 3)


def test_a_monitor_seen_before_is_not_read_again_but_a_new_one_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between full passes a known monitor costs one start-time read: its title (the user,
    fixed once named), ids and parent do not change; a reused pid is read afresh."""
    world = make(monkeypatch)
    world.opened(10)
    world.sweeper.scan(full=True)
    read: list[int] = []
    proc_info = procfs.proc_info

    def counting(pid: int) -> ProcInfo:
        read.append(pid)
        return proc_info(pid)

    monkeypatch.setattr(procfs, "proc_info", counting)
    world.sweeper.scan(full=False)
    assert MONITOR not in read
    world.table[MONITOR] = proc(MONITOR, LISTENER, 0, "sshd: bob [priv]", MONITOR_START + 1)
    world.sweeper.scan(full=False)
    assert MONITOR in read
    assert world.sweeper._monitors[MONITOR].user == "bob"
