"""The login core: facts → decision → what to do, shared by admission, adoption and the sweeper.

Three services look at a connection at different moments: admission while sshd
authenticates (before anything may leave the node), adoption right after sshd has
authenticated it and again when the wrapper asks, the sweeper whenever a connection
is found outside any job. They use this one core side by side, so that who may
enter, into which job, and what happens when adoption fails is decided by one piece
of code:

* :meth:`LoginCore.exempt` -- root and the ``[exempt]`` users and groups are never
  adopted and never refused (groups resolved when asked, cached briefly);
* :meth:`LoginCore.gather` -- the facts (this node, the user's jobs here, the source
  job when it can change the outcome and may be asked) and the pure decision
  (:func:`~sshd_adopt._internal.core.decision.decide`);
* :meth:`LoginCore.settle` -- the decision carried out: adoption through the extern
  step, with pam_slurm_adopt's fallbacks when it fails, into a typed
  :class:`~sshd_adopt._internal.core.outcomes.Outcome`.

The node is reached only through :mod:`~sshd_adopt._internal.core.ports`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from sshd_adopt._internal.config import Exemptions
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.options import Options
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Failed, Outcome
from sshd_adopt._internal.core.ports import AccountSource, ExternSteps, JobSource, SourceJob
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import Phases
from sshd_adopt.errors import NoSuchProcess, StepdError

#: How often a decision may be revised after failed adoptions (callerid job, then
#: newest, then the failure action): a hard stop against loops.
MAX_ROUNDS = 4


@dataclass(frozen=True)
class Settled:
    """A decision carried out: the outcome, and what led to it (for the log line)."""

    outcome: Outcome
    facts: dec.LoginFacts
    decision: dec.Decision
    failures: tuple[str, ...] = ()
    adopted: tuple[int, ...] = ()


class LoginCore:
    """Decide and carry out, for one connection at a time (thread-safe)."""

    def __init__(self, state: Callable[[], BrokerState], *, jobs: JobSource,
                 source: SourceJob, steps: ExternSteps, accounts: AccountSource) -> None:
        self._state = state
        self._jobs = jobs
        self._source = source
        self._steps = steps
        self.accounts = accounts

    def exempt(self, account: Account) -> bool:
        """Root, and the accounts ``[exempt]`` names, directly or through one of their groups."""
        return is_exempt(self._state().config.exempt, account, self.accounts)

    def gather(self, account: Account, connection: Connection | None, options: Options, *,
               ask_source: bool, phases: Phases | None = None,
               ) -> tuple[dec.LoginFacts, dec.Decision]:
        """The facts of one connection and the decision on them.

        The source job is asked only when ``ask_source`` (after sshd authenticated the
        connection: the request carries a credential to another host) and only when the
        decision needs it; otherwise an undecided :class:`~decision.AskCallerId` is
        returned as is.
        """
        state = self._state()
        exempt = self.exempt(account)
        jobs = self._jobs.jobs_of(account.uid) if state.node_known and not exempt else ()
        facts = dec.LoginFacts(user=account.name, uid=account.uid, exempt=exempt,
                               node_known=state.node_known, jobs=jobs)
        if phases is not None:
            phases.mark("jobs")
        decision = dec.decide(facts, options)
        if isinstance(decision, dec.AskCallerId) and ask_source:
            facts = replace(facts, callerid=self._source.ask(account, connection))
            decision = dec.decide(facts, options)
            if phases is not None:
                phases.mark("callerid")
        return facts, decision

    def settle(self, account: Account, connection: Connection | None,
               pids: Callable[[], Sequence[int]], options: Options, *,
               facts: dec.LoginFacts | None = None, phases: Phases | None = None) -> Settled:
        """Decide (or re-decide on given ``facts``) and carry the decision out.

        ``pids`` lists what joins the job, the sshd monitor first (everything it forks
        later inherits its cgroup); it is called at adoption time, so processes forked
        meanwhile are included. A job that cannot be adopted (its step ended, hung, or
        is not the user's) is pam_slurm_adopt's ``action_adopt_failure``, after
        ``action_unknown`` over the remaining jobs when the source had named it.
        """
        if facts is None:
            facts, decision = self.gather(account, connection, options, ask_source=True,
                                          phases=phases)
        else:
            decision = dec.decide(facts, options)
        failures: list[str] = []
        failed_job: int | None = None
        for _ in range(MAX_ROUNDS):
            if not isinstance(decision, dec.Adopt):
                break
            try:
                joined = self._steps.join(decision.job_id, account.uid, pids(),
                                          want_x11=not options.disable_x11)
            except (StepdError, NoSuchProcess) as err:
                failures.append(f"job {decision.job_id}: {err}")
                failed_job = decision.job_id
                decision = dec.after_adopt_failure(facts, options, decision)
                continue
            if phases is not None:
                phases.mark("adopt")
            return Settled(Adopted(decision.job_id, decision.reason, joined.env,
                                   joined.namespaces), facts,
                           decision, tuple(failures), joined.adopted)
        if phases is not None:
            phases.mark("adopt")
        return Settled(self._outcome(decision, facts, failed_job), facts, decision,
                       tuple(failures))

    def _outcome(self, decision: dec.Decision, facts: dec.LoginFacts,
                 failed_job: int | None) -> Outcome:
        if isinstance(decision, dec.Allow):
            return Allowed(decision.reason)
        if isinstance(decision, dec.Deny):
            return Denied(decision.message, decision.reason, facts.user,
                          node=self._state().nodename or "?", failed_job=failed_job,
                          jobs=tuple(job.job_id for job in facts.jobs))
        return Failed(f"no outcome after {MAX_ROUNDS} adoption attempts: {decision.reason}")


def is_exempt(exempt: Exemptions, account: Account, accounts: AccountSource) -> bool:
    """Whether ``account`` is never adopted and never refused: root, or named by ``exempt``.

    Group names are resolved now (cached briefly by ``accounts``), so a directory-service
    group that appears after the broker started exempts its members without a reload.
    """
    if account.uid == 0 or account.name in exempt.users:
        return True
    if not exempt.groups:
        return False
    wanted = {accounts.group_id(name) for name in exempt.groups} - {None}
    return not wanted.isdisjoint(accounts.groups_of(account))


def describe_callerid(answer: dec.CallerIdAnswer | None) -> str:
    """The callerid part of a decision's log line."""
    if answer is None:
        return "not asked"
    label = {
        dec.CallerIdOutcome.MEMBER: f"member of job {answer.job_id}",
        dec.CallerIdOutcome.INDETERMINATE: "job indeterminate",
        dec.CallerIdOutcome.UNREACHABLE: "source unreachable",
        dec.CallerIdOutcome.NOT_A_NODE: "source is not a Slurm node (nothing sent)",
        dec.CallerIdOutcome.NO_SOCKET: "no socket",
    }[answer.outcome]
    return f"{label} via {answer.method or '-'} in {answer.seconds * 1000:.0f}ms"
