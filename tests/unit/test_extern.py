"""ExternStepClient.join: the owner re-check, failure mapping and what a session exports.

The stepd connection (:class:`~sshd_adopt._internal.slurm.stepd.StepdConnection`) is
replaced by an in-test stand-in that answers from fields and records every request,
so these tests see exactly what ``join`` asks of a stepd: whose step it is, which pids
are added, in which order, and nothing at all when the step is not the user's. The
wire protocol itself is tested in ``test_stepd.py``. One test uses a real (empty)
spool directory to check that a step that has ended is a :class:`StepdError`.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import pytest

from sshd_adopt._internal.config import Config
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.slurm import extern
from sshd_adopt._internal.slurm.extern import ExternStepClient, StepNotTheUsers
from sshd_adopt._internal.slurm.stepd import StepdRequestFailed, extern_socket_path
from sshd_adopt.errors import StepdError, StepdUnavailable
from tests.unit.fakes import ALICE, BOB, broker_state, slurm_facts

MONITOR = 4242
SHELL = 4250


class FakeStepd:
    """What one extern stepd would answer; records the connections and requests made."""

    def __init__(self, *, owner: int = ALICE.uid, display: int = 0,
                 xauthority: str | None = None) -> None:
        self.owner = owner
        self.display = display
        self.xauthority = xauthority
        self.gone: set[int] = set()  # pids the stepd cannot add (exited meanwhile)
        self.open_error: StepdError | None = None  # raised by open (no/stale socket)
        self.hung_at: str | None = None  # request that times out
        self.opened: list[tuple[str, float]] = []
        self.requests: list[str] = []
        self.added: list[int] = []
        self.closed = 0

    def connection_class(self) -> type[FakeConnection]:
        stepd = self

        class Bound(FakeConnection):
            @classmethod
            def open(cls, path: str, *, timeout: float, version: int = 0) -> Self:
                stepd.opened.append((path, timeout))
                if stepd.open_error is not None:
                    raise stepd.open_error
                return cls(stepd, path)

        return Bound


class FakeConnection:
    """Stands in for StepdConnection: the methods extern.py calls, nothing more."""

    def __init__(self, stepd: FakeStepd, path: str) -> None:
        self.stepd = stepd
        self.path = path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stepd.closed += 1

    def _request(self, what: str) -> None:
        self.stepd.requests.append(what)
        if self.stepd.hung_at == what:
            raise StepdUnavailable(f"{self.path}: {what}: no answer within 2s")

    def step_uid(self) -> int:
        self._request("STEP_UID")
        return self.stepd.owner

    def add_extern_pid(self, pid: int) -> None:
        self._request("ADD_EXTERN_PID")
        if pid in self.stepd.gone:
            raise StepdRequestFailed(self.path, f"ADD_EXTERN_PID {pid}", -1)
        self.stepd.added.append(pid)

    def x11_display(self) -> tuple[int, str | None]:
        self._request("X11_DISPLAY")
        return self.stepd.display, self.stepd.xauthority


@pytest.fixture
def stepd(monkeypatch: pytest.MonkeyPatch) -> FakeStepd:
    fake = FakeStepd()
    monkeypatch.setattr(extern, "StepdConnection", fake.connection_class())
    return fake


def client(state: BrokerState | None = None) -> ExternStepClient:
    current = state or broker_state()
    return ExternStepClient(lambda: current)


# -- the owner re-check -------------------------------------------------------------------


def test_step_of_another_uid_is_refused_before_anything_is_added(stepd: FakeStepd) -> None:
    """Job 7 ended and its id now belongs to bob's job: alice's session must not join it."""
    stepd.owner = BOB.uid
    with pytest.raises(StepNotTheUsers, match=f"job 7 belongs to uid {BOB.uid}, not {ALICE.uid}"):
        client().join(7, ALICE.uid, [MONITOR, SHELL], want_x11=True)
    assert stepd.requests == ["STEP_UID"]
    assert stepd.added == []
    assert stepd.closed == 1


def test_step_not_the_users_is_a_stepd_error() -> None:
    """The login core catches StepdError: a foreign step must follow action_adopt_failure."""
    assert issubclass(StepNotTheUsers, StepdError)


def test_owner_is_asked_before_the_first_pid_is_added(stepd: FakeStepd) -> None:
    client().join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.requests == ["STEP_UID", "ADD_EXTERN_PID"]


def test_root_step_is_not_the_users_either(stepd: FakeStepd) -> None:
    stepd.owner = 0
    with pytest.raises(StepNotTheUsers):
        client().join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.added == []


# -- adoption -----------------------------------------------------------------------------


def test_join_adds_every_pid_to_the_users_step(stepd: FakeStepd) -> None:
    joined = client().join(7, ALICE.uid, [MONITOR, SHELL], want_x11=False)
    assert stepd.added == [MONITOR, SHELL]
    assert joined.adopted == (MONITOR, SHELL)
    assert dict(joined.env) == {"SLURM_JOB_ID": "7"}
    assert stepd.closed == 1


def test_join_connects_to_the_jobs_extern_socket_with_the_configured_timeout(
        stepd: FakeStepd) -> None:
    config = Config(path="/etc/sshd-adopt/sshd-adopt.toml")
    config = dataclasses.replace(
        config, broker=dataclasses.replace(config.broker, stepd_timeout=0.7))
    state = broker_state(config, slurm=slurm_facts(nodename="cn-3", spool_dir="/var/spool/sd"))
    client(state).join(123, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.opened == [(extern_socket_path("/var/spool/sd", "cn-3", 123), 0.7)]
    assert stepd.opened[0][0] == "/var/spool/sd/cn-3_123.4294967292"


def test_first_pid_gone_fails_the_join(stepd: FakeStepd) -> None:
    """The sshd monitor must be in the job: if the stepd cannot add it, nothing is adopted."""
    stepd.gone.add(MONITOR)
    with pytest.raises(StepdError, match=f"ADD_EXTERN_PID {MONITOR}"):
        client().join(7, ALICE.uid, [MONITOR, SHELL], want_x11=True)
    assert stepd.added == []
    assert stepd.requests == ["STEP_UID", "ADD_EXTERN_PID"]  # the rest is not tried


def test_later_pid_gone_is_skipped(stepd: FakeStepd) -> None:
    """A child that exited meanwhile is skipped: its ancestor is in the job already."""
    stepd.gone.add(SHELL)
    joined = client().join(7, ALICE.uid, [MONITOR, SHELL, SHELL + 1], want_x11=False)
    assert joined.adopted == (MONITOR, SHELL + 1)
    assert stepd.added == [MONITOR, SHELL + 1]


def test_nothing_to_adopt_is_a_caller_bug(stepd: FakeStepd) -> None:
    with pytest.raises(ValueError, match="nothing to adopt"):
        client().join(7, ALICE.uid, [], want_x11=False)
    assert stepd.opened == []


# -- X11 ----------------------------------------------------------------------------------


def test_x11_job_exports_display_and_xauthority(stepd: FakeStepd) -> None:
    stepd.display, stepd.xauthority = 12, "/home/alice/.Xauthority"
    joined = client().join(7, ALICE.uid, [MONITOR], want_x11=True)
    assert dict(joined.env) == {"SLURM_JOB_ID": "7", "DISPLAY": "localhost:12.0",
                                "XAUTHORITY": "/home/alice/.Xauthority"}


def test_job_without_x11_exports_no_display(stepd: FakeStepd) -> None:
    joined = client().join(7, ALICE.uid, [MONITOR], want_x11=True)
    assert dict(joined.env) == {"SLURM_JOB_ID": "7"}


def test_x11_not_wanted_is_not_asked(stepd: FakeStepd) -> None:
    stepd.display = 12
    joined = client().join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert "X11_DISPLAY" not in stepd.requests
    assert "DISPLAY" not in joined.env


# -- a gone or hung stepd -----------------------------------------------------------------


def test_stepd_gone_is_a_stepd_error(stepd: FakeStepd) -> None:
    stepd.open_error = StepdUnavailable("connection refused (stale socket: the stepd is gone)")
    with pytest.raises(StepdError, match="stepd is gone"):
        client().join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.added == []


@pytest.mark.parametrize("request_name", ["STEP_UID", "ADD_EXTERN_PID"])
def test_hung_stepd_is_a_stepd_error(stepd: FakeStepd, request_name: str) -> None:
    stepd.hung_at = request_name
    with pytest.raises(StepdUnavailable, match="no answer"):
        client().join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.added == []
    assert stepd.closed == 1


def test_unknown_node_is_a_stepd_error(stepd: FakeStepd) -> None:
    with pytest.raises(StepdError, match="NodeName or spool dir is unknown"):
        client(broker_state(slurm=False)).join(7, ALICE.uid, [MONITOR], want_x11=False)
    assert stepd.opened == []


@pytest.fixture
def spool() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sd-")  # short: sun_path holds 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_ended_step_without_a_socket_is_a_stepd_error(spool: str) -> None:
    """No fake here: the real connection meets an empty spool dir."""
    state = broker_state(slurm=slurm_facts(spool_dir=spool))
    with pytest.raises(StepdUnavailable, match="no such socket"):
        client(state).join(7, ALICE.uid, [MONITOR], want_x11=False)
