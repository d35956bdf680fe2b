"""Adoption: put an authenticated connection into the user's job, early, and make sure of it.

**Early, off the login's critical path.** sshd forks a connection's
post-authentication child only once authentication has succeeded, and that child
then takes the user's uid. The broker sees that uid change on the proc connector and
adopts the monitor and the child right then (:meth:`Adoption.authenticated`), before
the session has run anything: whatever it forks later -- the user's shell, their rc
files, the wrapper, a forwarding-only connection's nothing -- is born in the job.
Never earlier: the monitor's ``sshd: <user> [priv]`` title exists before
authentication, and anyone holding a public key could otherwise park processes in a
job. The callerid RPC, for users with several jobs here, starts at that moment too.

**The wrapper is the barrier.** A connection adopted early gets a session ticket
(:class:`~sshd_adopt._internal.core.ports.Tickets`): the reply the wrapper would get,
which it reads instead of asking. Otherwise the ForceCommand's request
(:meth:`Adoption.request`) waits for the early result, moves whatever of its session
is not in the job yet, and returns the job and its environment. Without an early
result (no proc connector, an event lost) it adopts the connection itself, as before.
Per-``Match`` options from the ForceCommand line (tighten-only) are applied to the
early facts: a stricter policy can still refuse or choose another job.

Connections sshd does not send through sshd-adopt (its ``Match`` block) are never
touched here: sshd is asked (:mod:`sshd_adopt._internal.node.sshdconfig`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sshd_adopt._internal.config import apply_overrides
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.login import LoginCore, Settled, describe_callerid
from sshd_adopt._internal.core.options import Options
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Failed, Outcome
from sshd_adopt._internal.core.ports import ExternSteps, Tickets
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import Phases, logger
from sshd_adopt._internal.node import cgroups, procfs, signals
from sshd_adopt._internal.node.sessions import (
    Authenticated,
    SshSession,
    find_session,
    monitor_user,
    sessions_of_monitor,
    still_alive,
    verify_authenticated,
)
from sshd_adopt._internal.node.sshdconfig import ManagedQuery, SshdConfigError
from sshd_adopt._internal.services.holds import Holds
from sshd_adopt.errors import NoSuchProcess, NotAnSshSession, ProcError, StepdError

#: Passes over a just-adopted connection for processes forked during its adoption.
CATCH_UP_ROUNDS: Final = 3
#: How long an early result is kept after its monitor was last seen (seconds).
RECORD_TTL: Final = 3600.0
_MAX_RECORDS: Final = 65536


@dataclass(frozen=True)
class Peer:
    """A client process as the kernel reported it (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Decided:
    """An early outcome and the policy it was decided under."""

    settled: Settled
    options: Options


@dataclass
class Early:
    """What early adoption made of one connection (filled in when ``done`` is set)."""

    created: float
    done: threading.Event = field(default_factory=threading.Event)
    managed: bool = True
    decided: Decided | None = None
    account: Account | None = None
    connection: Connection | None = None
    # the latest outcome for this connection (early, then the wrapper's) and when
    latest: tuple[Outcome, float] | None = None


class Adoption:
    """Early adoption and the wrapper's requests (thread-safe)."""

    def __init__(self, state: Callable[[], BrokerState], core: LoginCore, *,
                 steps: ExternSteps, managed: ManagedQuery, netns: str,
                 tickets: Tickets | None = None,
                 job_named: cgroups.JobNamer = cgroups.no_sluids,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._job_named = job_named
        self._core = core
        self._steps = steps
        self._tickets = tickets
        #: Warms the kernel's cgroup-migration path (set by the broker when it can).
        self.warm: Callable[[], None] | None = None
        self._managed = managed
        self._netns = netns
        self._clock = clock
        self._lock = threading.Lock()
        self._early: dict[tuple[int, float], Early] = {}
        #: Which connections the watcher holds still until they are decided.
        self.holds = Holds()

    # ------------------------------------------------------------------ early

    def authenticated(self, monitor_pid: int, monitor_start: float, child_pid: int, *,
                      held: bool = False) -> None:
        """A tracked monitor's child took a user's uid: adopt the connection now if it is one.

        Called from a worker thread, straight after the proc connector's event. ``held``:
        the watcher stopped the child (:mod:`.holds`); it is continued once decided,
        unless the connection is ended.
        """
        ended = False
        if held:
            logger().debug("early: child %d of %d held until decided", child_pid, monitor_pid)
        try:
            ended = self._authenticated(monitor_pid, monitor_start, child_pid)
        finally:
            if held and not ended:
                signals.release(child_pid)

    def _authenticated(self, monitor_pid: int, monitor_start: float, child_pid: int) -> bool:
        """The early decision; True when the connection was ended."""
        phases = Phases()
        state = self._state()
        try:
            auth = verify_authenticated(
                monitor_pid, monitor_start, child_pid,
                executables=frozenset(state.config.sshd.executables), netns=self._netns)
        except (NotAnSshSession, ProcError) as err:
            logger().debug("early: child %d of %d: not an authenticated session: %s",
                           child_pid, monitor_pid, err)
            return False
        record = self._record(monitor_pid, monitor_start)
        if record is None:
            return False  # this connection was seen already
        account = self._core.accounts.by_uid(auth.uid)
        try:
            if account is None or not self._is_managed(auth, account):
                record.managed = False
                return False
            record.account, record.connection = account, auth.connection
            phases.mark("verify")
            if self._core.exempt(account):
                return False
            settled = self._core.settle(
                account, auth.connection, lambda: [monitor_pid, *self._members(monitor_pid)],
                state.config.options, phases=phases)
            record.decided = Decided(settled, state.config.options)
            record.latest = (settled.outcome, self._clock())
            ended = self._after(auth, account, settled)
            log_decision("early", account, auth.connection, pid=child_pid, settled=settled,
                         phases=phases)
            return ended
        finally:
            record.done.set()

    def key_check(self, monitor_pid: int, monitor_start: float) -> None:
        """A followed monitor took a user's effective uid before authentication ended (a
        key check): ask sshd about this user's connection. If it is managed, an adoption
        may follow within milliseconds -- warm the cgroup-migration path for it; and tell
        :attr:`holds` whether the user may come in without a key (nothing is decided or
        done for the connection). Unknown counts as keyless, for this connection only."""
        listener_pid = 0
        keyless, known = True, False
        try:
            monitor = procfs.proc_info(monitor_pid)
            user = monitor_user(monitor.title)
            listener_pid = monitor.ppid
            if monitor.start_time != monitor_start or user is None:
                return
            listener = procfs.proc_info(monitor.ppid)
            connection = procfs.connection_of(monitor_pid)
            answer = self._managed.query(listener, user, connection)
            # Behind the PAM gate sshd itself refuses a user without a job before
            # authentication succeeds: nothing to doom or hold (a kill would only cut
            # sshd's own log line of the refusal).
            keyless = answer.managed and bool(answer.keyless) and not answer.gated
            known = True
            if answer.managed and self.warm is not None:
                self.warm()
            if keyless:
                self._doom_if_refused(monitor_pid, listener_pid, user, connection)
        except (ProcError, SshdConfigError) as err:
            logger().debug("key check of monitor %d: %s", monitor_pid, err)
        finally:
            if self.holds.checked(monitor_pid, listener_pid, keyless=keyless, known=known):
                self._after_stopped(monitor_pid)

    def _after_stopped(self, monitor_pid: int) -> None:
        """The watcher stopped this monitor as authentication completed, waiting for the
        key check just answered: kill the connection if it is doomed, else continue it."""
        why = self.holds.doomed(monitor_pid)
        if why is None:
            signals.release(monitor_pid)
            return
        killed = signals.kill_connection(monitor_pid, [monitor_pid,
                                                       *self._members(monitor_pid)])
        self.doomed_ended(monitor_pid, why, killed)

    def _doom_if_refused(self, monitor_pid: int, listener_pid: int, user: str,
                         connection: Connection | None) -> None:
        """A user who may come in without a key, and whom the decision refuses before
        any source job is asked (no job here, for one): the connection is ended the
        moment authentication completes (:mod:`.holds`). Nothing is done for it now."""
        account = self._core.accounts.by_name(user)
        if account is None or self._core.exempt(account):
            return
        options = self._state().config.options
        _facts, decision = self._core.gather(account, connection, options, ask_source=False)
        if isinstance(decision, dec.Deny):
            self.holds.doom(monitor_pid, decision.reason, listener_pid)

    @staticmethod
    def doomed_ended(monitor_pid: int, why: str, pids: list[int]) -> None:
        """The watcher killed a doomed connection at authentication: say so (worker)."""
        logger().warning("early: monitor=%d ended as authentication completed (%s): SIGKILL "
                         "sent to %s", monitor_pid, why, sorted(pids)[:20])

    def in_flight(self, monitor_pid: int, monitor_start: float) -> bool:
        """Whether an early adoption of this connection is still being decided (the sweeper
        leaves such a connection to it)."""
        with self._lock:
            record = self._early.get((monitor_pid, monitor_start))
        return record is not None and not record.done.is_set()

    def decision(self, monitor_pid: int, monitor_start: float) -> tuple[Outcome, float] | None:
        """The latest outcome for this connection (early, or the wrapper's) and when it was
        reached (this service's clock, seconds); None when there is none yet."""
        with self._lock:
            record = self._early.get((monitor_pid, monitor_start))
        return record.latest if record is not None else None

    def _remember(self, monitor_pid: int, monitor_start: float, outcome: Outcome) -> None:
        now = self._clock()
        with self._lock:
            record = self._early.get((monitor_pid, monitor_start))
            if record is None and len(self._early) < _MAX_RECORDS:
                record = self._early[(monitor_pid, monitor_start)] = Early(now)
                record.done.set()
            if record is not None:
                record.latest = (outcome, now)

    def monitor_gone(self, monitor_pid: int) -> None:
        """The proc connector saw a monitor exit: its early result is of no more use."""
        self.holds.forget(monitor_pid)
        with self._lock:
            keys = [k for k in self._early if k[0] == monitor_pid]
            for key in keys:
                del self._early[key]
        if keys and self._tickets is not None:
            self._tickets.revoke(monitor_pid)

    def _record(self, monitor_pid: int, monitor_start: float) -> Early | None:
        """A new record for this connection, or None when it has one already."""
        now = self._clock()
        key = (monitor_pid, monitor_start)
        with self._lock:
            if key in self._early:
                return None
            if len(self._early) >= _MAX_RECORDS:
                self._early = {k: v for k, v in self._early.items()
                               if now - v.created < RECORD_TTL}
            record = self._early[key] = Early(now)
            return record

    def _is_managed(self, auth: Authenticated, account: Account) -> bool:
        try:
            listener = procfs.proc_info(auth.monitor.ppid)
            return self._managed.managed(listener, account.name, auth.connection)
        except (SshdConfigError, ProcError) as err:
            logger().warning("early: cannot tell whether %s's connection is managed (%s); "
                             "left to the wrapper and the sweeper", account.name, err)
            return False

    def _keyless(self, auth: Authenticated, account: Account) -> tuple[str, ...] | None:
        """The ways ``account`` may have logged in without a key entry (hostbased,
        GSSAPI...), None when publickey is the only one. Unknown counts as keyless."""
        try:
            listener = procfs.proc_info(auth.monitor.ppid)
            return self._managed.keyless(listener, account.name, auth.connection) or None
        except (SshdConfigError, ProcError) as err:
            return (f"(unknown: {err})",)

    @staticmethod
    def _members(monitor_pid: int) -> list[int]:
        try:
            return procfs.descendants(monitor_pid)
        except NoSuchProcess:
            return []

    def _after(self, auth: Authenticated, account: Account, settled: Settled) -> bool:
        """What follows an early outcome: OOM score, or an end before user code runs
        (True: ended)."""
        outcome = settled.outcome
        if isinstance(outcome, Adopted):
            self._catch_up(outcome.job, account, auth.monitor.pid)
            # All of the session, not only the child: the shell may be forked already
            # (OpenSSH 10), and with a ticket the wrapper asks nobody to fix it later.
            set_task_oom_score(*self._members(auth.monitor.pid))
            if self._tickets is not None:
                self._tickets.issue(auth.monitor.pid, account, outcome)
        elif isinstance(outcome, Denied):
            keyless = self._keyless(auth, account)
            if keyless is None and tells_why(self._state(), account):
                return False  # a restricted key let it in: the wrapper says why
            # Ended before it forks anything: this user's shell runs startup files for
            # `-c` before the wrapper could say anything, or the login may have come in
            # by a method that met no key entry (no `restrict`: forwarding would work).
            how = f"; may log in by {' '.join(keyless)}" if keyless else ""
            members = self._members(auth.monitor.pid)
            signals.end_at_authentication(
                auth.monitor.pid, members or [auth.child.pid],
                kill_after=self._state().config.sweeper.kill_after,
                why=f"early: user={account.name} monitor={auth.monitor.pid} "
                    f"may not be here ({outcome.reason}{how})")
            return True
        return False

    def _catch_up(self, job: int, account: Account, monitor_pid: int) -> None:
        """Move what the session forked while it was being adopted.

        OpenSSH 10 forks the user's shell about a millisecond after authentication,
        while the first move of a burst still waits for the kernel (an RCU grace
        period, ~10 ms): a shell forked before its parent moved stays outside. Moved
        right now, it costs a fraction of a millisecond (the grace period is still
        fresh); left to the wrapper's request, it would cost the whole period again.
        """
        node = self._state().nodename or ""
        for _ in range(CATCH_UP_ROUNDS):
            missing = cgroups.outside_of(job, monitor_pid, self._members(monitor_pid), node,
                                         self._job_named)
            if not missing:
                return
            try:
                self._steps.join(job, account.uid, missing, want_x11=False)
            except (StepdError, NoSuchProcess) as err:
                logger().debug("early: catching up %s into job %d: %s", missing, job, err)
                return

    # ------------------------------------------------------------------ the wrapper

    def request(self, peer: Peer, overrides: dict[str, str]) -> Outcome:
        """Answer one wrapper: make sure its session is in the user's job, or say why not."""
        started = self._clock()
        phases = Phases()
        state = self._state()
        account = self._core.accounts.by_uid(peer.uid)
        if account is None:
            logger().error("request from pid %d: uid %d has no passwd entry", peer.pid, peer.uid)
            return Failed("unknown user")
        # Root first, before anything that depends on Slurm's configuration, so a broken
        # slurm.conf can never lock root out (as upstream).
        if account.uid == 0:
            logger().info("Ignoring root user (pid %d)", peer.pid)
            return Allowed("root is never adopted")
        if self._core.exempt(account):
            logger().info("user %s (pid %d) is exempt: not adopted", account.name, peer.pid)
            return Allowed("exempt user")
        try:
            session = find_session(peer.pid, peer.uid,
                                   sshd_executables=frozenset(state.config.sshd.executables))
        except (NotAnSshSession, ProcError) as err:  # gone, or an ancestor we may not read
            logger().warning("refused request from %s pid %d: not an ssh session: %s",
                             account.name, peer.pid, err)
            return Denied(dec.Message.NOT_AN_SSH_SESSION, str(err), account.name)
        options, rejected = apply_overrides(state.config.options, overrides,
                                            source=f"wrapper pid {peer.pid}")
        for why in rejected:
            logger().warning("user %s pid %d: override rejected: %s", account.name, peer.pid, why)
        phases.mark("session")
        early = self._wait_early(session, started)
        phases.mark("early")
        decided = early.decided if early is not None else None
        if decided is not None:
            settled = self._confirm(account, session, decided, options, phases)
        else:
            settled = self._core.settle(account, session.connection,
                                        lambda: sessions_of_monitor(session.monitor_pid),
                                        options, phases=phases)
        outcome = settled.outcome
        if isinstance(outcome, Adopted):
            if not still_alive(session):
                outcome = Failed("the session ended during adoption")
            else:
                set_task_oom_score(*session.chain[1:])
        self._remember(session.monitor_pid, session.monitor_start, outcome)
        log_decision("request", account, session.connection, pid=peer.pid, settled=settled,
                     phases=phases, outcome=outcome, early=decided is not None)
        return outcome

    def _wait_early(self, session: SshSession, started: float) -> Early | None:
        """The early result of this connection, once it is there (None: there is none)."""
        with self._lock:
            record = self._early.get((session.monitor_pid, session.monitor_start))
        if record is None:
            return None
        left = self._state().config.broker.decision_deadline - (self._clock() - started) - 0.5
        if not record.done.wait(max(0.0, left)):
            logger().warning("early adoption of monitor %d still running; adopting on request",
                             session.monitor_pid)
            return None
        return record if record.managed else None

    def _confirm(self, account: Account, session: SshSession, decided: Decided,
                 options: Options, phases: Phases) -> Settled:
        """The early outcome, under this request's options, with the whole session in it."""
        early, early_options = decided.settled, decided.options
        outcome = early.outcome
        if options != early_options and (
                options.disable_x11 != early_options.disable_x11
                or dec.decide(early.facts, options) != dec.decide(early.facts, early_options)):
            # A stricter ForceCommand line than the broker's own policy decides otherwise
            # (or wants no X11 forwarding from the job): decide again on the same facts
            # (no second callerid RPC).
            return self._core.settle(account, session.connection,
                                     lambda: sessions_of_monitor(session.monitor_pid),
                                     options, facts=early.facts, phases=phases)
        if isinstance(outcome, Adopted):
            node = self._state().nodename or ""
            missing = cgroups.outside_of(outcome.job, session.monitor_pid, session.chain[1:],
                                         node, self._job_named)
            if missing:
                try:
                    self._steps.join(outcome.job, account.uid, missing,
                                     want_x11=not options.disable_x11)
                except (StepdError, NoSuchProcess) as err:
                    logger().warning("user %s: %s not adopted into job %d: %s",
                                     account.name, missing, outcome.job, err)
            phases.mark("confirm")
        return early


def tells_why(state: BrokerState, account: Account) -> bool:
    """Whether a refused ``account`` is told why by the wrapper, with no code of theirs run.

    True for the shells that run no startup file for ``-c`` under the drop-in's
    ``SetEnv SHLVL=1`` (``admission.message_shells``), with ``on_deny = "message"``.
    """
    settings = state.config.admission
    return settings.on_deny == "message" and (
        account.shell.rsplit("/", 1)[-1] in settings.message_shells)


def set_task_oom_score(*pids: int) -> None:
    """Give session processes the OOM score a job task gets, not sshd's (sites run it at -1000,
    which would make a memory hog in the session the one process the job's OOM killer
    cannot choose)."""
    for pid in pids:
        try:
            if cgroups.oom_score_adj(pid) != cgroups.TASK_OOM_SCORE_ADJ:
                cgroups.set_oom_score_adj(pid, cgroups.TASK_OOM_SCORE_ADJ)
        except ProcError as err:
            logger().debug("oom_score_adj of %d: %s", pid, err)


def log_decision(source: str, account: Account, connection: Connection | None, *, pid: int,
                 settled: Settled, phases: Phases, outcome: Outcome | None = None,
                 early: bool = False) -> None:
    """One line per decision: who, from where, what was seen, what was done, why, how long."""
    facts, decision = settled.facts, settled.decision
    result = outcome if outcome is not None else settled.outcome
    jobs = ",".join(str(job.job_id) for job in facts.jobs) or "none"
    kind = {Adopted: "adopt", Allowed: "allow", Denied: "deny", Failed: "failed"}[type(result)]
    job = f" job={result.job}" if isinstance(result, Adopted) else ""
    failed = f" failures=[{'; '.join(settled.failures)}]" if settled.failures else ""
    logger().info(
        "%suser=%s uid=%d from=%s pid=%d jobs=%s callerid=%s outcome=%s%s reason=%r%s%s (%s)",
        "early: " if source == "early" else "", account.name, account.uid, connection or "?",
        pid, jobs, describe_callerid(facts.callerid), kind, job, getattr(decision, "reason", ""),
        failed, " early=used" if early else "", phases)
