"""The broker's checks of a "spawn" request, with the node's facts faked.

The descriptors are real (pipes, a pty, socket pairs): what a wrapper sends and what
the helper would be given are checked as the kernel carries them. /proc facts, the
session walk and the stepd come from tables.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sshd_adopt._internal.config.settings import BrokerSettings
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Outcome
from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.node import cgroups, procfs
from sshd_adopt._internal.node.sessions import SshSession
from sshd_adopt._internal.services import spawning
from sshd_adopt._internal.slurm.stepd import CLONE_NEWNS, CLONE_NEWPID
from sshd_adopt.errors import NotAnSshSession, StepdError
from tests.unit.fakes import (
    ALICE,
    ROOT,
    FakeAccounts,
    FakeJobs,
    FakeSource,
    FakeSteps,
    broker_state,
)

PEER, MONITOR, JOB = 4321, 4000, 77
SESSION = SshSession(user="alice", uid=ALICE.uid, peer_pid=PEER, monitor_pid=MONITOR,
                     session_pid=4100, chain=(MONITOR, 4100, PEER), connection=None,
                     monitor_start=11.0, peer_start=12.0)


@dataclass
class Decisions:
    outcome: Outcome | None = field(default_factory=lambda: Adopted(JOB, "one job", {
        "SLURM_JOB_ID": str(JOB)}, namespaces=True))

    def decision(self, monitor_pid: int, monitor_start: float) -> tuple[Outcome, float] | None:
        assert (monitor_pid, monitor_start) == (MONITOR, 11.0)
        return (self.outcome, 1.0) if self.outcome is not None else None


@dataclass
class Steps:
    kinds: tuple[int, ...] = (CLONE_NEWNS,)
    owner: int = ALICE.uid
    joined: list[int] = field(default_factory=list)
    opened: list[int] = field(default_factory=list)

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool,
             ask_namespaces: bool = True) -> Joined:
        assert (job, uid, want_x11, ask_namespaces) == (JOB, ALICE.uid, False, False)
        self.joined.extend(pids)
        return Joined(tuple(pids))

    def namespaces(self, job: int, uid: int) -> list[tuple[int, int]]:
        if uid != self.owner:
            raise StepdError(f"job {job} belongs to uid {self.owner}, not {uid}")
        found = []
        for kind in self.kinds:
            fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            self.opened.append(fd)
            found.append((kind, fd))
        return found


class FakeProcess:
    pid = 99999

    def kill(self) -> None:
        pass

    def wait(self) -> int:
        return 0


@dataclass
class World:
    spawner: spawning.Spawner
    steps: Steps
    decisions: Decisions
    helper_end: list[socket.socket] = field(default_factory=list)
    creds: procfs.Credentials = field(default_factory=lambda: procfs.Credentials(
        (ALICE.uid,) * 4, (ALICE.gid,) * 4, (ALICE.gid, 100), 0o022, 0))
    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": "/usr/bin:/bin", "SHLVL": "1", "SSH_ORIGINAL_COMMAND": "cat /tmp/marker",
        "LANG": "C.UTF-8"})
    root: str = "/"
    alive: bool = True

    def launch(self, _state: object) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair()
        theirs.sendall(FakeProcess.pid.to_bytes(4, "big"))  # the helper says who it is
        self.helper_end.append(theirs)
        return FakeProcess(), ours  # type: ignore[return-value]

    def told(self) -> tuple[dict[str, object], int]:
        """What the helper was sent: its description and how many descriptors."""
        sock = self.helper_end[0]
        fds = array.array("i")
        head, ancillary, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(16 * fds.itemsize))
        for _level, _kind, payload in ancillary:
            fds.frombytes(payload)
        for fd in fds:
            os.close(fd)
        body = b""
        while len(body) < int.from_bytes(head, "big"):
            body += sock.recv(65536)
        return json.loads(body), len(fds)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    state = broker_state()
    core = LoginCore(lambda: state, jobs=FakeJobs(), source=FakeSource(), steps=FakeSteps(),
                     accounts=FakeAccounts(ALICE, ROOT))
    steps, decisions = Steps(), Decisions()
    world = World(None, steps, decisions)  # type: ignore[arg-type]

    def find_session(pid: int, uid: int, **_: object) -> SshSession:
        if (pid, uid) != (PEER, ALICE.uid):
            raise NotAnSshSession(f"process {pid} is not under an sshd session")
        return SESSION

    monkeypatch.setattr(spawning, "find_session", find_session)
    monkeypatch.setattr(cgroups, "outside_of", lambda job, ref, pids, node, named: [])
    monkeypatch.setattr(procfs, "credentials", lambda pid: world.creds)
    monkeypatch.setattr(procfs, "environment", lambda pid: dict(world.env))
    monkeypatch.setattr(procfs, "resource_limits", lambda pid: {7: (1024, 4096)})
    monkeypatch.setattr(procfs, "root_of", lambda pid: world.root)
    monkeypatch.setattr(procfs, "loginuid", lambda pid: None)
    monkeypatch.setattr(spawning, "still_alive", lambda session: world.alive)
    # The broker may start the helper itself here, whatever this test process runs under.
    monkeypatch.setattr(spawning, "spawn_problem", lambda status: None)
    world.spawner = spawning.Spawner(lambda: state, core, decisions=decisions, steps=steps,
                                     start=world.launch)
    yield world
    for sock in world.helper_end:
        sock.close()


def ask(world: World, *, tty: bool = False, pid: int = PEER, uid: int = ALICE.uid,
        gid: int = ALICE.gid) -> spawning.SpawnOutcome:
    """The broker's side of one request: the checks, then the start."""
    checked = world.spawner.check(pid, uid, gid, {"tty": "1" if tty else "0", "sftp": "/sftp"})
    if not isinstance(checked, spawning.Checked):
        return checked
    ours, theirs = socket.socketpair()
    try:
        return world.spawner.start(checked, theirs, deadline=time.monotonic() + 60)
    finally:
        ours.close()


def test_a_session_adopted_into_a_job_with_namespaces_is_started_as_its_user(
        world: World) -> None:
    outcome = ask(world)
    assert isinstance(outcome, spawning.Spawned) and outcome.pid == FakeProcess.pid
    assert world.steps.joined == [FakeProcess.pid]  # in the job before it is told anything
    params, count = world.told()
    assert count == 1 + 1  # the wrapper's connection, the mount namespace (no stream)
    assert params == {
        "namespaces": [CLONE_NEWNS], "uid": ALICE.uid, "gid": ALICE.gid,
        "groups": [ALICE.gid, 100], "umask": 0o022,
        "rlimits": {"7": [1024, 4096]}, "tty": False, "home": ALICE.home,
        "path": ALICE.shell, "argv": ["bash", "-c", "cat /tmp/marker"],
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SLURM_JOB_ID": str(JOB)},
        "controlling_tty": 0, "loginuid": None}


def test_a_root_of_the_peers_own_is_refused(world: World) -> None:
    """A chroot made in a user namespace of the user's own shows in /proc/<pid>/root: it
    must never become the privileged helper's root."""
    world.root = "/home/alice/jail"
    result = ask(world)
    assert isinstance(result, spawning.Refused) and "root directory" in result.reason
    assert world.helper_end == []


def test_a_peer_that_changed_while_looked_at_is_refused(world: World) -> None:
    world.alive = False
    result = ask(world)
    assert isinstance(result, spawning.Refused) and "changed" in result.reason
    assert world.helper_end == []


def test_gids_other_than_the_connect_time_one_are_refused(world: World) -> None:
    """The peer exec'd a setgid program after connecting: its gids are no longer one."""
    result = ask(world, gid=ALICE.gid + 1)
    assert isinstance(result, spawning.Refused) and "gid" in result.reason
    assert world.helper_end == []


def test_only_the_mount_namespace_is_joined(world: World) -> None:
    world.steps.kinds = (CLONE_NEWPID, CLONE_NEWNS)
    assert isinstance(ask(world), spawning.Spawned)
    assert world.told()[1] == 2
    for fd in world.steps.opened:  # the broker closed every descriptor the stepd gave
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("outcome", [None, Allowed("exempt"), Adopted(JOB, "x")])
def test_a_connection_not_adopted_into_a_job_with_namespaces_starts_nothing(
        world: World, outcome: Outcome | None) -> None:
    world.decisions.outcome = outcome
    result = ask(world)
    if isinstance(outcome, Adopted):
        assert isinstance(result, spawning.NoNamespaces)
    else:
        assert isinstance(result, spawning.Refused)
        assert "not adopted" in result.reason
    assert world.helper_end == []


def test_a_process_outside_an_ssh_session_is_refused(world: World) -> None:
    result = ask(world, pid=PEER + 1)
    assert isinstance(result, spawning.Refused) and "not an ssh session" in result.reason
    assert world.helper_end == []


def test_root_is_refused(world: World) -> None:
    result = ask(world, uid=0)
    assert isinstance(result, spawning.Refused)
    assert world.helper_end == []


def test_a_peer_outside_its_jobs_extern_step_is_refused(world: World,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "outside_of", lambda job, ref, pids, node, named: list(pids))
    result = ask(world)
    assert isinstance(result, spawning.Refused) and f"job {JOB}" in result.reason
    assert world.helper_end == []


@pytest.mark.parametrize("creds", [
    procfs.Credentials((ALICE.uid, 0, ALICE.uid, ALICE.uid), (ALICE.gid,) * 4, (), 0o22, 0),
    procfs.Credentials((ALICE.uid,) * 4, (ALICE.gid, 0, ALICE.gid, ALICE.gid), (), 0o22, 0),
    procfs.Credentials((ALICE.uid,) * 4, (0,) * 4, (), 0o22, 0),
])
def test_mixed_or_root_ids_are_refused(world: World, creds: procfs.Credentials) -> None:
    world.creds = creds
    assert isinstance(ask(world), spawning.Refused)
    assert world.helper_end == []


def test_a_step_that_is_not_the_users_is_refused(world: World) -> None:
    world.steps.owner = 0
    result = ask(world)
    assert isinstance(result, spawning.Refused) and "belongs to uid 0" in result.reason
    assert world.helper_end == []


def test_a_spawn_socket_anyone_could_have_made_is_not_used(tmp_path: Path) -> None:
    path = tmp_path / "spawn.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    try:
        os.chmod(tmp_path, 0o700)
        assert spawning.spawn_socket_usable(str(path))
        os.chmod(tmp_path, 0o777)
        assert not spawning.spawn_socket_usable(str(path))
        assert not spawning.spawn_socket_usable(str(tmp_path / "missing.sock"))
    finally:
        listener.close()


@pytest.mark.parametrize(("status", "problem"), [
    ("NoNewPrivs:\t0\nSeccomp:\t0\nCapBnd:\t000001ffffffffff\n", None),
    ("NoNewPrivs:\t1\nSeccomp:\t0\nCapBnd:\t000001ffffffffff\n", "NoNewPrivileges"),
    ("NoNewPrivs:\t0\nSeccomp:\t2\nCapBnd:\t000001ffffffffff\n", "seccomp"),
    # the shipped unit's bounding set: no CAP_SYS_ADMIN, no CAP_SYS_CHROOT
    ("NoNewPrivs:\t0\nSeccomp:\t0\nCapBnd:\t00000000000810e5\n", "CAP_SYS_ADMIN, CAP_SYS_CHROOT"),
])
def test_a_sandboxed_broker_does_not_start_sessions_in_namespaces(
        status: str, problem: str | None) -> None:
    found = spawning.spawn_problem(status)
    assert found == problem if problem is None else problem in (found or "")


def test_the_shipped_socket_unit_listens_where_the_broker_looks() -> None:
    unit = (Path(__file__).resolve().parents[2] / "packaging" / "systemd"
            / "sshd-adopt-spawn.socket").read_text()
    assert f"ListenStream={BrokerSettings().spawn_socket}\n" in unit
