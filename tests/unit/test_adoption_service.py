"""Adoption: early adoption at authentication, and the ForceCommand wrapper's request.

No process is touched: the session checks, /proc, cgroups, OOM scores and signals that
adoption.py reaches are replaced by a small table of one connection (listener 10,
monitor 20, post-authentication child 30, the wrapper 40), and the node's jobs, the
callerid RPC and the stepds by the fakes of tests/unit/fakes.py.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from sshd_adopt._internal.config import Config, Exemptions
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import CallerIdAnswer, CallerIdOutcome, LocalJob, Message
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Failed, Outcome
from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.node import cgroups, procfs, signals
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.node.sessions import Authenticated, SshSession
from sshd_adopt._internal.node.sshdconfig import ManagedQuery, SshdConfigError
from sshd_adopt._internal.services import adoption
from sshd_adopt._internal.services.adoption import Adoption, Peer
from sshd_adopt.errors import AccessDenied, NoSuchProcess, NotAnSshSession
from tests.unit.fakes import (
    ALICE,
    BOB,
    DAVE,
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
LISTENER, MONITOR, CHILD, SHELL, WRAPPER = 10, 20, 30, 35, 40
MONITOR_START = 20.0


def proc(pid: int, ppid: int, uid: int, title: str, start: float) -> ProcInfo:
    return ProcInfo(pid=pid, ppid=ppid, real_uid=uid, effective_uid=uid, real_gid=uid,
                    name="sshd", exe=SSHD, cmdline=tuple(title.split(" ")), start_time=start)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeManaged(ManagedQuery):
    """sshd -T's answer: one for every connection (or an error); records what was asked."""

    def __init__(self, answer: bool = True, error: SshdConfigError | None = None,
                 keyless: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.is_managed = answer
        self.error = error
        self.ways = keyless
        self.asked: list[tuple[int, str, Connection | None]] = []

    def managed(self, listener: ProcInfo, user: str, connection: Connection | None) -> bool:
        self.asked.append((listener.pid, user, connection))
        if self.error is not None:
            raise self.error
        return self.is_managed

    def keyless(self, listener: ProcInfo, user: str,
                connection: Connection | None) -> tuple[str, ...]:
        if self.error is not None:
            raise self.error
        return self.ways


@dataclass
class World:
    """One Adoption over fakes, and everything the node was asked to do."""

    service: Adoption
    clock: Clock
    jobs: FakeJobs
    source: FakeSource
    steps: FakeSteps
    managed: FakeManaged
    account: Account = ALICE
    in_job: dict[int, int | None] = field(default_factory=dict)
    oom: list[tuple[int, ...]] = field(default_factory=list)
    terminated: list[tuple[list[int], float]] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    found: list[int] = field(default_factory=list)
    listed: list[int] = field(default_factory=list)
    alive: bool = True
    session_error: Exception | None = None
    # processes the session forks while the first join is under way (OpenSSH 10's shell)
    forked_during_join: list[int] = field(default_factory=list)

    def authenticate(self, *, held: bool = False) -> None:
        self.service.authenticated(MONITOR, MONITOR_START, CHILD, held=held)

    def request(self, overrides: dict[str, str] | None = None, uid: int | None = None,
                ) -> Outcome:
        uid = self.account.uid if uid is None else uid
        return self.service.request(Peer(WRAPPER, uid, uid), overrides or {})

    def decision(self) -> tuple[Outcome, float] | None:
        return self.service.decision(MONITOR, MONITOR_START)


def make(monkeypatch: pytest.MonkeyPatch, account: Account = ALICE, *,
         jobs: Sequence[LocalJob] = (), config: Config | None = None,
         managed: FakeManaged | None = None, steps: FakeSteps | None = None) -> World:
    state = broker_state(config)
    clock = Clock()
    fake_jobs = FakeJobs({account.uid: tuple(jobs)} if jobs else {})
    source = FakeSource()
    steps = steps if steps is not None else FakeSteps()
    steps.owners.update({job.job_id: account.uid for job in jobs})
    managed = managed if managed is not None else FakeManaged()
    core = LoginCore(lambda: state, jobs=fake_jobs, source=source, steps=steps,
                     accounts=FakeAccounts(ALICE, BOB, DAVE, ROOT))
    service = Adoption(lambda: state, core, steps=steps, managed=managed, netns=NETNS,
                       clock=clock)
    world = World(service, clock, fake_jobs, source, steps, managed, account)

    user = account.name
    table = {
        LISTENER: proc(LISTENER, 1, 0, "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
                       10.0),
        MONITOR: proc(MONITOR, LISTENER, 0, f"sshd: {user} [priv]", MONITOR_START),
        CHILD: proc(CHILD, MONITOR, account.uid, f"sshd: {user}@notty", 30.0),
    }

    def verify_authenticated(monitor_pid: int, monitor_start: float, child_pid: int, *,
                             executables: frozenset[str], netns: str) -> Authenticated:
        assert (monitor_pid, monitor_start, child_pid) == (MONITOR, MONITOR_START, CHILD)
        assert netns == NETNS and SSHD in executables
        return Authenticated(user=user, uid=account.uid, monitor=table[MONITOR],
                             child=table[CHILD], connection=CONN)

    def proc_info(pid: int) -> ProcInfo:
        if pid not in table:
            raise NoSuchProcess(f"no process {pid}")
        return table[pid]

    def descendants(pid: int) -> list[int]:
        assert pid == MONITOR
        return [CHILD, *(world.forked_during_join if world.steps.joined else [])]

    def find_session(peer_pid: int, peer_uid: int, *,
                     sshd_executables: frozenset[str]) -> SshSession:
        world.found.append(peer_pid)
        if world.session_error is not None:
            raise world.session_error
        return SshSession(user=user, uid=peer_uid, peer_pid=peer_pid, monitor_pid=MONITOR,
                          session_pid=CHILD, chain=(MONITOR, CHILD, WRAPPER), connection=CONN,
                          monitor_start=MONITOR_START, peer_start=40.0)

    def sessions_of_monitor(monitor_pid: int) -> list[int]:
        world.listed.append(monitor_pid)
        return [MONITOR, CHILD, WRAPPER]

    def extern_job_of(pid: int, nodename: str, named: object = None) -> int | None:
        assert nodename == "n1"
        for job, _uid, pids in reversed(world.steps.joined):  # the stepd really moves them
            if pid in pids:
                return job
        return world.in_job.get(pid)

    def oom(*pids: int) -> None:
        world.oom.append(pids)

    def terminate(pids: Sequence[int], *, kill_after: float, why: str) -> list[int]:
        world.terminated.append((list(pids), kill_after))
        return list(pids)

    def end_at_authentication(monitor: int, user_side: Sequence[int], *, kill_after: float,
                              why: str) -> list[int]:
        world.terminated.append(([monitor, *user_side], kill_after))
        return [monitor, *user_side]

    def release(pid: int) -> None:
        world.released.append(pid)

    monkeypatch.setattr(adoption, "verify_authenticated", verify_authenticated)
    monkeypatch.setattr(adoption, "find_session", find_session)
    monkeypatch.setattr(adoption, "still_alive", lambda session: world.alive)
    monkeypatch.setattr(adoption, "sessions_of_monitor", sessions_of_monitor)
    monkeypatch.setattr(adoption, "set_task_oom_score", oom)
    monkeypatch.setattr(procfs, "proc_info", proc_info)
    monkeypatch.setattr(procfs, "descendants", descendants)
    monkeypatch.setattr(cgroups, "extern_job_of", extern_job_of)
    monkeypatch.setattr(
        cgroups, "outside_of",
        lambda job, reference, pids, nodename, named=None: [
            pid for pid in pids if extern_job_of(pid, nodename) != job])
    monkeypatch.setattr(signals, "terminate", terminate)
    monkeypatch.setattr(signals, "end_at_authentication", end_at_authentication)
    monkeypatch.setattr(signals, "release", release)
    monkeypatch.setattr(signals, "hold", lambda pid: pytest.fail("the service never holds"))
    return world


ONE_JOB = (LocalJob(7, 1000.0),)
TWO_JOBS = (LocalJob(7, 1000.0), LocalJob(8, 2000.0))


# --------------------------------------------------------------------------- early


def test_a_shell_forked_during_the_adoption_is_caught_up_before_the_wrapper_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.forked_during_join = [SHELL]
    world.authenticate()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD)), (7, ALICE.uid, (SHELL,))]
    # ... and given a job task's OOM score too: the wrapper may never ask (its ticket).
    assert world.oom == [(CHILD, SHELL)]


def test_authenticated_adopts_monitor_and_child_into_the_one_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.authenticate()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD))]
    assert world.managed.asked == [(LISTENER, "alice", CONN)]
    assert world.oom == [(CHILD,)]
    assert world.terminated == []
    assert world.decision() == (Adopted(7, "user has only one job 7", {"SLURM_JOB_ID": "7"}),
                                1000.0)
    assert not world.service.in_flight(MONITOR, MONITOR_START)


def test_a_second_event_for_the_same_monitor_does_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.authenticate()
    world.clock.now += 5
    world.authenticate()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD))]
    assert world.jobs.asked == [ALICE.uid]
    assert world.managed.asked == [(LISTENER, "alice", CONN)]
    decided = world.decision()
    assert decided is not None and decided[1] == 1000.0


def test_a_connection_that_did_not_authenticate_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)

    def refuse(*args: object, **kwargs: object) -> Authenticated:
        raise NotAnSshSession("a pre-authentication child")

    monkeypatch.setattr(adoption, "verify_authenticated", refuse)
    world.authenticate()
    assert world.steps.joined == [] and world.jobs.asked == []
    assert world.decision() is None


@pytest.mark.parametrize("managed", [FakeManaged(answer=False),
                                     FakeManaged(error=SshdConfigError("sshd -T failed"))])
def test_an_unmanaged_connection_is_never_adopted(monkeypatch: pytest.MonkeyPatch,
                                                  managed: FakeManaged) -> None:
    managed.asked.clear()
    world = make(monkeypatch, jobs=ONE_JOB, managed=managed)
    world.authenticate()
    assert managed.asked == [(LISTENER, "alice", CONN)]
    assert world.steps.joined == [] and world.jobs.asked == [] and world.source.asked == []
    assert world.oom == [] and world.terminated == []
    assert world.decision() is None
    assert not world.service.in_flight(MONITOR, MONITOR_START)


def test_an_unmanaged_jobless_connection_is_not_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, DAVE, managed=FakeManaged(answer=False))
    world.authenticate()
    assert world.terminated == [] and world.decision() is None


def test_an_exempt_user_is_never_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(path="/etc/sshd-adopt/sshd-adopt.toml",
                    exempt=Exemptions(users=frozenset({"root", "bob"})))
    world = make(monkeypatch, BOB, jobs=ONE_JOB, config=config)
    world.authenticate()
    assert world.steps.joined == [] and world.jobs.asked == []
    assert world.terminated == [] and world.oom == []
    assert world.decision() is None


def test_a_refused_zsh_user_is_ended_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, DAVE)
    world.authenticate()
    assert world.terminated == [([MONITOR, CHILD], 2.0)]
    decided = world.decision()
    assert decided is not None and isinstance(decided[0], Denied)
    assert decided[0].message is Message.NO_JOBS
    assert world.steps.joined == []


def test_a_refused_bash_user_is_left_to_the_wrapper_to_tell(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, ALICE)
    world.authenticate()
    assert world.terminated == []
    decided = world.decision()
    assert decided is not None and isinstance(decided[0], Denied)
    assert world.steps.joined == []


def test_a_refused_bash_user_who_may_come_in_without_a_key_is_ended_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With hostbased allowed, the login may not have met a restricted key entry (no
    `restrict`: forwarding would work until the wrapper ran, and -N runs none): ended."""
    world = make(monkeypatch, ALICE, managed=FakeManaged(keyless=("hostbased",)))
    world.authenticate()
    assert world.terminated == [([MONITOR, CHILD], 2.0)]
    decided = world.decision()
    assert decided is not None and isinstance(decided[0], Denied)


def test_a_user_in_a_job_who_may_come_in_without_a_key_is_adopted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB, managed=FakeManaged(keyless=("hostbased",)))
    world.authenticate()
    assert world.terminated == []
    assert world.steps.joined and world.steps.joined[0][2] == (MONITOR, CHILD)


def test_a_held_login_is_continued_once_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB, managed=FakeManaged(keyless=("hostbased",)))
    world.authenticate(held=True)
    assert world.steps.joined and world.released == [CHILD] and world.terminated == []


def test_a_held_refused_login_is_ended_and_never_continued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a bash user, whom a restricted key would have let the wrapper tell why: the
    login may have come in without a key."""
    world = make(monkeypatch, ALICE, managed=FakeManaged(keyless=("hostbased",)))
    world.authenticate(held=True)
    assert world.terminated == [([MONITOR, CHILD], 2.0)] and world.released == []


def test_a_held_refused_login_that_needed_a_key_is_continued_for_the_wrapper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held because its listener admitted keyless logins before, but this user needs a
    key: a restricted one let them in, and the wrapper tells them why."""
    world = make(monkeypatch, ALICE)
    world.authenticate(held=True)
    assert world.terminated == [] and world.released == [CHILD]


def test_a_held_login_of_an_unmanaged_or_exempt_user_is_continued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, DAVE, managed=FakeManaged(answer=False))
    world.authenticate(held=True)
    assert world.released == [CHILD] and world.terminated == []


def test_a_login_not_held_is_never_continued_by_the_service(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.authenticate()
    assert world.released == []


def test_several_jobs_ask_the_source_at_authentication(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=TWO_JOBS)
    world.authenticate()
    assert world.source.asked == [("alice", CONN)]
    assert world.steps.joined == [(8, ALICE.uid, (MONITOR, CHILD))]  # unreachable -> newest


def test_in_flight_while_deciding_and_decision_after(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    class Watching(FakeSteps):
        def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool) -> Joined:
            seen.append(world.service.in_flight(MONITOR, MONITOR_START))
            seen.append(world.decision() is None)
            return super().join(job, uid, pids, want_x11=want_x11)

    world = make(monkeypatch, jobs=ONE_JOB, steps=Watching())
    assert not world.service.in_flight(MONITOR, MONITOR_START) and world.decision() is None
    world.authenticate()
    assert seen == [True, True]
    assert not world.service.in_flight(MONITOR, MONITOR_START)
    assert world.decision() is not None
    assert world.service.decision(MONITOR, MONITOR_START + 1) is None  # another process
    world.service.monitor_gone(MONITOR)
    assert world.decision() is None


# --------------------------------------------------------------------------- the wrapper


def test_request_uses_the_early_result_and_moves_only_what_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=TWO_JOBS)
    world.authenticate()
    early = world.decision()
    assert early is not None
    world.in_job = {MONITOR: 8, CHILD: 8, WRAPPER: None}
    world.clock.now += 3
    outcome = world.request()
    assert outcome == early[0]
    assert isinstance(outcome, Adopted) and outcome.job == 8
    assert world.steps.joined == [(8, ALICE.uid, (MONITOR, CHILD)), (8, ALICE.uid, (WRAPPER,))]
    assert world.source.asked == [("alice", CONN)]  # asked once, at authentication
    assert world.jobs.asked == [ALICE.uid]
    assert world.listed == []  # the early result was not redone
    assert world.oom[-1] == (CHILD, WRAPPER)
    assert world.decision() == (outcome, 1003.0)


def test_request_with_the_whole_session_in_the_job_joins_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.authenticate()
    world.in_job = {MONITOR: 7, CHILD: 7, WRAPPER: 7}
    assert isinstance(world.request(), Adopted)
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD))]


def test_stricter_overrides_redecide_on_the_same_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=TWO_JOBS)
    world.authenticate()
    world.in_job = {MONITOR: 8, CHILD: 8, WRAPPER: 8}
    outcome = world.request({"action_unknown": "deny"})
    assert isinstance(outcome, Denied)
    assert outcome.message is Message.UNKNOWN_SOURCE
    assert outcome.jobs == (7, 8)
    assert world.source.asked == [("alice", CONN)]  # not asked again
    assert world.jobs.asked == [ALICE.uid]
    assert world.steps.joined == [(8, ALICE.uid, (MONITOR, CHILD))]
    decided = world.decision()
    assert decided is not None and decided[0] == outcome


def test_looser_overrides_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=TWO_JOBS)
    world.authenticate()
    world.in_job = {MONITOR: 8, CHILD: 8, WRAPPER: 8}
    outcome = world.request({"action_unknown": "allow", "log_level": "debug"})
    assert isinstance(outcome, Adopted) and outcome.job == 8
    assert world.source.asked == [("alice", CONN)]
    assert world.steps.joined == [(8, ALICE.uid, (MONITOR, CHILD))]


def test_request_without_an_early_result_adopts_the_session_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    outcome = world.request()
    assert isinstance(outcome, Adopted) and outcome.job == 7
    assert world.listed == [MONITOR]
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD, WRAPPER))]
    assert world.oom == [(CHILD, WRAPPER)]
    assert world.decision() == (outcome, 1000.0)
    assert not world.service.in_flight(MONITOR, MONITOR_START)


def test_request_after_an_unmanaged_early_verdict_decides_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB, managed=FakeManaged(answer=False))
    world.authenticate()
    outcome = world.request()
    assert isinstance(outcome, Adopted)
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD, WRAPPER))]


def test_request_waits_for_an_early_adoption_still_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    entered = threading.Event()

    class Slow(FakeSteps):
        def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool) -> Joined:
            entered.set()
            assert release.wait(5)
            return super().join(job, uid, pids, want_x11=want_x11)

    world = make(monkeypatch, jobs=ONE_JOB, steps=Slow())
    world.in_job = {MONITOR: 7, CHILD: 7, WRAPPER: 7}
    early = threading.Thread(target=world.authenticate)
    early.start()
    assert entered.wait(5)
    answers: list[Outcome] = []
    wrapper = threading.Thread(target=lambda: answers.append(world.request()))
    wrapper.start()
    time.sleep(0.05)
    assert answers == []  # waiting for the early result
    release.set()
    early.join(5)
    wrapper.join(5)
    assert len(answers) == 1 and isinstance(answers[0], Adopted)
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD))]
    assert world.listed == []


def test_a_session_that_ended_during_adoption_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.alive = False
    assert world.request() == Failed("the session ended during adoption")
    assert world.oom == []


def test_request_for_root_is_allowed_without_looking(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    assert world.request(uid=0) == Allowed("root is never adopted")
    assert world.found == [] and world.steps.joined == []


def test_request_for_an_exempt_user_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(path="/etc/sshd-adopt/sshd-adopt.toml",
                    exempt=Exemptions(users=frozenset({"root", "bob"})))
    world = make(monkeypatch, BOB, jobs=ONE_JOB, config=config)
    assert world.request() == Allowed("exempt user")
    assert world.found == [] and world.steps.joined == [] and world.jobs.asked == []


def test_request_for_an_unknown_uid_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    assert world.request(uid=4242) == Failed("unknown user")
    assert world.found == []


@pytest.mark.parametrize("error", [NotAnSshSession("peer 40 is not under sshd"),
                                   NoSuchProcess("peer 40 is gone"),
                                   # reparented to an init of another pid namespace (seen:
                                   # a wrapper whose monitor was killed, /proc/1/exe denied)
                                   AccessDenied("not allowed to inspect process 1")])
def test_a_peer_that_is_not_an_ssh_session_is_denied(monkeypatch: pytest.MonkeyPatch,
                                                     error: Exception) -> None:
    world = make(monkeypatch, jobs=ONE_JOB)
    world.session_error = error
    outcome = world.request()
    assert isinstance(outcome, Denied)
    assert outcome.message is Message.NOT_AN_SSH_SESSION
    assert outcome.user == "alice" and outcome.reason == str(error)
    assert world.found == [WRAPPER]
    assert world.steps.joined == [] and world.jobs.asked == []
    assert world.decision() is None


def test_the_source_answer_names_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    world = make(monkeypatch, jobs=TWO_JOBS)
    world.source.answer = CallerIdAnswer(CallerIdOutcome.MEMBER, 7, "native")
    world.authenticate()
    assert world.steps.joined == [(7, ALICE.uid, (MONITOR, CHILD))]
