"""The decision logic, branch by branch (pam_slurm_adopt reference §1.4)."""

from __future__ import annotations

import pytest

from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    NoJobsAction,
    Options,
    UnknownAction,
)

OLD = dec.LocalJob(job_id=7, started=1000.0)
NEW = dec.LocalJob(job_id=5, started=2000.0)  # lower id, started later: ids are not time
MID = dec.LocalJob(job_id=9, started=1500.0)


def facts(*jobs: dec.LocalJob, uid: int = 2001, exempt: bool = False,
          node_known: bool = True, callerid: dec.CallerIdAnswer | None = None) -> dec.LoginFacts:
    return dec.LoginFacts(user="alice", uid=uid, exempt=exempt, node_known=node_known,
                          jobs=tuple(jobs), callerid=callerid)


def member(job_id: int) -> dec.CallerIdAnswer:
    return dec.CallerIdAnswer(dec.CallerIdOutcome.MEMBER, job_id=job_id, method="native")


INDETERMINATE = dec.CallerIdAnswer(dec.CallerIdOutcome.INDETERMINATE, method="native")
UNREACHABLE = dec.CallerIdAnswer(dec.CallerIdOutcome.UNREACHABLE)


def test_root_is_allowed_even_with_no_node_and_deny_everything() -> None:
    strict = Options(action_generic_failure=GenericFailureAction.DENY)
    result = dec.decide(facts(uid=0, node_known=False), strict)
    assert isinstance(result, dec.Allow)


def test_exempt_user_is_allowed_without_jobs() -> None:
    assert isinstance(dec.decide(facts(exempt=True), Options()), dec.Allow)


def test_no_jobs_denies_by_default() -> None:
    result = dec.decide(facts(), Options())
    assert isinstance(result, dec.Deny)
    assert result.message is dec.Message.NO_JOBS


@pytest.mark.parametrize(
    ("fallthrough", "expected"), [(FallThrough.DENY, dec.Deny), (FallThrough.ALLOW, dec.Allow)]
)
def test_no_jobs_ignore_resolves_through_fallthrough(
    fallthrough: FallThrough, expected: type
) -> None:
    options = Options(action_no_jobs=NoJobsAction.IGNORE, fallthrough=fallthrough)
    assert isinstance(dec.decide(facts(), options), expected)


def test_one_job_is_adopted_without_asking_callerid() -> None:
    result = dec.decide(facts(OLD), Options())
    assert result == dec.Adopt(7, "user has only one job 7")


@pytest.mark.parametrize("unknown", [UnknownAction.ALLOW, UnknownAction.DENY])
def test_one_job_without_skip_rpc_asks_callerid(unknown: UnknownAction) -> None:
    options = Options(single_job_skip_rpc=False, action_unknown=unknown)
    assert isinstance(dec.decide(facts(OLD), options), dec.AskCallerId)


def test_one_job_with_newest_never_asks_the_source() -> None:
    """The answer could not change the job: no credential needs to leave the node."""
    result = dec.decide(facts(OLD), Options(single_job_skip_rpc=False))
    assert isinstance(result, dec.Adopt)
    assert result.job_id == OLD.job_id and not result.via_callerid


def test_several_jobs_ask_callerid_first() -> None:
    assert isinstance(dec.decide(facts(OLD, NEW), Options()), dec.AskCallerId)


def test_callerid_member_of_own_job_is_adopted() -> None:
    result = dec.decide(facts(OLD, NEW, MID, callerid=member(9)), Options())
    assert isinstance(result, dec.Adopt)
    assert (result.job_id, result.via_callerid) == (9, True)
    assert "member of job 9" in result.reason


def test_callerid_naming_a_foreign_job_falls_to_action_unknown() -> None:
    # pam_slurm_adopt 22.05 would adopt job 42 here; we never adopt a job that
    # is not one of this user's jobs on this node.
    result = dec.decide(facts(OLD, NEW, callerid=member(42)), Options())
    assert isinstance(result, dec.Adopt)
    assert result.job_id == NEW.job_id
    assert not result.via_callerid
    assert "not one of the user's jobs" in result.reason


@pytest.mark.parametrize("answer", [INDETERMINATE, UNREACHABLE,
                                    dec.CallerIdAnswer(dec.CallerIdOutcome.NO_SOCKET)])
def test_newest_picks_the_job_that_started_last_not_the_highest_id(
    answer: dec.CallerIdAnswer,
) -> None:
    result = dec.decide(facts(OLD, NEW, MID, callerid=answer), Options())
    assert isinstance(result, dec.Adopt)
    assert result.job_id == 5


def test_newest_tie_goes_to_higher_job_id() -> None:
    a = dec.LocalJob(3, 100.0)
    b = dec.LocalJob(4, 100.0)
    result = dec.decide(facts(a, b, callerid=INDETERMINATE), Options())
    assert isinstance(result, dec.Adopt)
    assert result.job_id == 4


def test_action_unknown_allow_and_deny() -> None:
    allow = dec.decide(facts(OLD, NEW, callerid=UNREACHABLE),
                       Options(action_unknown=UnknownAction.ALLOW))
    assert isinstance(allow, dec.Allow)
    deny = dec.decide(facts(OLD, NEW, callerid=UNREACHABLE),
                      Options(action_unknown=UnknownAction.DENY))
    assert isinstance(deny, dec.Deny)
    assert deny.message is dec.Message.UNKNOWN_SOURCE
    assert "source unreachable" in deny.reason


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (GenericFailureAction.ALLOW, dec.Allow),
        (GenericFailureAction.DENY, dec.Deny),
        (GenericFailureAction.IGNORE, dec.Deny),  # fallthrough defaults to deny
    ],
)
def test_unknown_node_follows_action_generic_failure(
    action: GenericFailureAction, expected: type
) -> None:
    result = dec.decide(facts(OLD, node_known=False), Options(action_generic_failure=action))
    assert isinstance(result, expected)


def test_failed_callerid_adoption_falls_back_to_newest_of_the_rest() -> None:
    f = facts(OLD, NEW, MID, callerid=member(5))
    first = dec.decide(f, Options())
    assert isinstance(first, dec.Adopt)
    second = dec.after_adopt_failure(f, Options(), first)
    assert isinstance(second, dec.Adopt)
    assert second.job_id == MID.job_id


def test_failed_final_adoption_applies_action_adopt_failure() -> None:
    f = facts(OLD)
    first = dec.decide(f, Options())
    assert isinstance(first, dec.Adopt)
    denied = dec.after_adopt_failure(f, Options(), first)
    assert isinstance(denied, dec.Deny)
    assert denied.message is dec.Message.ADOPT_FAILED
    allowed = dec.after_adopt_failure(
        f, Options(action_adopt_failure=AdoptFailureAction.ALLOW), first
    )
    assert isinstance(allowed, dec.Allow)


def test_failed_callerid_adoption_of_the_only_job_applies_adopt_failure() -> None:
    f = facts(OLD, callerid=member(7))
    options = Options(single_job_skip_rpc=False, action_unknown=UnknownAction.DENY)
    first = dec.decide(f, options)
    assert isinstance(first, dec.Adopt)
    assert first.via_callerid
    result = dec.after_adopt_failure(f, options, first)
    assert isinstance(result, dec.Deny)


def test_a_fallthrough_denial_tells_the_user_the_real_reason() -> None:
    """The user reads the message of what happened (no jobs, unknown node), not a generic one."""
    options = Options(action_no_jobs=NoJobsAction.IGNORE, fallthrough=FallThrough.DENY)
    result = dec.decide(facts(), options)
    assert isinstance(result, dec.Deny) and result.message is dec.Message.NO_JOBS
    unknown_node = Options(action_generic_failure=GenericFailureAction.IGNORE,
                           fallthrough=FallThrough.DENY)
    result = dec.decide(facts(OLD, node_known=False), unknown_node)
    assert isinstance(result, dec.Deny) and result.message is dec.Message.NO_NODE
    assert "NodeName is unknown" in result.reason


def test_only_a_member_answer_names_the_job() -> None:
    """A job id in an answer that is not MEMBER (a garbled reply) never picks the job."""
    odd = dec.CallerIdAnswer(dec.CallerIdOutcome.INDETERMINATE, job_id=OLD.job_id,
                             method="native")
    result = dec.decide(facts(OLD, NEW, callerid=odd), Options())
    assert isinstance(result, dec.Adopt) and result.job_id == NEW.job_id  # newest, not OLD
    assert not result.via_callerid
