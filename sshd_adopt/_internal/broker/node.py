"""This node, wired: the login core over the real ports, and the parts that keep watch.

The only place that knows every part: the job table, the stepd and callerid clients,
the login core over them, the three services side by side (admission, adoption, the
sweeper), the event watcher that feeds them, and the guardian that closes the doors
if the broker dies. The server asks it to start before the socket accepts anything
(the key entries are rebuilt from the node's jobs first) and to stop after the last
answer.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from sshd_adopt._internal import protocol
from sshd_adopt._internal.broker.guardian import Guardian
from sshd_adopt._internal.broker.replies import TicketDesk
from sshd_adopt._internal.broker.tickets import SessionTickets
from sshd_adopt._internal.broker.watcher import Watcher
from sshd_adopt._internal.core.accounts import Accounts
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.cgroupwarm import MigrationWarmer, start_warmer
from sshd_adopt._internal.node.keyentries import UnsafeDirectory
from sshd_adopt._internal.node.sshdconfig import ManagedQuery
from sshd_adopt._internal.services.admission import Admission, entries_of
from sshd_adopt._internal.services.adoption import Adoption
from sshd_adopt._internal.services.spawning import Spawner
from sshd_adopt._internal.services.sweeper import Sweeper
from sshd_adopt._internal.slurm.callerid import SourceJobs
from sshd_adopt._internal.slurm.extern import ExternStepClient
from sshd_adopt._internal.slurm.jobtable import JobTable


class Node:
    """Every part of the broker but the socket."""

    def __init__(self, state: Callable[[], BrokerState], pool: Executor) -> None:
        self.state = state
        netns = procfs.own_netns()
        self.table = JobTable(state, on_change=self._jobs_changed)
        steps = ExternStepClient(state)
        self.core = LoginCore(state, jobs=self.table, source=SourceJobs(state), steps=steps,
                              accounts=Accounts())
        managed = ManagedQuery(present_file=lambda: state().config.admission.present_file)
        self.tickets = TicketDesk(
            SessionTickets(protocol.sessions_dir(state().config.broker.socket_path)), state,
            sluid_of=self.table.sluid_of)
        self.admission = Admission(state, self.core, netns)
        self.adoption = Adoption(state, self.core, steps=steps, managed=managed, netns=netns,
                                 tickets=self.tickets, job_named=self.table.job_of_cgroup)
        self.spawner = Spawner(state, self.core, decisions=self.adoption, steps=steps,
                               job_named=self.table.job_of_cgroup)
        steps.namespaces_usable = self.spawner.ready
        self.sweeper = Sweeper(state, self.core, steps=steps, managed=managed, netns=netns,
                               decisions=self.adoption, job_named=self.table.job_of_cgroup)
        self.watcher = Watcher(state, table=self.table, adoption=self.adoption,
                               sweeper=self.sweeper, pool=pool)
        self.guardian: Guardian | None = None
        self.warmer: MigrationWarmer | None = None

    def events(self) -> str:
        """How the node learns of processes: "proc connector", or "none: <why>"."""
        problem = self.watcher.connector_problem
        return "proc connector" if problem is None else f"none: {problem}"

    def start(self) -> None:
        """Check the entry directories, start the guardian, rebuild the entries, watch.

        Raises :class:`~sshd_adopt._internal.node.keyentries.UnsafeDirectory` (naming the
        directory) when the entry or ticket directories are not root's alone: the
        broker must not start then.
        """
        state = self.state()
        entries = entries_of(state)
        entries.prepare()
        self.tickets.tickets.prepare()
        self.tickets.tickets.wipe()
        self.guardian = Guardian(entries)
        adoption = state.config.adoption
        if adoption.early and adoption.warm and state.config.broker.proc_events:
            self.warmer = start_warmer(state.nodename or "node", self.guardian.pid)
            self.adoption.warm = self.warmer.warm if self.warmer is not None else None
        if state.slurm is not None and state.slurm.job_namespaces and \
                state.config.options.join_container and self.spawner.problem is not None:
            logger().warning("jobs here have namespaces (%s), but sessions will not enter them: "
                             "%s (see docs/job-namespaces.md)", state.slurm.namespace_plugin,
                             self.spawner.problem)
        self.table.reconcile()
        made = self.admission.rebuild(self.table.users())
        logger().info("key entries rebuilt in %s: %d user(s) may enter by them", entries.keys_dir,
                      made)
        self.watcher.start(proc_events=state.config.broker.proc_events)
        if state.config.sweeper.enabled:
            self.sweeper.start()

    def stop(self) -> None:
        """Stop watching and remove every entry: nobody may enter by them any more."""
        self.watcher.stop()
        self.sweeper.stop()
        self.admission.wipe()
        self.tickets.tickets.wipe()
        if self.guardian is not None:
            self.guardian.release()
            self.guardian = None
        if self.warmer is not None:
            self.warmer.close()
            self.warmer = None

    def reloaded(self, old: BrokerState) -> None:
        """After SIGHUP: entries moved or retargeted by the new configuration are made again
        (and all removed when keys now come from ``admission.keys_command``)."""
        before, after = entries_of(old), entries_of(self.state())
        by_command = (old.config.admission.keys_command.strip(),
                      self.state().config.admission.keys_command.strip())
        if before == after and bool(by_command[0]) == bool(by_command[1]):
            return
        moved = (before.keys_dir, before.principals_dir) != (after.keys_dir, after.principals_dir)
        if moved:
            before.wipe()
        try:
            self.admission.rebuild(self.table.users())
        except UnsafeDirectory as err:
            logger().error("key entries not made: %s (users enter through the command gate "
                           "until this is fixed and the broker reloaded)", err)
            return
        if moved and self.guardian is not None:
            self.guardian.release()
            self.guardian = Guardian(after)
            if self.warmer is not None:
                self.warmer.follow(self.guardian.pid)

    def _jobs_changed(self, uid: int, has_jobs: bool) -> None:
        self.admission.jobs_changed(uid, has_jobs)
        self.adoption.holds.jobs_changed(uid)
