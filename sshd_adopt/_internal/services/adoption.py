"""One adoption request, start to finish: gather facts, decide, adopt, answer.

This is where the broker's security rules live: the peer's identity comes from
SO_PEERCRED, the ssh connection and its 4-tuple from /proc, the user's jobs
from the stepds, the source job from the callerid RPC. The only thing the
client contributes is "adopt me" and option overrides that may only tighten
the policy (:func:`sshd_adopt._internal.config.apply_overrides`).
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from sshd_adopt._internal import protocol, run
from sshd_adopt._internal.config import Config, apply_overrides
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.options import Options
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node.sessions import (
    SshSession,
    find_session,
    sessions_of_monitor,
    still_alive,
)
from sshd_adopt._internal.slurm import hints, munge
from sshd_adopt._internal.slurm.callerid import ANSWERS, CallerIdRequest
from sshd_adopt._internal.slurm.facts import SlurmFacts
from sshd_adopt._internal.slurm.localjobs import user_jobs
from sshd_adopt._internal.slurm.stepd import EXTERN_STEP, StepdConnection
from sshd_adopt.errors import Error, NoSuchProcess, NotAnSshSession, StepdError

#: How often a decision may be revised after failed adoptions (callerid job,
#: then newest, then the failure action): a hard stop against loops.
_MAX_ROUNDS = 4


class Phases:
    """Wall time per phase of one request, for the decision log line."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.spent: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.spent.append((name, (now - self._last) * 1000))
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{name}={ms:.0f}" for name, ms in self.spent)


@dataclass(frozen=True)
class Peer:
    """The client process as the kernel reported it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class BrokerState:
    """Configuration and Slurm facts, swapped as a whole on SIGHUP."""

    config: Config
    slurm: SlurmFacts | None
    slurm_problem: str | None = None


@dataclass(frozen=True)
class AdoptResult:
    """What adopting a session into a job produced."""

    env: dict[str, str]
    adopted: tuple[int, ...]


@dataclass(frozen=True)
class Where:
    """This node as Slurm knows it: its NodeName and spool dir (None: unknown)."""

    nodename: str | None
    spool: str | None

    @classmethod
    def of(cls, state: BrokerState, options: Options) -> Where:
        slurm = state.slurm
        return cls(options.nodename or (slurm.nodename if slurm else None),
                   slurm.spool_dir if slurm else None)


def decide_connection(
    state: BrokerState,
    options: Options,
    where: Where,
    *,
    user: str,
    uid: int,
    connection: Connection | None,
    phases: Phases | None = None,
    ask_source: bool = True,
) -> tuple[dec.LoginFacts, dec.Decision]:
    """Gather the facts for one connection and decide, asking callerid when needed.

    Shared by adoption (the wrapper's request, the sweeper) and the auth-time
    gate, so that who may enter is decided by one piece of code. The gate
    passes ``ask_source=False``: before authentication nothing leaves the
    node, so an undecided :class:`~decision.AskCallerId` comes back as is.
    """
    jobs: tuple[dec.LocalJob, ...] = ()
    if where.nodename and where.spool:
        jobs = user_jobs(where.spool, where.nodename, uid,
                         timeout=state.config.broker.stepd_timeout)
    facts = dec.LoginFacts(user=user, uid=uid, exempt=False,
                           node_known=bool(where.nodename and where.spool), jobs=jobs)
    if phases is not None:
        phases.mark("jobs")
    decision = dec.decide(facts, options)
    if isinstance(decision, dec.AskCallerId) and ask_source:
        facts = replace(facts, callerid=_callerid(state, uid, connection))
        decision = dec.decide(facts, options)
        if phases is not None:
            phases.mark("callerid")
    return facts, decision


def _callerid(state: BrokerState, uid: int, connection: Connection | None) -> dec.CallerIdAnswer:
    """Ask the source host's slurmd, as the connection's user, which job owns this connection."""
    slurm = state.slurm
    if connection is None or slurm is None:
        return dec.CallerIdAnswer(dec.CallerIdOutcome.NO_SOCKET)
    settings = state.config.callerid
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        return dec.CallerIdAnswer(dec.CallerIdOutcome.NO_SOCKET)
    request = CallerIdRequest(
        requester=run.Identity(uid, gid),
        credential=munge.CredentialOptions(
            restrict_uid=slurm.slurmd_user_uid, ttl=slurm.auth_ttl, socket=slurm.auth_socket),
        slurmds=slurm.slurmds,
        protocol_version=slurm.protocol_version,
        deadline=settings.deadline,
        method=settings.method,
        scontrol=settings.scontrol_path,
        munge=settings.munge_path,
    )
    return ANSWERS.query(connection, request)


class AdoptionService:
    """Serve "adopt" requests; one instance per broker, called from worker threads."""

    def __init__(self, state: Callable[[], BrokerState]) -> None:
        self._state = state

    def handle_adopt(self, peer: Peer, overrides: dict[str, str]) -> dict[str, str]:
        """Answer one wrapper: adopt its ssh session or say why not."""
        started = time.monotonic()
        phases = Phases()
        state = self._state()
        log = logger()
        try:
            entry = pwd.getpwuid(peer.uid)
        except KeyError:
            log.error("request from pid %d: uid %d has no passwd entry", peer.pid, peer.uid)
            return protocol.reply(protocol.FAILED, message="unknown user")
        # Root first, before anything that depends on Slurm's configuration,
        # so a broken slurm.conf can never lock root out (as upstream).
        if peer.uid == 0:
            log.info("Ignoring root user (pid %d)", peer.pid)
            return protocol.reply(protocol.ALLOWED)
        user = entry.pw_name
        if state.config.exempt.covers(entry):
            log.info("user %s (pid %d) is exempt: not adopted", user, peer.pid)
            return protocol.reply(protocol.ALLOWED)
        try:
            session = find_session(
                peer.pid,
                peer.uid,
                sshd_executables=frozenset(state.config.slurm.sshd_executables),
            )
        except (NotAnSshSession, NoSuchProcess) as err:
            log.warning(
                "refused request from %s pid %d: not an ssh session: %s", user, peer.pid, err
            )
            return protocol.reply(protocol.DENIED, message="sshd-adopt: not an ssh session")
        options, rejected = apply_overrides(
            state.config.options, overrides, source=f"wrapper pid {peer.pid}"
        )
        for why in rejected:
            log.warning("user %s pid %d: override rejected: %s", user, peer.pid, why)
        phases.mark("session")
        return self._decide_and_adopt(state, options, session, started, phases)

    def adopt_connection(self, session: SshSession) -> dict[str, str]:
        """Decide and adopt a connection the broker found itself (the sweeper's entry).

        Same decision, fallbacks and log line as a wrapper's request, with the
        broker's own options: nobody asked, so there are no overrides.
        """
        state = self._state()
        return self._decide_and_adopt(
            state, state.config.options, session, time.monotonic(), Phases()
        )

    def _decide_and_adopt(
        self,
        state: BrokerState,
        options: Options,
        session: SshSession,
        started: float,
        phases: Phases,
    ) -> dict[str, str]:
        """Run the decision (with callerid and fallbacks) and carry it out."""
        log = logger()
        where = Where.of(state, options)
        facts, decision = decide_connection(
            state, options, where, user=session.user, uid=session.uid,
            connection=session.connection, phases=phases,
        )
        nodename, spool, jobs = where.nodename, where.spool, facts.jobs
        result: AdoptResult | None = None
        failures: list[str] = []
        failed_job: int | None = None
        for _ in range(_MAX_ROUNDS):
            if not isinstance(decision, dec.Adopt):
                break
            try:
                assert nodename is not None and spool is not None
                result = adopt_session(
                    session, spool, nodename, decision.job_id,
                    timeout=state.config.broker.stepd_timeout,
                    want_x11=not options.disable_x11,
                )
                break
            except (StepdError, NoSuchProcess) as err:
                failures.append(f"job {decision.job_id}: {err}")
                failed_job = decision.job_id
                decision = dec.after_adopt_failure(facts, options, decision)
        phases.mark("adopt")
        elapsed_ms = (time.monotonic() - started) * 1000
        self._log_decision(
            session, facts, decision=decision, failures=failures, elapsed_ms=elapsed_ms,
            phases=phases,
        )
        if isinstance(decision, dec.Adopt) and result is not None:
            return protocol.reply(protocol.ADOPTED, job=decision.job_id, env=result.env)
        if isinstance(decision, dec.Deny):
            text = state.config.messages.render(
                decision.message,
                user=session.user,
                node=nodename or "?",
                job=str(failed_job) if failed_job is not None else "-",
                jobs=",".join(str(j.job_id) for j in jobs) or "none",
            )
            if decision.message in (dec.Message.NO_JOBS, dec.Message.UNKNOWN_SOURCE):
                text += _hint(session.user)
            return protocol.reply(protocol.DENIED, message=text)
        if isinstance(decision, dec.Allow):
            return protocol.reply(protocol.ALLOWED)
        log.error("decision loop ended without an outcome for %s", session.user)
        return protocol.reply(protocol.FAILED, message="sshd-adopt: internal error")

    @staticmethod
    def _log_decision(
        session: SshSession,
        facts: dec.LoginFacts,
        *,
        decision: dec.Decision,
        failures: list[str],
        elapsed_ms: float,
        phases: Phases,
    ) -> None:
        """One line per decision: who, from where, what we saw, what we did, why, how long."""
        jobs = ",".join(str(job.job_id) for job in facts.jobs) or "none"
        answer = facts.callerid
        callerid = "not asked"
        if answer is not None:
            label = {
                dec.CallerIdOutcome.MEMBER: f"member of job {answer.job_id}",
                dec.CallerIdOutcome.INDETERMINATE: "job indeterminate",
                dec.CallerIdOutcome.UNREACHABLE: "source unreachable",
                dec.CallerIdOutcome.NOT_A_NODE: "source is not a Slurm node (nothing sent)",
                dec.CallerIdOutcome.NO_SOCKET: "no socket",
            }[answer.outcome]
            callerid = f"{label} via {answer.method or '-'} in {answer.seconds * 1000:.0f}ms"
        outcome = type(decision).__name__.lower()
        job = f" job={decision.job_id}" if isinstance(decision, dec.Adopt) else ""
        failed = f" failures=[{'; '.join(failures)}]" if failures else ""
        reason = getattr(decision, "reason", "")
        logger().info(
            "user=%s uid=%d from=%s pid=%d jobs=%s callerid=%s outcome=%s%s reason=%r%s "
            "time=%.1fms (%s)",
            session.user, session.uid, session.connection or "?", session.peer_pid, jobs,
            callerid, outcome, job, reason, failed, elapsed_ms, phases,
        )


def _hint(user: str) -> str:
    """Where the user's running jobs are and how to get a shell in one ("" if unknown).

    Asked of slurmctld with a short bound: a slow controller must not slow
    the denial down, so the hint is simply left out then.
    """
    jobs = hints.running_jobs_elsewhere(user, timeout=0.5)
    if jobs is None:
        return ""
    return "\n" + hints.format_hint(jobs)


def adopt_session(
    session: SshSession,
    spool_dir: str,
    nodename: str,
    job_id: int,
    *,
    timeout: float,
    want_x11: bool,
) -> AdoptResult:
    """Move the whole connection (monitor, session process, wrapper and children) into the job.

    The monitor goes first: everything forked later inherits its cgroup, and
    pam_slurm_adopt adopts exactly that process. The rest are adopted one by
    one because they already exist. A process that exits meanwhile is an
    expected race and is skipped; the monitor itself must succeed.
    """
    path = os.path.join(spool_dir, f"{nodename}_{job_id}.{EXTERN_STEP}")
    adopted: list[int] = []
    with StepdConnection.open(path, timeout=timeout) as stepd:
        if stepd.step_uid() != session.uid:
            raise StepdError(f"job {job_id} does not belong to uid {session.uid}")
        stepd.add_extern_pid(session.monitor_pid)
        adopted.append(session.monitor_pid)
        for pid in sessions_of_monitor(session.monitor_pid):
            if pid == session.monitor_pid:
                continue
            try:
                stepd.add_extern_pid(pid)
                adopted.append(pid)
            except StepdError as err:
                # A child that exited between listing and adoption is fine;
                # a live one that could not be moved is logged, not fatal:
                # the monitor (its ancestor) is in the job already.
                logger().debug("could not adopt pid %d into job %d: %s", pid, job_id, err)
        env = {"SLURM_JOB_ID": str(job_id)}
        if want_x11:
            display, xauthority = stepd.x11_display()
            if display:
                env["DISPLAY"] = f"localhost:{display}.0"
                if xauthority:
                    env["XAUTHORITY"] = xauthority
    if not still_alive(session):
        raise NoSuchProcess("the session ended during adoption")
    for pid in adopted:
        logger().debug("Process %d adopted into job %d", pid, job_id)
    return AdoptResult(env=env, adopted=tuple(adopted))



__all__ = ["AdoptionService", "BrokerState", "Error", "Peer", "adopt_session"]
