"""Which jobs have a live extern step on this node, and whose they are.

The only authority is the stepds themselves: a socket file in the spool dir
may be stale (a 24.11.5 stepd that segfaulted leaves it behind, 2411-lab §7),
so a job counts only if its stepd answers. All sockets are queried in
parallel under one shared deadline, because a login waits for this: with
twenty jobs on a node and one hung stepd, a per-socket timeout would add up,
a shared deadline does not.

"Started" is the creation time of the extern stepd process (DAEMON_PID), which
is when the extern step really started. Upstream 22.05 uses the mtime of a
cgroup directory (wrong path on Debian's multi-slurmd build, and bumped by
any change inside it) and 26.05 the ctime of the socket file; both can say
"newest" about a job that did not start last (reference §1.5). The socket
ctime remains the fallback when /proc cannot tell.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import psutil

from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.slurm.stepd import (
    EXTERN_STEP,
    StepdConnection,
    StepSocket,
    list_extern_steps,
)
from sshd_adopt.errors import StepdError, StepdUnavailable


@dataclass(frozen=True)
class StepProblem:
    """A step socket that could not be queried (stale, hung, garbled); for the log."""

    job_id: int
    path: str
    error: StepdError

    @property
    def stale(self) -> bool:
        """True for "step gone or hung" (expected now and then), False for real faults."""
        return isinstance(self.error, StepdUnavailable)

    def __str__(self) -> str:
        return f"job {self.job_id}: {self.error}"


@dataclass(frozen=True)
class ExternStep:
    """A live extern step: its job, the job owner and when the step started."""

    job_id: int
    uid: int
    started: float  # seconds since the epoch
    daemon_pid: int | None  # None if uid did not match and we did not ask
    path: str
    #: the job's SLUID (Slurm >= 25.11), which names its cgroup on 26.05's cgroup/v2
    sluid: str | None = None


ProblemCallback = Callable[[StepProblem], None]


def _started(path: str, daemon_pid: int) -> float:
    """Creation time of the stepd process, else the socket's ctime, else 0."""
    try:
        return psutil.Process(daemon_pid).create_time()
    except psutil.Error:
        pass
    try:
        return os.lstat(path).st_ctime
    except OSError:
        return 0.0


def _query(sock: StepSocket, deadline: float, want_uid: int | None) -> ExternStep | None:
    """Ask one stepd for its uid (and, if it is wanted, its pid) before ``deadline``.

    Returns None for a step of another user when ``want_uid`` is given, so
    that foreign steps cost one request, not two.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise StepdUnavailable(f"{sock.path}: not queried, the deadline had passed")
    with StepdConnection.open(sock.path, timeout=left) as stepd:
        uid = stepd.step_uid()
        if want_uid is not None and uid != want_uid:
            return None
        pid = stepd.daemon_pid()
        try:  # only names the job's cgroup on 26.05's cgroup/v2: never worth losing the job
            sluid = stepd.sluid()
        except StepdError:
            sluid = None
    return ExternStep(sock.job_id, uid, _started(sock.path, pid), pid, sock.path, sluid)


def query_step(path: str, *, timeout: float) -> ExternStep:
    """Ask the stepd behind one extern-step socket ``<node>_<job>.<step>`` who owns it.

    Raises :class:`~sshd_adopt.errors.StepdUnavailable` when nobody answers (not
    listening yet, ended, hung) and another :class:`~sshd_adopt.errors.StepdError`
    for a stepd that says something we do not understand.
    """
    name = os.path.basename(path)
    job = name.rpartition("_")[2].partition(".")[0]
    if not job.isdigit():
        raise StepdError(f"{path}: not an extern step socket name")
    found = _query(StepSocket(int(job), EXTERN_STEP, path), time.monotonic() + timeout, None)
    assert found is not None  # no uid filter: every step answers
    return found


def scan_extern_steps(
    spool_dir: str,
    nodename: str,
    *,
    timeout: float,
    max_workers: int = 8,
    uid: int | None = None,
) -> tuple[tuple[ExternStep, ...], tuple[StepProblem, ...]]:
    """Query every extern step socket of ``nodename`` in parallel.

    Returns the steps that answered (only those of ``uid`` if given), sorted
    by job id, and the problems met on the others. The whole call takes at
    most about ``timeout`` seconds however many sockets hang: every
    connection works against one shared deadline, and sockets not yet
    started when it passes are reported instead of queried.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    deadline = time.monotonic() + timeout
    sockets = list_extern_steps(spool_dir, nodename)
    if not sockets:
        return (), ()
    steps: list[ExternStep] = []
    problems: list[StepProblem] = []
    pool = ThreadPoolExecutor(
        max_workers=max(1, min(max_workers, len(sockets))), thread_name_prefix="stepd-scan"
    )
    try:
        futures: dict[Future[ExternStep | None], StepSocket] = {
            pool.submit(_query, sock, deadline, uid): sock for sock in sockets
        }
        # Each worker gives up at the deadline by itself; the extra second
        # only covers thread scheduling and must never be reached.
        wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        for future, sock in futures.items():
            if not future.done():
                future.cancel()
                problems.append(
                    StepProblem(sock.job_id, sock.path, StepdUnavailable(f"{sock.path}: no answer"))
                )
                continue
            try:
                step = future.result(timeout=0)
            except StepdError as err:
                problems.append(StepProblem(sock.job_id, sock.path, err))
                continue
            if step is not None:
                steps.append(step)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    steps.sort(key=lambda s: s.job_id)
    return tuple(steps), tuple(problems)


def _report(problems: tuple[StepProblem, ...], on_problem: ProblemCallback | None) -> None:
    if on_problem is not None:
        for problem in problems:
            on_problem(problem)


def user_jobs(
    spool_dir: str,
    nodename: str,
    uid: int,
    *,
    timeout: float,
    max_workers: int = 8,
    on_problem: ProblemCallback | None = None,
) -> tuple[LocalJob, ...]:
    """The jobs of ``uid`` with a live extern step on this node, sorted by job id.

    Stale and hung sockets are never counted as jobs; each one is passed to
    ``on_problem`` (in the calling thread, after the scan) so the broker can
    log it. Bounded by ``timeout`` in total, see :func:`scan_extern_steps`.
    """
    steps, problems = scan_extern_steps(
        spool_dir, nodename, timeout=timeout, max_workers=max_workers, uid=uid
    )
    _report(problems, on_problem)
    return tuple(LocalJob(job_id=s.job_id, started=s.started) for s in steps)


def all_extern_steps(
    spool_dir: str,
    nodename: str,
    *,
    timeout: float,
    max_workers: int = 8,
    on_problem: ProblemCallback | None = None,
) -> tuple[tuple[int, int], ...]:
    """(job_id, uid) of every live extern step on this node, for the doctor and the sweeper."""
    steps, problems = scan_extern_steps(
        spool_dir, nodename, timeout=timeout, max_workers=max_workers
    )
    _report(problems, on_problem)
    return tuple((s.job_id, s.uid) for s in steps)


__all__ = [
    "ExternStep",
    "ProblemCallback",
    "StepProblem",
    "all_extern_steps",
    "query_step",
    "scan_extern_steps",
    "user_jobs",
]
