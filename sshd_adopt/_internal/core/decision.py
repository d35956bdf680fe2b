"""Who gets in, and into which job: a pure function of gathered facts and options.

The broker gathers facts (the user, their extern steps on this node, what the
callerid RPC said) and asks :func:`decide`. The answer is one of four values:
adopt into a job, let in without adoption, deny with a message, or "ask the
callerid RPC first". Nothing here does I/O, so every branch of
pam_slurm_adopt's flow (reference §1.4) is a unit test.

Differences from pam_slurm_adopt 22.05, on purpose:

* A job named by the source host's slurmd is adopted only if it is one of this
  user's jobs with an extern step on this node; upstream adopts whatever the
  remote names (§1.4 step 10).
* "newest" means the extern step that really started last (tie: higher job
  id), not the mtime of a cgroup directory whose path upstream gets wrong on
  multi-slurmd builds such as Debian's (§1.5, §5.6).
* ``ignore`` resolves through the explicit ``fallthrough`` option.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    NoJobsAction,
    Options,
    UnknownAction,
)


class CallerIdOutcome(enum.StrEnum):
    """What the callerid RPC to the source host's slurmd told us."""

    MEMBER = "member"  # the source slurmd named a job
    INDETERMINATE = "indeterminate"  # it answered, but knows no job for the connection
    UNREACHABLE = "unreachable"  # no answer within the deadline (no slurmd, firewall, hung)
    NOT_A_NODE = "not-a-node"  # the source is no Slurm node's slurmd address: nothing was sent
    NO_SOCKET = "no-socket"  # we could not find the connection's TCP socket


class Message(enum.StrEnum):
    """Which denial text to show; the broker renders it from the configured templates."""

    NO_JOBS = "no_jobs"
    UNKNOWN_SOURCE = "unknown_source"
    ADOPT_FAILED = "adopt_failed"
    NO_NODE = "no_node"
    NOT_AN_SSH_SESSION = "not_an_ssh_session"


@dataclass(frozen=True)
class LocalJob:
    """One of the user's jobs with a live extern step on this node."""

    job_id: int
    started: float  # seconds since the epoch when its extern step started


@dataclass(frozen=True)
class CallerIdAnswer:
    """The callerid result and where it came from (for the decision log line)."""

    outcome: CallerIdOutcome
    job_id: int | None = None
    method: str = ""  # "native", "scontrol" or "" when nothing answered
    seconds: float = 0.0


@dataclass(frozen=True)
class LoginFacts:
    """Everything the decision needs, gathered by the broker from sources it trusts."""

    user: str
    uid: int
    exempt: bool
    node_known: bool
    jobs: tuple[LocalJob, ...]
    callerid: CallerIdAnswer | None = None  # None: not asked yet


@dataclass(frozen=True)
class Adopt:
    """Adopt the connection into ``job_id``.

    ``via_callerid`` marks a job named by the source host: if adopting it
    fails, we fall back to ``action_unknown`` as upstream does, instead of
    applying ``action_adopt_failure`` at once.
    """

    job_id: int
    reason: str
    via_callerid: bool = False


@dataclass(frozen=True)
class Allow:
    """Let the connection in without adopting it."""

    reason: str


@dataclass(frozen=True)
class Deny:
    """Refuse the connection; ``message`` selects the text the user sees."""

    message: Message
    reason: str


@dataclass(frozen=True)
class AskCallerId:
    """The user has several jobs here: ask the source host which one this is."""

    reason: str


Decision = Adopt | Allow | Deny | AskCallerId


def _fall_through(options: Options, message: Message, why: str) -> Allow | Deny:
    """Resolve an ``ignore`` through the site's explicit fall-through policy."""
    if options.fallthrough is FallThrough.ALLOW:
        return Allow(f"{why}; ignore -> fallthrough=allow")
    return Deny(message, f"{why}; ignore -> fallthrough=deny")


def _newest(jobs: tuple[LocalJob, ...]) -> LocalJob:
    """The job whose extern step started last; ties go to the higher job id."""
    return max(jobs, key=lambda job: (job.started, job.job_id))


def _unknown_source(facts: LoginFacts, options: Options, why: str) -> Adopt | Allow | Deny:
    """Apply ``action_unknown`` once the source job could not be determined."""
    match options.action_unknown:
        case UnknownAction.ALLOW:
            return Allow(f"{why}; action_unknown=allow")
        case UnknownAction.DENY:
            return Deny(Message.UNKNOWN_SOURCE, f"{why}; action_unknown=deny")
        case UnknownAction.NEWEST:
            job = _newest(facts.jobs)
            return Adopt(job.job_id, f"{why}; action_unknown=newest picked job {job.job_id}")


def decide(facts: LoginFacts, options: Options) -> Decision:
    """Decide what happens to this connection (pam_slurm_adopt's flow, §1.4)."""
    if facts.uid == 0:
        return Allow("root is never adopted")
    if facts.exempt:
        return Allow("exempt user")
    if not facts.node_known:
        why = "this host's Slurm NodeName is unknown"
        match options.action_generic_failure:
            case GenericFailureAction.ALLOW:
                return Allow(f"{why}; action_generic_failure=allow")
            case GenericFailureAction.DENY:
                return Deny(Message.NO_NODE, f"{why}; action_generic_failure=deny")
            case GenericFailureAction.IGNORE:
                return _fall_through(options, Message.NO_NODE, why)
    if not facts.jobs:
        if options.action_no_jobs is NoJobsAction.IGNORE:
            return _fall_through(options, Message.NO_JOBS, "user has no jobs on this node")
        return Deny(Message.NO_JOBS, "user has no jobs on this node; action_no_jobs=deny")
    newest = options.action_unknown is UnknownAction.NEWEST
    if len(facts.jobs) == 1 and (options.single_job_skip_rpc or newest):
        # With newest, whatever the source says this job is adopted: the RPC
        # (which sends a credential to another host) could not change the outcome.
        job = facts.jobs[0]
        why = "" if options.single_job_skip_rpc else " (action_unknown=newest)"
        return Adopt(job.job_id, f"user has only one job {job.job_id}{why}")
    answer = facts.callerid
    if answer is None:
        return AskCallerId(f"user has {len(facts.jobs)} jobs on this node")
    if answer.outcome is CallerIdOutcome.MEMBER and answer.job_id is not None:
        if any(job.job_id == answer.job_id for job in facts.jobs):
            return Adopt(answer.job_id, f"member of job {answer.job_id}", via_callerid=True)
        why = f"source names job {answer.job_id}, which is not one of the user's jobs here"
        return _unknown_source(facts, options, why)
    labels = {
        CallerIdOutcome.MEMBER: "job indeterminate",
        CallerIdOutcome.INDETERMINATE: "job indeterminate",
        CallerIdOutcome.UNREACHABLE: "source unreachable",
        CallerIdOutcome.NOT_A_NODE: "source is not a Slurm node",
        CallerIdOutcome.NO_SOCKET: "connection socket not found",
    }
    return _unknown_source(facts, options, labels[answer.outcome])


def after_adopt_failure(
    facts: LoginFacts, options: Options, failed: Adopt
) -> Adopt | Allow | Deny:
    """Decide again after the stepd could not adopt the session into ``failed.job_id``.

    A job named by the source host that cannot be adopted falls back to
    ``action_unknown`` over the remaining jobs (upstream does the same). Any
    other failure applies ``action_adopt_failure``.
    """
    why = f"adoption into job {failed.job_id} failed"
    if failed.via_callerid:
        remaining = tuple(job for job in facts.jobs if job.job_id != failed.job_id)
        if remaining:
            return _unknown_source(dataclasses.replace(facts, jobs=remaining), options, why)
    if options.action_adopt_failure is AdoptFailureAction.ALLOW:
        return Allow(f"{why}; action_adopt_failure=allow")
    return Deny(Message.ADOPT_FAILED, f"{why}; action_adopt_failure=deny")
