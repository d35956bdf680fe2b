"""The parallel, deadline-bounded scan of local extern steps, against fake stepds."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.slurm.localjobs import (
    StepProblem,
    all_extern_steps,
    scan_extern_steps,
    user_jobs,
)
from sshd_adopt._internal.slurm.stepd import (
    EXTERN_STEP,
    PROTOCOL_VERSIONS,
    REQUEST_DAEMON_PID,
    REQUEST_STEP_UID,
)
from tests.unit.test_stepd import FakeStepd, Handler, read_int, sockdir, stepd_22_05

__all__ = ["sockdir"]  # re-exported fixture

Serve = Callable[[int, Handler], FakeStepd]


@pytest.fixture
def serve(sockdir: str) -> Iterator[Serve]:
    servers: list[FakeStepd] = []

    def start(job: int, handler: Handler) -> FakeStepd:
        server = FakeStepd(os.path.join(sockdir, f"n1_{job}.{EXTERN_STEP}"), handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def stale(sockdir: str, job: int) -> str:
    path = os.path.join(sockdir, f"n1_{job}.{EXTERN_STEP}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()
    return path


def test_user_jobs_keeps_the_users_steps_with_real_start_times(
    sockdir: str, serve: Serve
) -> None:
    me = os.getpid()
    serve(5, stepd_22_05(uid=2001, pid=me))
    serve(6, stepd_22_05(uid=2002, pid=me))
    serve(7, stepd_22_05(uid=2001, pid=me))
    started = psutil.Process(me).create_time()
    jobs = user_jobs(sockdir, "n1", 2001, timeout=2)
    assert jobs == (LocalJob(5, started), LocalJob(7, started))
    assert all_extern_steps(sockdir, "n1", timeout=2) == ((5, 2001), (6, 2002), (7, 2001))


def test_started_falls_back_to_socket_ctime(sockdir: str, serve: Serve) -> None:
    server = serve(8, stepd_22_05(uid=2001, pid=2**22 + 12345))  # beyond pid_max: no process
    (job,) = user_jobs(sockdir, "n1", 2001, timeout=2)
    assert job.started == pytest.approx(os.lstat(server.path).st_ctime)


def test_stale_and_hung_sockets_are_skipped_and_reported_within_one_timeout(
    sockdir: str, serve: Serve
) -> None:
    release = threading.Event()

    def hang(conn: socket.socket) -> None:
        read_int(conn)
        release.wait(10)

    serve(1, stepd_22_05(uid=2001, pid=os.getpid()))
    for job in (2, 3, 4):  # three hung stepds, fewer workers than sockets
        serve(job, hang)
    stale(sockdir, 9)
    problems: list[StepProblem] = []
    began = time.monotonic()
    jobs = user_jobs(sockdir, "n1", 2001, timeout=0.5, max_workers=2, on_problem=problems.append)
    elapsed = time.monotonic() - began
    release.set()
    assert [j.job_id for j in jobs] == [1]
    assert elapsed < 1.2  # one shared deadline, not 0.5s per hung socket
    assert sorted(p.job_id for p in problems) == [2, 3, 4, 9]
    assert all(p.stale for p in problems)
    # Queued behind the hung ones, job 9 may be reported unqueried rather than refused.
    (nine,) = [str(p) for p in problems if p.job_id == 9]
    assert "refused" in nine or "deadline had passed" in nine


def test_stale_socket_is_reported_as_refused(sockdir: str) -> None:
    stale(sockdir, 9)
    problems: list[StepProblem] = []
    assert all_extern_steps(sockdir, "n1", timeout=1, on_problem=problems.append) == ()
    assert [(p.job_id, p.stale) for p in problems] == [(9, True)]
    assert "connection refused" in str(problems[0])


def test_empty_and_missing_spool_dirs(sockdir: str) -> None:
    assert user_jobs(sockdir, "n1", 2001, timeout=1) == ()
    assert scan_extern_steps(os.path.join(sockdir, "gone"), "n1", timeout=1) == ((), ())


def test_timeout_must_be_positive(sockdir: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        user_jobs(sockdir, "n1", 2001, timeout=0)


def test_a_stepd_that_fails_the_sluid_request_keeps_its_job(sockdir: str, serve: Serve) -> None:
    """A 25.11+ stepd that closes on REQUEST_SLUID: the SLUID is only a cgroup's name, the
    job (owner, start time) stays."""
    me = os.getpid()

    def stepd_26_05_without_sluid(conn: socket.socket) -> None:
        read_int(conn)
        conn.sendall(struct.pack("=i", PROTOCOL_VERSIONS["26.05"]))
        while True:
            code = read_int(conn)
            if code == REQUEST_STEP_UID:
                conn.sendall(struct.pack("=I", 2001))
            elif code == REQUEST_DAEMON_PID:
                conn.sendall(struct.pack("=i", me))
            else:
                return  # closes without an answer

    serve(5, stepd_26_05_without_sluid)
    steps, _problems = scan_extern_steps(sockdir, "n1", timeout=2)
    assert [(s.job_id, s.uid, s.sluid) for s in steps] == [(5, 2001, None)]
