"""The node's extern steps, kept by events: who has a job here, answered without asking.

A login needs "which jobs does this user have on this node" twice before its command
runs (admission, adoption). Asking every slurmstepd each time costs a round trip per
job; the table instead follows the spool directory and the stepds:

* a new ``<NodeName>_<job>.4294967292`` socket (inotify ``IN_CREATE``): its stepd is
  asked once for the owner and its own pid (which dates the step: "newest");
* a socket removed (``IN_DELETE``), or the stepd process exiting (proc connector
  ``EXIT``, which also catches a stepd that crashed and left its socket behind):
  the job is gone;
* :meth:`JobTable.reconcile`, periodically and at start: the whole directory, every
  stepd asked (bounded by one deadline however many hang).

Whoever holds the table is told when a user gets their first job here or loses their
last (:data:`Change`): admission keeps its key entries by that. A lookup that finds
no job for a user first looks for sockets the table has not seen yet (a directory
listing, no stepd asked twice), so a job that started a moment ago is never missed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.slurm.localjobs import ExternStep, query_step, scan_extern_steps
from sshd_adopt._internal.slurm.stepd import EXTERN_STEP, list_extern_steps, socket_name_pattern
from sshd_adopt.errors import StepdError, StepdUnavailable

#: A new socket whose stepd does not answer yet is asked again for this long (seconds).
SETTLE_TIME: Final = 5.0
#: A SLUID no stepd here told is not looked for again for this long (seconds): the
#: sweeper asks once per process, and a look for new sockets may ask their stepds.
UNKNOWN_SLUID_TIME: Final = 5.0

#: ``on_change(uid, has_jobs)``: the uid got its first job here (True) or lost its last.
Change = Callable[[int, bool], None]


@dataclass
class _Pending:
    path: str
    since: float


class JobTable:
    """The extern steps of this node, by job id (thread-safe)."""

    def __init__(self, state: Callable[[], BrokerState], on_change: Change | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._state = state
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._steps: dict[int, ExternStep] = {}
        self._pending: dict[str, _Pending] = {}
        self._unknown_sluids: dict[str, float] = {}  # name -> when last looked for

    # ------------------------------------------------------------------ queries

    def jobs_of(self, uid: int) -> tuple[LocalJob, ...]:
        """``uid``'s jobs with a live extern step here, by job id.

        A step whose socket is gone is dropped on the way; with no job found, sockets
        not seen yet are looked for first (see the module doc).
        """
        jobs = self._live_jobs_of(uid)
        if not jobs and self.catch_up():
            jobs = self._live_jobs_of(uid)
        return jobs

    def _live_jobs_of(self, uid: int) -> tuple[LocalJob, ...]:
        with self._lock:
            mine = [step for step in self._steps.values() if step.uid == uid]
        live = []
        for step in mine:
            if os.path.lexists(step.path):
                live.append(LocalJob(step.job_id, step.started))
            else:
                self._drop(step.job_id, "socket gone")
        return tuple(sorted(live, key=lambda job: job.job_id))

    def users(self) -> frozenset[int]:
        """Every uid with at least one extern step here."""
        with self._lock:
            return frozenset(step.uid for step in self._steps.values())

    def steps(self) -> tuple[ExternStep, ...]:
        with self._lock:
            return tuple(sorted(self._steps.values(), key=lambda step: step.job_id))

    def job_of_cgroup(self, name: str) -> int | None:
        """The job whose cgroup is named ``name`` by its SLUID (Slurm 26.05, cgroup/v2),
        else None. A name the table does not know makes it look for new sockets (a job
        that started a moment ago), at most once per :data:`UNKNOWN_SLUID_TIME` per name
        (another node's job, on a hierarchy several slurmds share, is never known)."""
        for attempt in range(2):
            with self._lock:
                for step in self._steps.values():
                    if step.sluid == name:
                        self._unknown_sluids.pop(name, None)
                        return step.job_id
                now = self._clock()
                last = self._unknown_sluids.get(name)
                if attempt or (last is not None and now - last < UNKNOWN_SLUID_TIME):
                    return None
                self._unknown_sluids = {other: when for other, when
                                        in self._unknown_sluids.items()
                                        if now - when < UNKNOWN_SLUID_TIME}
                self._unknown_sluids[name] = now
            self.catch_up()
        return None

    def sluid_of(self, job: int) -> str | None:
        """The SLUID of ``job`` here, if its stepd told one (Slurm >= 25.11)."""
        with self._lock:
            step = self._steps.get(job)
            return step.sluid if step is not None else None

    def stepd_pids(self) -> frozenset[int]:
        with self._lock:
            return frozenset(s.daemon_pid for s in self._steps.values() if s.daemon_pid)

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    # ------------------------------------------------------------------ events

    def socket_appeared(self, name: str) -> None:
        """A name was created in (or moved into) the spool directory."""
        path = self._path_of(name)
        if path is not None:
            with self._lock:
                self._pending.setdefault(path, _Pending(path, self._clock()))
            self.settle_pending()

    def socket_vanished(self, name: str) -> None:
        """A name was removed from (or moved out of) the spool directory."""
        job = self._job_of(name)
        if job is not None:
            with self._lock:
                self._pending.pop(self._path_of(name) or "", None)
            self._drop(job, "socket removed")

    def process_exited(self, pid: int) -> None:
        """A process ended; if it was an extern stepd, its job is gone."""
        with self._lock:
            jobs = [s.job_id for s in self._steps.values() if s.daemon_pid == pid]
        for job in jobs:
            self._drop(job, f"stepd {pid} exited")

    def settle_pending(self) -> None:
        """Ask the stepds of new sockets; keep asking those not listening yet, a while."""
        with self._lock:
            pending = list(self._pending.values())
        timeout = self._state().config.broker.stepd_timeout
        for item in pending:
            try:
                step = query_step(item.path, timeout=timeout)
            except StepdUnavailable:
                if self._clock() - item.since > SETTLE_TIME:
                    with self._lock:
                        self._pending.pop(item.path, None)
                continue
            except StepdError as err:
                logger().warning("job table: %s", err)
                with self._lock:
                    self._pending.pop(item.path, None)
                continue
            with self._lock:
                self._pending.pop(item.path, None)
            self._add(step)

    def catch_up(self) -> bool:
        """Ask the stepds of sockets in the spool dir the table has not seen; True if any."""
        state = self._state()
        if state.nodename is None or state.spool_dir is None:
            return False
        try:
            sockets = list_extern_steps(state.spool_dir, state.nodename)
        except StepdError:
            return False
        with self._lock:
            known = {step.path for step in self._steps.values()}
            new = [s.path for s in sockets if s.path not in known]
            for path in new:
                self._pending.setdefault(path, _Pending(path, self._clock()))
        if new:
            self.settle_pending()
        return bool(new)

    def reconcile(self) -> None:
        """Replace the table with what every stepd in the spool dir says now."""
        state = self._state()
        if state.nodename is None or state.spool_dir is None:
            found: tuple[ExternStep, ...] = ()
        else:
            found, problems = scan_extern_steps(
                state.spool_dir, state.nodename, timeout=state.config.broker.stepd_timeout)
            for problem in problems:
                if not problem.stale:
                    logger().warning("job table: %s", problem)
        fresh = {step.job_id: step for step in found}
        with self._lock:
            gone = [job for job in self._steps if job not in fresh]
            added = [step for job, step in fresh.items() if job not in self._steps]
        for job in gone:
            self._drop(job, "not found by the reconcile")
        for step in added:
            self._add(step)

    # ------------------------------------------------------------------ internals

    def _add(self, step: ExternStep) -> None:
        with self._lock:
            first = all(s.uid != step.uid for s in self._steps.values())
            self._steps[step.job_id] = step
        logger().debug("job table: job %d of uid %d (stepd %s)", step.job_id, step.uid,
                       step.daemon_pid)
        if first and self._on_change is not None:
            self._on_change(step.uid, True)

    def _drop(self, job: int, why: str) -> None:
        with self._lock:
            step = self._steps.pop(job, None)
            last = step is not None and all(s.uid != step.uid for s in self._steps.values())
        if step is None:
            return
        logger().debug("job table: job %d of uid %d gone (%s)", job, step.uid, why)
        if last and self._on_change is not None:
            self._on_change(step.uid, False)

    def _job_of(self, name: str) -> int | None:
        """The job of an extern-step socket name of this node (the names
        :func:`~sshd_adopt._internal.slurm.stepd.list_extern_steps` lists), else None."""
        nodename = self._state().nodename
        found = socket_name_pattern(nodename).match(name) if nodename is not None else None
        if found is None or int(found.group(2)) != EXTERN_STEP:
            return None
        return int(found.group(1))

    def _path_of(self, name: str) -> str | None:
        spool = self._state().spool_dir
        if spool is None or self._job_of(name) is None:
            return None
        return os.path.join(spool, name)
