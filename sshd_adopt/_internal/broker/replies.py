"""What the broker answers: a service's typed outcome turned into the wire's reply items.

The server sends these replies; the ticket desk writes the reply of a connection
adopted early where its wrapper finds it (:mod:`sshd_adopt._internal.broker.tickets`),
so that both are the same reply. A denial's text is rendered from the site's
templates only here, where somebody will read it.
"""

from __future__ import annotations

from collections.abc import Callable

from sshd_adopt._internal import protocol
from sshd_adopt._internal.broker.tickets import SessionTickets
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Outcome
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.services.admission import Keys, KeysOutcome
from sshd_adopt._internal.services.spawning import NoNamespaces, Refused
from sshd_adopt._internal.slurm import hints
from sshd_adopt.errors import Error


def render_adoption(state: BrokerState, outcome: Outcome) -> dict[str, str]:
    """The wrapper's reply; a denial's text is rendered here, with where the jobs run."""
    if isinstance(outcome, Adopted):
        if outcome.namespaces:  # the wrapper asks for its session to be started inside
            return protocol.reply(protocol.ADOPTED, job=outcome.job, env=dict(outcome.env),
                                  **{protocol.NAMESPACES: "1"})
        return protocol.reply(protocol.ADOPTED, job=outcome.job, env=dict(outcome.env))
    if isinstance(outcome, Allowed):
        return protocol.reply(protocol.ALLOWED)
    if isinstance(outcome, Denied):
        text = state.config.messages.render(
            outcome.message, user=outcome.user, node=outcome.node,
            job=str(outcome.failed_job) if outcome.failed_job is not None else "-",
            jobs=",".join(str(job) for job in outcome.jobs) or "none")
        if outcome.message in (Message.NO_JOBS, Message.UNKNOWN_SOURCE):
            text += _hint(outcome.user)
        return protocol.reply(protocol.DENIED, message=text)
    return protocol.reply(protocol.FAILED, message=f"sshd-adopt: {outcome.reason}")


def render_spawn(outcome: Refused | NoNamespaces) -> dict[str, str]:
    """The answer to a "spawn" request that did not start anything."""
    if isinstance(outcome, NoNamespaces):
        return protocol.reply(protocol.ALLOWED)
    return protocol.reply(protocol.DENIED, message="sshd-adopt: access denied: cannot start "
                          f"the session inside the job's namespaces: {outcome.reason}")


def render_keys(outcome: KeysOutcome) -> dict[str, str]:
    """The AuthorizedKeysCommand's reply: keys to print, or a refusal (nothing printed)."""
    if isinstance(outcome, Keys):
        return protocol.reply(protocol.KEYS, keys=outcome.text)
    return protocol.reply(protocol.DENIED, message=outcome.reason)


def _hint(user: str) -> str:
    """Where the user's running jobs are and how to get a shell in one ("" if unknown).

    Asked of slurmctld with a short bound: a slow controller must not slow the
    denial down, so the hint is simply left out then.
    """
    jobs = hints.running_jobs_elsewhere(user, timeout=0.5)
    return "" if jobs is None else "\n" + hints.format_hint(jobs)


def _no_sluid(_job: int) -> str | None:
    return None


class TicketDesk:
    """Session tickets for adoption: the reply an adopted connection's wrapper would get."""

    def __init__(self, tickets: SessionTickets, state: Callable[[], BrokerState],
                 sluid_of: Callable[[int], str | None] = _no_sluid) -> None:
        self.tickets = tickets
        self._state = state
        self._sluid_of = sluid_of

    def issue(self, monitor_pid: int, account: Account, outcome: Adopted) -> None:
        reply = render_adoption(self._state(), outcome)
        sluid = self._sluid_of(outcome.job)
        if sluid is not None:  # the job's cgroup may be named by it (26.05, cgroup/v2)
            reply[protocol.SLUID] = sluid
        try:
            self.tickets.issue(monitor_pid, reply, uid=account.uid, gid=account.gid)
        except (Error, OSError) as err:  # the wrapper will simply ask
            logger().warning("session ticket of monitor %d not written: %s", monitor_pid, err)

    def revoke(self, monitor_pid: int) -> None:
        try:
            self.tickets.revoke(monitor_pid)
        except OSError as err:
            logger().warning("session ticket of monitor %d not removed: %s", monitor_pid, err)
