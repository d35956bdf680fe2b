"""The login core: who is exempt, which facts are gathered, and how a decision is carried out.

:class:`~sshd_adopt._internal.core.login.LoginCore` runs against the fakes of
``tests/unit/fakes.py``: a job table, a callerid source and extern steps that answer
from tables and record what was asked of them. The rules themselves are tested branch
by branch in ``test_decision.py``; here what matters is that the core feeds them the
right facts, asks the source job only when that can change the outcome, and follows
pam_slurm_adopt's fallbacks when an adoption fails.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

import pytest

from sshd_adopt._internal.config import Config, Exemptions
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.login import MAX_ROUNDS, LoginCore, describe_callerid, is_exempt
from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    Options,
    UnknownAction,
)
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Failed
from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import Phases
from sshd_adopt.errors import NoSuchProcess, StepdError
from tests.unit.fakes import (
    ALICE,
    BOB,
    CAROL,
    ROOT,
    FakeAccounts,
    FakeJobs,
    FakeSource,
    FakeSteps,
    broker_state,
)

# Ids are not time: job 5 started last, so "newest" is 5, never the highest id.
OLD = dec.LocalJob(job_id=7, started=1000.0)
NEW = dec.LocalJob(job_id=5, started=2000.0)
MID = dec.LocalJob(job_id=9, started=1500.0)

CONN = Connection(
    local_ip=ipaddress.ip_address("10.0.0.11"),
    local_port=22,
    remote_ip=ipaddress.ip_address("10.0.0.12"),
    remote_port=40000,
)
MONITOR = 4242


def member(job_id: int) -> dec.CallerIdAnswer:
    return dec.CallerIdAnswer(dec.CallerIdOutcome.MEMBER, job_id=job_id, method="native",
                              seconds=0.012)


def exempting(*, users: frozenset[str] = frozenset({"root"}),
              groups: frozenset[str] = frozenset()) -> BrokerState:
    config = Config(path="/etc/sshd-adopt/sshd-adopt.toml",
                    exempt=Exemptions(users=users, groups=groups))
    return broker_state(config)


class Node:
    """A login core wired to fakes, with the fakes at hand for the assertions."""

    def __init__(self, *jobs: dec.LocalJob, account: Account = ALICE,
                 state: BrokerState | None = None,
                 answer: dec.CallerIdAnswer | None = None,
                 accounts: FakeAccounts | None = None) -> None:
        self.state = state or broker_state()
        self.jobs = FakeJobs({account.uid: jobs} if jobs else {})
        self.source = FakeSource() if answer is None else FakeSource(answer)
        # Every job of the table belongs to the account unless a test says otherwise.
        self.steps = FakeSteps(owners={job.job_id: account.uid for job in jobs})
        self.accounts = accounts or FakeAccounts(ALICE, BOB, CAROL, ROOT)
        self.core = LoginCore(lambda: self.state, jobs=self.jobs, source=self.source,
                              steps=self.steps, accounts=self.accounts)


def monitor_only() -> list[int]:
    return [MONITOR]


# -- exempt ---------------------------------------------------------------------------


def test_root_is_exempt_whatever_the_configuration_names() -> None:
    node = Node(state=exempting(users=frozenset()))
    assert node.core.exempt(ROOT)
    assert not node.core.exempt(ALICE)


def test_exempt_user_is_exempt_and_others_are_not() -> None:
    node = Node(state=exempting(users=frozenset({"root", "alice"})))
    assert node.core.exempt(ALICE)
    assert not node.core.exempt(BOB)


def test_exempt_group_exempts_its_members_through_a_supplementary_group() -> None:
    accounts = FakeAccounts(ALICE, BOB, groups={"alice": {5000}}, group_ids={"admins": 5000})
    node = Node(state=exempting(groups=frozenset({"admins"})), accounts=accounts)
    assert node.core.exempt(ALICE)
    assert not node.core.exempt(BOB)


def test_exempt_group_matches_the_primary_group_too() -> None:
    accounts = FakeAccounts(ALICE, BOB, group_ids={"bobs": BOB.gid})
    assert is_exempt(Exemptions(groups=frozenset({"bobs"})), BOB, accounts)
    assert not is_exempt(Exemptions(groups=frozenset({"bobs"})), ALICE, accounts)


def test_exempt_group_that_appears_later_is_resolved_at_call_time() -> None:
    """A directory-service group created after the broker started works without a reload."""
    accounts = FakeAccounts(ALICE, BOB, groups={"alice": {5000}})
    node = Node(NEW, state=exempting(groups=frozenset({"admins"})), accounts=accounts)
    assert not node.core.exempt(ALICE)

    accounts.group_ids["admins"] = 5000  # the group now resolves; nothing is rebuilt

    assert node.core.exempt(ALICE)
    assert not node.core.exempt(BOB)
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    assert isinstance(settled.outcome, Allowed)
    assert node.steps.joined == []


def test_exempt_group_that_does_not_resolve_exempts_nobody() -> None:
    """An unknown group name (``group_id`` is None) must not match anything."""
    accounts = FakeAccounts(ALICE, groups={"alice": {5000}})
    assert not is_exempt(Exemptions(groups=frozenset({"ghosts"})), ALICE, accounts)


def test_exemptions_follow_a_reloaded_state() -> None:
    node = Node()
    assert not node.core.exempt(ALICE)
    node.state = exempting(users=frozenset({"root", "alice"}))  # SIGHUP swaps the state
    assert node.core.exempt(ALICE)


def test_exempt_user_is_let_in_without_looking_at_jobs_or_the_source() -> None:
    node = Node(OLD, NEW, state=exempting(users=frozenset({"root", "alice"})))
    facts, decision = node.core.gather(ALICE, CONN, Options(), ask_source=True)
    assert facts.exempt and facts.jobs == ()
    assert isinstance(decision, dec.Allow)
    assert node.jobs.asked == [] and node.source.asked == []


def test_root_is_allowed_even_on_an_unknown_node() -> None:
    node = Node(state=broker_state(slurm=False))
    strict = Options(action_generic_failure=GenericFailureAction.DENY)
    settled = node.core.settle(ROOT, CONN, monitor_only, strict)
    assert isinstance(settled.outcome, Allowed)


# -- gather ---------------------------------------------------------------------------


def test_gather_without_ask_source_never_asks_even_with_several_jobs() -> None:
    """Admission runs before sshd authenticated: nothing may leave the node."""
    node = Node(OLD, NEW, answer=member(7))
    facts, decision = node.core.gather(ALICE, CONN, Options(), ask_source=False)
    assert isinstance(decision, dec.AskCallerId)
    assert facts.callerid is None
    assert node.source.asked == []
    assert node.jobs.asked == [ALICE.uid]


def test_gather_asks_the_source_once_for_several_jobs() -> None:
    node = Node(OLD, NEW, answer=member(7))
    facts, decision = node.core.gather(ALICE, CONN, Options(), ask_source=True)
    assert node.source.asked == [("alice", CONN)]
    assert facts.callerid == member(7)
    assert decision == dec.Adopt(7, "member of job 7", via_callerid=True)


@pytest.mark.parametrize("options", [
    Options(),
    Options(single_job_skip_rpc=False),  # action_unknown=newest: the answer changes nothing
])
def test_gather_never_asks_for_one_job(options: Options) -> None:
    node = Node(OLD, answer=member(7))
    facts, decision = node.core.gather(ALICE, CONN, options, ask_source=True)
    assert node.source.asked == []
    assert facts.callerid is None
    assert isinstance(decision, dec.Adopt) and decision.job_id == 7


def test_gather_asks_for_one_job_only_when_the_site_turned_skip_rpc_off() -> None:
    """single_job_skip_rpc=0 with action_unknown=deny: the answer decides, so it is asked."""
    node = Node(OLD, answer=member(7))
    options = Options(single_job_skip_rpc=False, action_unknown=UnknownAction.DENY)
    _, decision = node.core.gather(ALICE, CONN, options, ask_source=True)
    assert node.source.asked == [("alice", CONN)]
    assert decision == dec.Adopt(7, "member of job 7", via_callerid=True)


def test_gather_never_asks_without_jobs() -> None:
    node = Node(answer=member(7))
    facts, decision = node.core.gather(ALICE, CONN, Options(), ask_source=True)
    assert node.source.asked == []
    assert facts.jobs == ()
    assert isinstance(decision, dec.Deny) and decision.message is dec.Message.NO_JOBS


def test_gather_reads_only_the_users_own_jobs() -> None:
    node = Node(OLD)
    node.jobs.by_uid[BOB.uid] = (NEW, MID)
    facts, _ = node.core.gather(ALICE, CONN, Options(), ask_source=True)
    assert facts.jobs == (OLD,)
    assert (facts.user, facts.uid) == ("alice", ALICE.uid)
    assert node.jobs.asked == [ALICE.uid]


def test_gather_marks_its_phases() -> None:
    node = Node(OLD, NEW, answer=member(7))
    phases = Phases()
    node.core.gather(ALICE, CONN, Options(), ask_source=True, phases=phases)
    assert [name for name, _ in phases.spent] == ["jobs", "callerid"]


# -- node unknown: action_generic_failure -----------------------------------------------


def test_unknown_node_denies_with_generic_failure_deny_and_reads_no_jobs() -> None:
    node = Node(OLD, state=broker_state(slurm=False))
    strict = Options(action_generic_failure=GenericFailureAction.DENY)
    settled = node.core.settle(ALICE, CONN, monitor_only, strict)
    assert isinstance(settled.outcome, Denied)
    assert settled.outcome.message is dec.Message.NO_NODE
    assert settled.outcome.node == "?"
    assert not settled.facts.node_known
    assert node.jobs.asked == [] and node.source.asked == [] and node.steps.joined == []


def test_unknown_node_allows_with_generic_failure_allow() -> None:
    node = Node(OLD, state=broker_state(slurm=False))
    lax = Options(action_generic_failure=GenericFailureAction.ALLOW)
    settled = node.core.settle(ALICE, CONN, monitor_only, lax)
    assert isinstance(settled.outcome, Allowed)
    assert "action_generic_failure=allow" in settled.outcome.reason
    assert node.steps.joined == []


@pytest.mark.parametrize(("fallthrough", "expected"), [
    (FallThrough.DENY, Denied), (FallThrough.ALLOW, Allowed)])
def test_unknown_node_ignore_resolves_through_fallthrough(
        fallthrough: FallThrough, expected: type) -> None:
    node = Node(OLD, state=broker_state(slurm=False))
    options = Options(action_generic_failure=GenericFailureAction.IGNORE,
                      fallthrough=fallthrough)
    settled = node.core.settle(ALICE, CONN, monitor_only, options)
    assert isinstance(settled.outcome, expected)
    assert node.steps.joined == []


# -- settle ---------------------------------------------------------------------------


def test_settle_adopts_into_the_single_job() -> None:
    node = Node(OLD)
    settled = node.core.settle(ALICE, CONN, lambda: [MONITOR, MONITOR + 1], Options())
    assert settled.outcome == Adopted(7, "user has only one job 7", {"SLURM_JOB_ID": "7"})
    assert node.steps.joined == [(7, ALICE.uid, (MONITOR, MONITOR + 1))]
    assert settled.adopted == (MONITOR, MONITOR + 1)
    assert settled.failures == ()


def test_settle_lists_the_pids_when_adopting_not_before() -> None:
    """``pids`` is called per adoption attempt, so a retry includes what forked meanwhile."""
    calls: list[int] = []

    def pids() -> list[int]:
        calls.append(MONITOR + len(calls))  # one more child forked before every call
        return list(calls)

    node = Node(OLD, NEW, MID, answer=member(7))
    node.steps.broken.add(7)
    settled = node.core.settle(ALICE, CONN, pids, Options())
    assert isinstance(settled.outcome, Adopted) and settled.outcome.job == 5
    assert node.steps.joined == [(5, ALICE.uid, (MONITOR, MONITOR + 1))]
    assert len(calls) == 2


def test_settle_never_lists_pids_for_a_denial() -> None:
    called: list[bool] = []

    def pids() -> Sequence[int]:
        called.append(True)
        return [MONITOR]

    node = Node()
    settled = node.core.settle(ALICE, CONN, pids, Options())
    assert isinstance(settled.outcome, Denied)
    assert settled.outcome.message is dec.Message.NO_JOBS
    assert settled.outcome.node == "n1" and settled.outcome.user == "alice"
    assert called == []


@pytest.mark.parametrize(("disable_x11", "display"), [(False, "localhost:10.0"), (True, None)])
def test_settle_passes_the_x11_wish_to_the_step(disable_x11: bool, display: str | None) -> None:
    node = Node(OLD)
    node.steps.x11[7] = "localhost:10.0"
    settled = node.core.settle(ALICE, CONN, monitor_only, Options(disable_x11=disable_x11))
    assert isinstance(settled.outcome, Adopted)
    assert settled.outcome.env.get("DISPLAY") == display


def test_failing_join_denies_with_adopt_failure_deny() -> None:
    node = Node(OLD)
    node.steps.broken.add(7)
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    outcome = settled.outcome
    assert isinstance(outcome, Denied)
    assert outcome.message is dec.Message.ADOPT_FAILED
    assert outcome.failed_job == 7 and outcome.jobs == (7,)
    assert "action_adopt_failure=deny" in outcome.reason
    assert len(settled.failures) == 1 and settled.failures[0].startswith("job 7:")
    assert node.steps.joined == [] and settled.adopted == ()


def test_failing_join_allows_with_adopt_failure_allow() -> None:
    node = Node(OLD)
    node.steps.broken.add(7)
    options = Options(action_adopt_failure=AdoptFailureAction.ALLOW)
    settled = node.core.settle(ALICE, CONN, monitor_only, options)
    assert settled.outcome == Allowed("adoption into job 7 failed; action_adopt_failure=allow")
    assert len(settled.failures) == 1


def test_monitor_gone_before_adoption_is_an_adoption_failure() -> None:
    """``pids`` raising NoSuchProcess (the sshd monitor exited) follows action_adopt_failure."""
    def gone() -> Sequence[int]:
        raise NoSuchProcess(f"process {MONITOR} is gone")

    node = Node(OLD)
    settled = node.core.settle(ALICE, CONN, gone, Options())
    assert isinstance(settled.outcome, Denied)
    assert settled.outcome.message is dec.Message.ADOPT_FAILED
    assert settled.failures == (f"job 7: process {MONITOR} is gone",)


def test_another_users_job_is_an_adoption_failure_not_an_adoption() -> None:
    """The step says the job is bob's (id reused): alice must not end up in it."""
    node = Node(OLD)
    node.steps.owners[7] = BOB.uid
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    assert isinstance(settled.outcome, Denied)
    assert settled.outcome.message is dec.Message.ADOPT_FAILED
    assert settled.outcome.failed_job == 7
    assert node.steps.joined == []


def test_callerid_answer_is_used_not_newest() -> None:
    """The source names job 7, which started first: 7 is adopted, not the newest (5)."""
    node = Node(OLD, NEW, MID, answer=member(7))
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    assert settled.outcome == Adopted(7, "member of job 7", {"SLURM_JOB_ID": "7"})
    assert node.steps.joined == [(7, ALICE.uid, (MONITOR,))]
    assert settled.facts.callerid == member(7)


def test_source_naming_a_job_not_the_users_falls_to_action_unknown() -> None:
    node = Node(OLD, NEW, answer=member(4711))
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    assert isinstance(settled.outcome, Adopted) and settled.outcome.job == 5
    assert "not one of the user's jobs" in settled.outcome.reason


def test_unreachable_source_with_unknown_deny_denies() -> None:
    node = Node(OLD, NEW)  # FakeSource answers UNREACHABLE by default
    settled = node.core.settle(ALICE, CONN, monitor_only,
                               Options(action_unknown=UnknownAction.DENY))
    assert isinstance(settled.outcome, Denied)
    assert settled.outcome.message is dec.Message.UNKNOWN_SOURCE
    assert settled.outcome.jobs == (7, 5)
    assert node.steps.joined == []


def test_callerid_job_that_fails_falls_back_to_newest_of_the_rest() -> None:
    node = Node(OLD, NEW, MID, answer=member(5))  # the source names the newest, 5
    node.steps.broken.add(5)
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    assert isinstance(settled.outcome, Adopted)
    assert settled.outcome.job == 9  # newest of 7 and 9, never 5 again
    assert "adoption into job 5 failed; action_unknown=newest" in settled.outcome.reason
    assert len(settled.failures) == 1 and settled.failures[0].startswith("job 5:")
    assert node.steps.joined == [(9, ALICE.uid, (MONITOR,))]


def test_callerid_job_that_fails_with_unknown_deny_denies_unknown_source() -> None:
    node = Node(OLD, NEW, answer=member(7))
    node.steps.broken.add(7)
    settled = node.core.settle(ALICE, CONN, monitor_only,
                               Options(action_unknown=UnknownAction.DENY))
    outcome = settled.outcome
    assert isinstance(outcome, Denied)
    assert outcome.message is dec.Message.UNKNOWN_SOURCE
    assert outcome.failed_job == 7
    assert node.steps.joined == []


def test_callerid_job_that_fails_with_unknown_allow_allows() -> None:
    node = Node(OLD, NEW, answer=member(7))
    node.steps.broken.add(7)
    settled = node.core.settle(ALICE, CONN, monitor_only,
                               Options(action_unknown=UnknownAction.ALLOW,
                                       action_adopt_failure=AdoptFailureAction.DENY))
    assert settled.outcome == Allowed("adoption into job 7 failed; action_unknown=allow")


def test_fallback_that_fails_too_ends_in_adopt_failure_without_a_third_try() -> None:
    node = Node(OLD, NEW, MID, answer=member(7))
    node.steps.broken.update({5, 7, 9})
    settled = node.core.settle(ALICE, CONN, monitor_only, Options())
    outcome = settled.outcome
    assert isinstance(outcome, Denied)
    assert outcome.message is dec.Message.ADOPT_FAILED
    assert outcome.failed_job == 5  # the last job tried: newest of the rest
    assert [f.split(":")[0] for f in settled.failures] == ["job 7", "job 5"]


def test_settle_on_given_facts_asks_nothing_again() -> None:
    """The sweeper re-decides on facts it has: no job table read, no callerid."""
    node = Node(OLD, NEW, answer=member(5))
    facts = dec.LoginFacts(user="alice", uid=ALICE.uid, exempt=False, node_known=True,
                           jobs=(OLD, NEW), callerid=member(7))
    settled = node.core.settle(ALICE, CONN, monitor_only, Options(), facts=facts)
    assert isinstance(settled.outcome, Adopted) and settled.outcome.job == 7
    assert settled.facts is facts
    assert node.jobs.asked == [] and node.source.asked == []


def test_settle_marks_the_adopt_phase() -> None:
    node = Node(OLD)
    phases = Phases()
    node.core.settle(ALICE, CONN, monitor_only, Options(), phases=phases)
    assert [name for name, _ in phases.spent] == ["jobs", "adopt"]


class EndlessSteps:
    """Extern steps that always fail; a runaway loop is stopped here, not by a hang."""

    def __init__(self) -> None:
        self.tried: list[int] = []

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool) -> Joined:
        self.tried.append(job)
        if len(self.tried) > 10 * MAX_ROUNDS:
            raise AssertionError("settle does not bound its rounds")
        raise StepdError(f"job {job}: stepd gone")


def test_max_rounds_bounds_the_adoption_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision that keeps naming another job must not loop: after MAX_ROUNDS, Failed."""
    def again(facts: dec.LoginFacts, options: Options, failed: dec.Adopt) -> dec.Adopt:
        return dec.Adopt(failed.job_id + 1, "try the next one")

    monkeypatch.setattr(dec, "after_adopt_failure", again)  # as login.py calls it
    steps = EndlessSteps()
    node = Node(OLD)
    core = LoginCore(lambda: node.state, jobs=node.jobs, source=node.source, steps=steps,
                     accounts=node.accounts)
    settled = core.settle(ALICE, CONN, monitor_only, Options())
    assert steps.tried == list(range(7, 7 + MAX_ROUNDS))
    assert isinstance(settled.outcome, Failed)
    assert settled.outcome.reason.startswith(f"no outcome after {MAX_ROUNDS} adoption attempts")
    assert len(settled.failures) == MAX_ROUNDS


# -- describe_callerid ----------------------------------------------------------------


def test_describe_callerid_not_asked() -> None:
    assert describe_callerid(None) == "not asked"


def test_describe_callerid_member() -> None:
    assert describe_callerid(member(7)) == "member of job 7 via native in 12ms"


@pytest.mark.parametrize("outcome", list(dec.CallerIdOutcome))
def test_describe_callerid_labels_every_outcome(outcome: dec.CallerIdOutcome) -> None:
    text = describe_callerid(dec.CallerIdAnswer(outcome, None, "", 0.0))
    assert text.endswith(" via - in 0ms")
    assert text != " via - in 0ms"


def test_describe_callerid_says_which_failure() -> None:
    answer = dec.CallerIdAnswer(dec.CallerIdOutcome.UNREACHABLE, None, "scontrol", 1.5)
    assert describe_callerid(answer) == "source unreachable via scontrol in 1500ms"
    not_a_node = dataclasses.replace(answer, outcome=dec.CallerIdOutcome.NOT_A_NODE)
    assert describe_callerid(not_a_node).startswith("source is not a Slurm node")

