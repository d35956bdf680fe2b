"""Session tickets: what the broker leaves for the wrapper of a connection adopted early,
and when the wrapper trusts one (its monitor by pid and start time, its own cgroup)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal import protocol
from sshd_adopt._internal.broker.tickets import SessionTickets
from sshd_adopt._internal.node.keyentries import UnsafeDirectory
from sshd_adopt.cli import wrapper

SOCKET = "/run/sshd-adopt/broker.sock"
ADOPTED = protocol.reply(protocol.ADOPTED, job=7, env={"SLURM_JOB_ID": "7"})


def stat_line(pid: int, ppid: int, start: int, comm: str = "sshd") -> bytes:
    fields = ["S", str(ppid), *["0"] * 17, str(start), "0"]
    return f"{pid} ({comm}) {' '.join(fields)}\n".encode()


def test_stat_identity_counts_fields_after_the_last_parenthesis() -> None:
    assert protocol.stat_identity(stat_line(5, 4, 12345)) == (4, 12345)
    assert protocol.stat_identity(stat_line(5, 4, 99, comm="a) (b) c")) == (4, 99)
    with pytest.raises(ValueError):
        protocol.stat_identity(b"garbage")


# --------------------------------------------------------------------------- the broker's side


@pytest.fixture
def directory() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sshd-adopt-unit.", dir="/run"))
    base.chmod(0o755)
    try:
        yield base / "sessions"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the directory must be root's")
def test_a_ticket_holds_the_reply_and_the_monitors_start_time(directory: Path) -> None:
    tickets = SessionTickets(str(directory))
    tickets.prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o711
    tickets.issue(os.getpid(), ADOPTED, uid=4321, gid=8765)
    ticket = directory / str(os.getpid())
    items = protocol.decode(ticket.read_bytes()[4:])
    start = protocol.stat_identity(Path("/proc/self/stat").read_bytes())[1]
    assert items == {**ADOPTED, protocol.MONITOR_START: str(start)}
    # The user's alone: nobody else reads which job their session is in.
    info = ticket.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o400, 4321, 8765)
    tickets.revoke(os.getpid())
    tickets.revoke(os.getpid())  # twice is fine
    assert os.listdir(directory) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the directory must be root's")
def test_an_old_listable_ticket_directory_is_made_unlistable(directory: Path) -> None:
    directory.mkdir(mode=0o755)
    SessionTickets(str(directory)).prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o711


@pytest.mark.skipif(os.geteuid() != 0, reason="the directory must be root's")
def test_a_ticket_directory_others_can_write_is_refused(directory: Path) -> None:
    directory.mkdir(mode=0o755)
    directory.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="session ticket directory"):
        SessionTickets(str(directory)).prepare()


@pytest.mark.skipif(os.geteuid() != 0, reason="the directory must be root's")
def test_wipe_removes_every_ticket(directory: Path) -> None:
    tickets = SessionTickets(str(directory))
    tickets.prepare()
    tickets.issue(os.getpid(), ADOPTED, uid=0, gid=0)
    (directory / ".new-leftover").write_text("x")
    tickets.wipe()
    assert os.listdir(directory) == []


# --------------------------------------------------------------------------- the wrapper's side


WRAPPER, SESSION, MONITOR = 300, 200, 100
START = 5555
IN_JOB = b"4:memory:/slurm_n1/uid_2001/job_7/step_extern\n0::/\n"


def fake_proc(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
    def read(path: str, limit: int = 4096) -> bytes:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path][:limit]

    monkeypatch.setattr(wrapper, "_read", read)


def node(ticket: dict[str, str] | None = ADOPTED, *, start: int = START,
         cgroup: bytes = IN_JOB, monitor_cgroup: bytes = IN_JOB) -> dict[str, bytes]:
    files: dict[str, bytes] = {
        "/proc/self/stat": stat_line(WRAPPER, SESSION, 9999),
        f"/proc/{SESSION}/stat": stat_line(SESSION, MONITOR, 6000),
        f"/proc/{MONITOR}/stat": stat_line(MONITOR, 1, start),
        f"/proc/{MONITOR}/cgroup": monitor_cgroup,
        "/proc/self/cgroup": cgroup,
    }
    if ticket is not None:
        files[f"/run/sshd-adopt/sessions/{MONITOR}"] = protocol.encode(
            {**ticket, protocol.MONITOR_START: str(START)})
    return files


def test_the_wrapper_takes_its_monitors_ticket(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, node())
    assert wrapper.read_ticket(SOCKET) == {**ADOPTED, protocol.MONITOR_START: str(START)}


def test_a_ticket_of_a_reused_pid_is_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, node(start=START + 1))
    assert wrapper.read_ticket(SOCKET) is None


def test_a_ticket_is_not_taken_when_this_process_is_not_in_that_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for cgroup in (b"4:memory:/user.slice\n", b"4:memory:/slurm_n1/uid_2001/job_17/step_extern\n",
                   b"4:memory:/slurm_n1/uid_2001/job_7/step_batch\n"):
        fake_proc(monkeypatch, node(cgroup=cgroup))
        assert wrapper.read_ticket(SOCKET) is None, cgroup


def test_a_ticket_is_not_taken_when_this_process_is_in_the_job_only_in_part(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked while the stepd moved its parent hierarchy by hierarchy: in the job's freezer
    cgroup, not yet in its memory cgroup (its limit would not apply)."""
    monitor = (b"7:freezer:/slurm_n1/uid_2001/job_7/step_extern\n"
               b"4:memory:/slurm_n1/uid_2001/job_7/step_extern\n0::/\n")
    partly = b"7:freezer:/slurm_n1/uid_2001/job_7/step_extern\n4:memory:/\n0::/\n"
    fake_proc(monkeypatch, node(cgroup=partly, monitor_cgroup=monitor))
    assert wrapper.read_ticket(SOCKET) is None
    fake_proc(monkeypatch, node(cgroup=monitor, monitor_cgroup=monitor))
    assert wrapper.read_ticket(SOCKET) is not None


V2_SLUID = "sFQDM8MTQH8E00"
IN_V2_JOB = (b"4:memory:/\n0::/system.slice/n1_slurmstepd.scope/sFQDM8MTQH8E00/step_extern/"
             b"user/task_special\n")


def test_a_sluid_in_the_ticket_finds_a_job_cgroup_named_by_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm 26.05's cgroup/v2 names the job's cgroup by its SLUID, which the ticket carries."""
    ticket = {**ADOPTED, protocol.SLUID: V2_SLUID}
    fake_proc(monkeypatch, node(ticket, cgroup=IN_V2_JOB, monitor_cgroup=IN_V2_JOB))
    assert wrapper.read_ticket(SOCKET) is not None
    fake_proc(monkeypatch, node(ADOPTED, cgroup=IN_V2_JOB, monitor_cgroup=IN_V2_JOB))
    assert wrapper.read_ticket(SOCKET) is None  # no SLUID: nothing names the job there
    other = IN_V2_JOB.replace(b"n1_slurmstepd", b"n2_slurmstepd")
    fake_proc(monkeypatch, node(ticket, cgroup=other, monitor_cgroup=IN_V2_JOB))
    assert wrapper.read_ticket(SOCKET) is None  # the same SLUID elsewhere is not beside


def test_a_sluid_in_the_ticket_does_not_hide_a_job_id_named_cgroup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """25.11+ stepds tell a SLUID on v1 or with CgroupJobIdPaths=yes too: job_<id> still counts."""
    for sluid in (V2_SLUID, "not-a-sluid", ""):
        fake_proc(monkeypatch, node({**ADOPTED, protocol.SLUID: sluid}))
        assert wrapper.read_ticket(SOCKET) is not None, sluid


def test_only_an_adopted_ticket_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, node(protocol.reply(protocol.ALLOWED)))
    assert wrapper.read_ticket(SOCKET) is None


def test_no_ticket_or_a_broken_one_means_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_proc(monkeypatch, node(None))
    assert wrapper.read_ticket(SOCKET) is None
    files = node()
    path = f"/run/sshd-adopt/sessions/{MONITOR}"
    for broken in (b"", b"\0\0\0\x05ab", files[path][:-1], b"\0\0\0\x03a\0b"):
        files[path] = broken
        fake_proc(monkeypatch, files)
        assert wrapper.read_ticket(SOCKET) is None, broken


def test_the_ticket_directory_follows_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    files = node(None)
    files[f"/srv/adopt/sessions/{MONITOR}"] = protocol.encode(
        {**ADOPTED, protocol.MONITOR_START: str(START)})
    fake_proc(monkeypatch, files)
    assert wrapper.read_ticket("/srv/adopt/broker.sock") is not None
    assert wrapper.read_ticket(SOCKET) is None
