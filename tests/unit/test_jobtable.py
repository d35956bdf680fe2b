"""The event-kept job table, over a temporary spool directory and stepds that answer from
a table.

The sockets are real (bound in a short temporary directory, so the table's own listing
and name matching decide what counts); what a stepd would answer comes from
:class:`Stepds`, which stands in for ``localjobs._query`` -- the one exchange with a
stepd behind both ``query_step`` (new sockets) and ``scan_extern_steps`` (reconcile).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.slurm import jobtable, localjobs
from sshd_adopt._internal.slurm.jobtable import JobTable
from sshd_adopt._internal.slurm.localjobs import ExternStep
from sshd_adopt._internal.slurm.stepd import BATCH_STEP, EXTERN_STEP, StepSocket
from sshd_adopt.errors import StepdProtocolError, StepdUnavailable
from tests.unit.fakes import broker_state, slurm_facts

ALICE, BOB = 2001, 2002


class Stepds:
    """What the stepd behind each socket path says: its owner and its own pid."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, int]] = {}
        self.garbled: set[str] = set()
        self.asked: list[str] = []

    def query(self, sock: StepSocket, deadline: float, want_uid: int | None) -> ExternStep | None:
        self.asked.append(sock.path)
        if sock.path in self.garbled:
            raise StepdProtocolError(f"{sock.path}: garbled answer")
        if sock.path not in self.answers:
            raise StepdUnavailable(f"{sock.path}: connection refused")
        uid, pid = self.answers[sock.path]
        if want_uid is not None and uid != want_uid:
            return None
        return ExternStep(sock.job_id, uid, 1000.0 + sock.job_id, pid, sock.path,
                          sluid_of(sock.job_id))


def sluid_of(job: int) -> str:
    """The SLUID the fake stepds tell for ``job`` (any 14-character name does here)."""
    return f"sJOB{job:010d}"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Spool:
    """A spool directory, its stepds, and a table over them that reports its changes."""

    def __init__(self, path: str, stepds: Stepds) -> None:
        self.path = path
        self.stepds = stepds
        self.changes: list[tuple[int, bool]] = []
        self.clock = Clock()
        self.state = broker_state(slurm=slurm_facts(spool_dir=path))
        self.table = JobTable(lambda: self.state, on_change=self.on_change, clock=self.clock)

    def on_change(self, uid: int, has_jobs: bool) -> None:
        self.changes.append((uid, has_jobs))

    def create(self, name: str, *, uid: int | None = None, pid: int = 0) -> str:
        """Bind a socket ``name``; its stepd answers as ``uid`` (None: not listening)."""
        path = os.path.join(self.path, name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)
        if uid is not None:
            self.stepds.answers[path] = (uid, pid)
        return name

    def start(self, job: int, uid: int, pid: int, *, node: str = "n1") -> str:
        """An extern step of ``job`` starts: its socket appears and is announced."""
        name = self.create(f"{node}_{job}.{EXTERN_STEP}", uid=uid, pid=pid)
        self.table.socket_appeared(name)
        return name

    def remove(self, name: str) -> None:
        os.unlink(os.path.join(self.path, name))

    def jobs(self) -> dict[int, int]:
        return {step.job_id: step.uid for step in self.table.steps()}


@pytest.fixture
def spool(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    stepds = Stepds()
    monkeypatch.setattr(localjobs, "_query", stepds.query)
    path = tempfile.mkdtemp(prefix="sa-jobs-", dir="/tmp")  # short: sun_path is 108 bytes
    yield Spool(path, stepds)
    shutil.rmtree(path, ignore_errors=True)


def extern(job: int, node: str = "n1") -> str:
    return f"{node}_{job}.{EXTERN_STEP}"


# --------------------------------------------------------------------------- events


def test_a_new_socket_adds_its_job_and_the_first_job_of_a_uid_is_told(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    assert spool.jobs() == {5: ALICE}
    assert spool.changes == [(ALICE, True)]
    spool.start(6, ALICE, 5006)
    assert spool.changes == [(ALICE, True)]  # not her first job
    spool.start(7, BOB, 5007)
    assert spool.jobs() == {5: ALICE, 6: ALICE, 7: BOB}
    assert spool.changes == [(ALICE, True), (BOB, True)]
    assert spool.table.users() == {ALICE, BOB}
    assert spool.table.stepd_pids() == {5005, 5006, 5007}


def test_the_same_socket_announced_twice_is_one_job(spool: Spool) -> None:
    name = spool.start(5, ALICE, 5005)
    spool.table.socket_appeared(name)
    assert spool.jobs() == {5: ALICE}
    assert spool.changes == [(ALICE, True)]


def test_only_the_last_job_of_a_uid_vanishing_is_told(spool: Spool) -> None:
    five, six = spool.start(5, ALICE, 5005), spool.start(6, ALICE, 5006)
    spool.remove(five)
    spool.table.socket_vanished(five)
    assert spool.jobs() == {6: ALICE}
    assert spool.changes == [(ALICE, True)]
    spool.remove(six)
    spool.table.socket_vanished(six)
    assert spool.jobs() == {}
    assert spool.changes == [(ALICE, True), (ALICE, False)]
    assert spool.table.users() == frozenset()


def test_an_exiting_stepd_drops_its_job(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    spool.start(6, BOB, 5006)
    spool.table.process_exited(4242)  # not a stepd
    assert spool.jobs() == {5: ALICE, 6: BOB}
    spool.table.process_exited(5005)  # crashed: its socket stays behind
    assert spool.jobs() == {6: BOB}
    assert spool.changes == [(ALICE, True), (BOB, True), (ALICE, False)]


@pytest.mark.parametrize("name", [
    extern(5, node="n2"),  # another node's step (multiple slurmd)
    extern(5, node="n10"),
    extern(5, node="xn1"),
    f"n1_5.{BATCH_STEP}",  # not the extern step
    "n1_5.0",
    f"n1_5.{EXTERN_STEP}.tmp",
    f"n1_x.{EXTERN_STEP}",
    "cred_state",
])
def test_other_names_in_the_spool_dir_are_ignored(spool: Spool, name: str) -> None:
    spool.create(name, uid=ALICE, pid=5005)
    spool.table.socket_appeared(name)
    spool.table.reconcile()
    spool.table.socket_vanished(name)
    assert spool.jobs() == {}
    assert spool.changes == []
    assert spool.stepds.asked == []
    assert not spool.table.has_pending()


def test_a_stepd_not_listening_yet_is_asked_again_until_it_answers(spool: Spool) -> None:
    name = spool.create(extern(5))
    spool.table.socket_appeared(name)
    assert spool.jobs() == {}
    assert spool.table.has_pending()
    spool.table.settle_pending()
    assert spool.table.has_pending()  # still not listening
    spool.stepds.answers[os.path.join(spool.path, name)] = (ALICE, 5005)
    spool.table.settle_pending()
    assert not spool.table.has_pending()
    assert spool.jobs() == {5: ALICE}
    assert spool.changes == [(ALICE, True)]


def test_a_stepd_that_never_answers_is_given_up(spool: Spool) -> None:
    spool.table.socket_appeared(spool.create(extern(5)))
    spool.clock.now += jobtable.SETTLE_TIME + 1
    spool.table.settle_pending()
    assert not spool.table.has_pending()
    assert spool.jobs() == {}


def test_a_garbled_answer_is_not_asked_again(spool: Spool) -> None:
    name = spool.create(extern(5))
    spool.stepds.garbled.add(os.path.join(spool.path, name))
    spool.table.socket_appeared(name)
    assert not spool.table.has_pending()
    assert spool.jobs() == {}


def test_a_socket_removed_before_its_stepd_answered_is_not_asked_again(spool: Spool) -> None:
    name = spool.create(extern(5))
    spool.table.socket_appeared(name)
    spool.remove(name)
    spool.table.socket_vanished(name)
    assert not spool.table.has_pending()


# --------------------------------------------------------------------------- reconcile


def test_reconcile_finds_missed_jobs_and_drops_gone_ones(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    gone = spool.start(6, BOB, 5006)
    spool.create(extern(7), uid=ALICE, pid=5007)  # its IN_CREATE was lost
    spool.create(extern(8), uid=2003, pid=5008)
    spool.remove(gone)  # its IN_DELETE was lost
    spool.create(extern(9))  # stale: a crashed stepd's socket, nobody answers
    spool.create(extern(5, node="n2"), uid=2004, pid=6005)
    spool.table.reconcile()
    assert spool.jobs() == {5: ALICE, 7: ALICE, 8: 2003}
    assert spool.changes == [(ALICE, True), (BOB, True), (BOB, False), (2003, True)]
    assert os.path.join(spool.path, extern(5, node="n2")) not in spool.stepds.asked


def test_reconcile_of_an_unchanged_directory_changes_nothing(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    spool.table.reconcile()
    spool.table.reconcile()
    assert spool.jobs() == {5: ALICE}
    assert spool.changes == [(ALICE, True)]


def test_reconcile_on_a_node_without_a_name_empties_the_table(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    spool.state = broker_state(slurm=False)
    spool.table.reconcile()
    assert spool.jobs() == {}
    assert spool.changes == [(ALICE, True), (ALICE, False)]


# --------------------------------------------------------------------------- queries


def test_jobs_of_answers_only_that_uids_jobs(spool: Spool) -> None:
    spool.start(7, ALICE, 5007)
    spool.start(5, ALICE, 5005)
    spool.start(6, BOB, 5006)
    assert spool.table.jobs_of(ALICE) == (LocalJob(5, 1005.0), LocalJob(7, 1007.0))
    assert spool.table.jobs_of(BOB) == (LocalJob(6, 1006.0),)
    assert spool.table.jobs_of(2003) == ()


def test_jobs_of_never_answers_a_job_whose_socket_is_gone(spool: Spool) -> None:
    five = spool.start(5, ALICE, 5005)
    spool.start(6, ALICE, 5006)
    spool.remove(five)  # no event yet
    assert spool.table.jobs_of(ALICE) == (LocalJob(6, 1006.0),)
    assert spool.jobs() == {6: ALICE}
    spool.remove(extern(6))
    assert spool.table.jobs_of(ALICE) == ()
    assert spool.changes == [(ALICE, True), (ALICE, False)]


def test_jobs_of_catches_up_with_a_socket_not_announced_yet(spool: Spool) -> None:
    spool.start(5, BOB, 5005)
    spool.create(extern(6), uid=ALICE, pid=5006)  # the event is still on its way
    asked = len(spool.stepds.asked)
    assert spool.table.jobs_of(ALICE) == (LocalJob(6, 1006.0),)
    assert spool.stepds.asked[asked:] == [os.path.join(spool.path, extern(6))]  # only the new
    assert spool.changes == [(BOB, True), (ALICE, True)]


def test_jobs_of_another_uid_is_not_found_by_catching_up(spool: Spool) -> None:
    spool.create(extern(6), uid=BOB, pid=5006)
    assert spool.table.jobs_of(ALICE) == ()
    assert spool.jobs() == {6: BOB}  # learnt on the way, but never answered for ALICE


# --------------------------------------------------------------------------- SLUIDs


def test_a_jobs_sluid_names_it(spool: Spool) -> None:
    spool.start(5, ALICE, 5005)
    assert spool.table.job_of_cgroup(sluid_of(5)) == 5
    assert spool.table.sluid_of(5) == sluid_of(5)
    assert spool.table.sluid_of(6) is None


def test_an_unknown_sluid_catches_up_with_a_new_socket(spool: Spool) -> None:
    spool.create(extern(6), uid=ALICE, pid=5006)  # the event is still on its way
    assert spool.table.job_of_cgroup(sluid_of(6)) == 6


def test_a_sluid_no_stepd_told_is_not_looked_for_again_at_once(spool: Spool) -> None:
    """Another node's job on a shared hierarchy: the sweeper asks once per process."""
    spool.start(5, ALICE, 5005)
    spool.create(extern(7))  # a new socket whose stepd does not answer yet
    asked = len(spool.stepds.asked)
    assert spool.table.job_of_cgroup("sOTHERNODE0001") is None
    looked = len(spool.stepds.asked)
    assert looked > asked  # the first miss looked for new sockets
    for _ in range(5):
        assert spool.table.job_of_cgroup("sOTHERNODE0001") is None
    assert len(spool.stepds.asked) == looked
    spool.clock.now += jobtable.UNKNOWN_SLUID_TIME
    assert spool.table.job_of_cgroup("sOTHERNODE0001") is None
    assert len(spool.stepds.asked) > looked
