"""find_session's rules against a fake process table (pure logic, no /proc).

Each case is one shape an attacker, an unusual login or a race can produce;
the real OpenSSH 9.2 chain is checked live in test_sessions_live.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import pwd
import types

import pytest

from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.node import procfs, sessions
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt.errors import NoSuchProcess, NotAnSshSession

UID = 1234
USER = "alice"
SSHD = "/usr/sbin/sshd"
CONN = Connection(ipaddress.IPv4Address("10.0.0.1"), 22, ipaddress.IPv4Address("10.0.0.2"), 5000)


def proc(pid: int, ppid: int, uid: int, exe: str | None, title: str, *, euid: int | None = None,
         name: str | None = None, start: float = 100.0) -> ProcInfo:
    # psutil returns setproctitle's NUL padding as trailing empty arguments.
    return ProcInfo(pid=pid, ppid=ppid, real_uid=uid, effective_uid=uid if euid is None else euid,
                    real_gid=uid, name=name or (exe or "").rsplit("/", 1)[-1][:15],
                    exe=exe, cmdline=(*title.split(" "), "", ""), start_time=start)


def genuine(*, prefix: str = "sshd", exe: str = SSHD) -> dict[int, ProcInfo]:
    """OpenSSH 9.2 as observed: listener 10, monitor 20, session 30, wrapper 40."""
    return {
        1: proc(1, 0, 0, "/sbin/init", "init", start=1.0),
        10: proc(10, 1, 0, SSHD, "sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",
                 start=10.0),
        20: proc(20, 10, 0, exe, f"{prefix}: {USER} [priv]", start=20.0),
        30: proc(30, 20, UID, exe, f"{prefix}: {USER}@notty", start=30.0),
        40: proc(40, 30, UID, "/usr/bin/python3.11", "python3 /usr/bin/sshd-adopt", start=40.0),
    }


class FakeProc:
    """Stands in for procfs's /proc readers, from one dict of ProcInfo."""

    def __init__(self, table: dict[int, ProcInfo]) -> None:
        self.table = table
        self.changed: set[int] = set()

    def proc_info(self, pid: int) -> ProcInfo:
        if pid not in self.table:
            raise NoSuchProcess(f"process {pid} is gone")
        return self.table[pid]

    def same_process(self, info: ProcInfo) -> bool:
        return info.pid not in self.changed and self.table.get(info.pid) == info

    def connection_of(self, pid: int) -> Connection | None:
        return CONN if pid == 20 else None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    table = FakeProc(genuine())
    monkeypatch.setattr(procfs, "proc_info", table.proc_info)
    monkeypatch.setattr(procfs, "same_process", table.same_process)
    monkeypatch.setattr(procfs, "connection_of", table.connection_of)

    def getpwuid(uid: int) -> types.SimpleNamespace:
        if uid != UID:
            raise KeyError(uid)
        return types.SimpleNamespace(pw_name=USER)

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    return table


def refused(match: str, peer: int = 40) -> None:
    with pytest.raises(NotAnSshSession, match=match):
        sessions.find_session(peer, UID)


def replace(fake: FakeProc, pid: int, **changes: object) -> None:
    fake.table[pid] = dataclasses.replace(fake.table[pid], **changes)  # type: ignore[arg-type]


def test_genuine_openssh_92_chain(fake: FakeProc) -> None:
    found = sessions.find_session(40, UID)
    assert found == sessions.SshSession(
        user=USER, uid=UID, peer_pid=40, monitor_pid=20, session_pid=30, chain=(20, 30, 40),
        connection=CONN, monitor_start=20.0, peer_start=40.0)


def test_genuine_sshd_session_98_chain(fake: FakeProc) -> None:
    exe = "/usr/lib/openssh/sshd-session"
    fake.table.update(genuine(prefix="sshd-session", exe=exe))
    assert sessions.find_session(40, UID).chain == (20, 30, 40)


def test_pts_title(fake: FakeProc) -> None:
    replace(fake, 30, cmdline=(f"sshd: {USER}@pts/0,pts/3",))
    assert sessions.find_session(40, UID).session_pid == 30


def test_intermediate_shells_are_allowed_up_to_the_limit(fake: FakeProc) -> None:
    # A login shell that did not exec, then a script: peer 60 <- 50 <- 41 <- session 30.
    fake.table[41] = proc(41, 30, UID, "/usr/bin/bash", "-bash", start=41.0)
    fake.table[50] = proc(50, 41, UID, "/usr/bin/bash", "bash ./job.sh", start=50.0)
    fake.table[60] = proc(60, 50, UID, "/usr/bin/python3.11", "sshd-adopt", start=60.0)
    assert sessions.find_session(60, UID).chain == (20, 30, 41, 50, 60)
    assert sessions.find_session(60, UID, max_intermediate=2).chain == (20, 30, 41, 50, 60)
    with pytest.raises(NotAnSshSession, match="within 1 intermediate"):
        sessions.find_session(60, UID, max_intermediate=1)


def test_monitor_effective_uid_may_be_the_authorized_keys_command_user(fake: FakeProc) -> None:
    replace(fake, 20, effective_uid=65534)
    assert sessions.find_session(40, UID).monitor_pid == 20


def test_unknown_uid(fake: FakeProc) -> None:
    with pytest.raises(NotAnSshSession, match="no passwd entry"):
        sessions.find_session(40, UID + 1)


def test_peer_of_another_uid(fake: FakeProc) -> None:
    replace(fake, 40, real_uid=0)
    refused("peer 40 runs as uid 0")


def test_peer_with_another_effective_uid(fake: FakeProc) -> None:
    replace(fake, 40, effective_uid=0)
    refused(r"peer 40 runs as uid 1234 \(effective 0\)")


def test_peer_that_is_sshd_itself(fake: FakeProc) -> None:
    refused("peer 30 .* is itself an sshd", peer=30)


def test_process_outside_any_sshd(fake: FakeProc) -> None:
    # runuser -u alice -- sleep: the parent is a root runuser, not sshd.
    fake.table[70] = proc(70, 1, 0, "/usr/sbin/runuser", "runuser -u alice -- sleep 30", start=70.0)
    fake.table[71] = proc(71, 70, UID, "/usr/bin/sleep", "sleep 30", start=71.0)
    refused("ancestor 70 .* runs as uid 0", peer=71)


def test_reaching_the_top_of_the_tree(fake: FakeProc) -> None:
    fake.table[72] = proc(72, 0, UID, "/usr/bin/sleep", "sleep 30", start=72.0)
    refused("reached the top", peer=72)


def test_copy_of_sshd_in_home(fake: FakeProc) -> None:
    replace(fake, 30, exe="/home/alice/sshd")
    refused("session process 30 runs /home/alice/sshd, not a system sshd")


def test_renamed_binary_with_a_forged_title(fake: FakeProc) -> None:
    # /tmp/x/sshd is a copy of sleep, started as `exec -a "sshd: alice@notty"`.
    fake.table[80] = proc(80, 30, UID, "/tmp/x/sshd", f"sshd: {USER}@notty", start=80.0)
    fake.table[81] = proc(81, 80, UID, "/usr/bin/sleep", "sleep 30", start=81.0)
    refused("session process 80 runs /tmp/x/sshd", peer=81)


def test_forged_title_alone_is_not_walked_past(fake: FakeProc) -> None:
    # A user process titled like sshd is checked as the session, not skipped as a shell.
    fake.table[82] = proc(82, 30, UID, "/usr/bin/python3.11", f"sshd: {USER}@notty",
                          name="python3", start=82.0)
    fake.table[83] = proc(83, 82, UID, "/usr/bin/sleep", "sleep 30", start=83.0)
    refused("session process 82 runs /usr/bin/python3.11", peer=83)


def test_deleted_session_binary(fake: FakeProc) -> None:
    replace(fake, 30, exe=f"{SSHD} (deleted)")
    refused(r"replaced or removed on disk")


def test_deleted_monitor_binary(fake: FakeProc) -> None:
    replace(fake, 20, exe=f"{SSHD} (deleted)")
    refused(r"monitor 20 runs .*replaced or removed on disk")


def test_session_of_another_user(fake: FakeProc) -> None:
    replace(fake, 30, cmdline=("sshd: alicia@notty",))
    refused("session process 30 is titled 'sshd: alicia@notty'")


def test_session_title_prefix_needs_the_at_sign(fake: FakeProc) -> None:
    # User "alice" must not match a session of user "alice2".
    replace(fake, 30, cmdline=("sshd: alice2@notty",))
    refused("is titled 'sshd: alice2@notty'")


def test_session_process_of_another_uid(fake: FakeProc) -> None:
    # Still in the monitor's hands (pre-auth child): same title shape, other uid.
    fake.table[31] = proc(31, 20, 0, SSHD, f"sshd: {USER}@notty", start=31.0)
    fake.table[32] = proc(32, 31, UID, "/usr/bin/sleep", "sleep", start=32.0)
    refused("session process 31 runs as uid 0", peer=32)


def test_user_run_sshd_has_a_non_root_monitor(fake: FakeProc) -> None:
    # alice ran /usr/sbin/sshd herself: genuine exe everywhere, but no root.
    replace(fake, 20, real_uid=UID, effective_uid=UID)
    replace(fake, 10, real_uid=UID, effective_uid=UID)
    refused(r"monitor 20 runs as uid 1234, not root")


def test_monitor_of_another_user(fake: FakeProc) -> None:
    replace(fake, 20, cmdline=("sshd: bob [priv]",))
    refused(r"monitor 20 is titled 'sshd: bob \[priv\]'")


def test_monitor_with_a_fake_exe(fake: FakeProc) -> None:
    replace(fake, 20, exe="/opt/sshd")
    refused("monitor 20 runs /opt/sshd")


def test_listener_must_be_root_and_genuine(fake: FakeProc) -> None:
    replace(fake, 10, exe="/usr/local/sbin/sshd")
    refused("listener 10 runs /usr/local/sbin/sshd")
    replace(fake, 10, exe=SSHD, real_uid=UID)
    refused("listener 10 runs as uid 1234")


def test_site_executables(fake: FakeProc) -> None:
    site = frozenset({"/opt/openssh/sbin/sshd"})
    with pytest.raises(NotAnSshSession, match="not a system sshd"):
        sessions.find_session(40, UID, sshd_executables=site)
    for pid in (10, 20, 30):
        replace(fake, pid, exe="/opt/openssh/sbin/sshd")
    assert sessions.find_session(40, UID, sshd_executables=site).monitor_pid == 20


def test_reused_parent_pid_is_a_race(fake: FakeProc) -> None:
    # The session process exited and pid 30 went to a newer process.
    replace(fake, 30, start_time=45.0)
    with pytest.raises(NoSuchProcess, match="younger than its child"):
        sessions.find_session(40, UID)


def test_vanishing_during_the_walk_is_a_race(fake: FakeProc) -> None:
    del fake.table[20]
    with pytest.raises(NoSuchProcess):
        sessions.find_session(40, UID)


@pytest.mark.parametrize("pid", [10, 20, 30, 40])
def test_chain_changed_after_the_walk(fake: FakeProc, pid: int) -> None:
    fake.changed.add(pid)
    with pytest.raises(NoSuchProcess, match=f"process {pid} .* while the session"):
        sessions.find_session(40, UID)


def test_still_alive(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    found = sessions.find_session(40, UID)
    alive = {(20, 20.0), (40, 40.0)}
    monkeypatch.setattr(procfs, "still_running", lambda pid, start: (pid, start) in alive)
    assert sessions.still_alive(found)
    alive = {(20, 20.0), (40, 41.0)}  # the peer's pid was reused
    assert not sessions.still_alive(found)
    alive = {(40, 40.0)}  # the monitor exited
    assert not sessions.still_alive(found)


def test_sessions_of_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "descendants", lambda pid: [30, 40])
    assert sessions.sessions_of_monitor(20) == [20, 30, 40]

    def gone(pid: int) -> list[int]:
        raise NoSuchProcess(f"process {pid} is gone")

    monkeypatch.setattr(procfs, "descendants", gone)
    assert sessions.sessions_of_monitor(20) == [20]
