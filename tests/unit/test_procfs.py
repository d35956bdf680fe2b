"""procfs: /proc/net/tcp{,6} parsing, socket lookup in a fake /proc tree, process facts.

The parsers and the socket lookup run against a fake tree under ``tmp_path``
(``procfs.PROCFS`` points there). ``proc_info`` and the tree walkers read real
processes this test starts itself: psutil reads the real /proc.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sshd_adopt._internal.node import procfs
from sshd_adopt.errors import AccessDenied, NoSuchProcess, ProcError

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode\n")


def word(addr: bytes) -> str:
    """How the kernel prints 4 address bytes: one native-endian 32-bit word in hex."""
    return f"{struct.unpack('=I', addr)[0]:08X}"


def row(local: str, lport: int, remote: str, rport: int, inode: int, state: str = "01") -> str:
    return (f"   0: {local}:{lport:04X} {remote}:{rport:04X} {state} 00000000:00000000 "
            f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")


def v4(text: str) -> str:
    return word(socket.inet_aton(text))


def v6(text: str) -> str:
    raw = ipaddress.IPv6Address(text).packed
    return "".join(word(raw[i:i + 4]) for i in range(0, 16, 4))


# -- parse_tcp_table ---------------------------------------------------------------------------

def test_ipv4_row() -> None:
    text = HEADER + row(v4("10.213.0.11"), 22, v4("10.213.0.5"), 50540, 4242)
    (conn,) = procfs.parse_tcp_table(text, "tcp")
    assert str(conn.local_ip) == "10.213.0.11"
    assert conn.local_port == 22
    assert str(conn.remote_ip) == "10.213.0.5"
    assert conn.remote_port == 50540
    assert conn.inode == 4242
    assert conn.family == 4


def test_loopback_is_byte_reversed_on_little_endian() -> None:
    # The kernel's literal text for 127.0.0.1 on x86: the word 0x7F000001 printed natively.
    if struct.pack("=I", 1) != b"\x01\x00\x00\x00":
        pytest.skip("big-endian host")
    (conn,) = procfs.parse_tcp_table(HEADER + row("0100007F", 22, "0100007F", 1, 7), "tcp")
    assert str(conn.remote_ip) == "127.0.0.1"


def test_ipv6_and_mapped_ipv4_rows() -> None:
    text = HEADER + row(v6("fd5a:213::11"), 22, v6("fd5a:213::5"), 40000, 1)
    text += row(v6("::ffff:10.213.0.11"), 22, v6("::ffff:10.213.0.12"), 40001, 2)
    plain, mapped = procfs.parse_tcp_table(text, "tcp6")
    assert str(plain.remote_ip) == "fd5a:213::5"
    assert plain.family == 6
    # A dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d; the source
    # host's slurmd matches them only as IPv4, so they are normalised.
    assert str(mapped.remote_ip) == "10.213.0.12"
    assert str(mapped.local_ip) == "10.213.0.11"
    assert mapped.family == 4


def test_any_state_is_returned() -> None:
    # pam_slurm_adopt matches by inode whatever the state (LISTEN=0A, CLOSE_WAIT=08).
    text = HEADER + row(v4("0.0.0.0"), 22, v4("0.0.0.0"), 0, 5, "0A")
    text += row(v4("10.0.0.1"), 22, v4("10.0.0.2"), 3333, 6, "08")
    assert [c.inode for c in procfs.parse_tcp_table(text, "tcp")] == [5, 6]


def test_empty_table_and_blank_lines() -> None:
    assert procfs.parse_tcp_table("", "tcp") == []
    assert procfs.parse_tcp_table(HEADER + "\n", "tcp") == []


@pytest.mark.parametrize("line", [
    "   0: 0100007F:0016\n",                                      # truncated
    "   0: XYZ:0016 0100007F:0016 01 a b c d e 5\n",             # not hex
    "   0: 0100:0016 0100007F:0016 01 a b c d e 5\n",            # 4 hex digits is no address
    "   0: 0x00007F:0016 0100007F:0016 01 a b c d e 5\n",        # int(…, 16) would take 0x
    "   0: 0100007F:+016 0100007F:0016 01 a b c d e 5\n",        # … and a sign
    "   0: 0100007F:0016 0100007F:0016 01 a b c d e -5\n",       # inode is decimal digits
    "   0: 0100007F:0016 0100007F:0016 01 a b c d e 12ab\n",
    "  sl  local_address rem_address st\n",                       # a header past line 1
])
def test_malformed_rows_name_the_file_and_line(line: str) -> None:
    with pytest.raises(ProcError, match=r"/proc/1/net/tcp line 2"):
        procfs.parse_tcp_table(HEADER + line, "/proc/1/net/tcp")


# -- a fake /proc tree -------------------------------------------------------------------------

PID = 4321


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``<tmp>/4321/{fd,net}``: the process whose sockets the tests look up."""
    monkeypatch.setattr(procfs, "PROCFS", str(tmp_path))
    (tmp_path / str(PID) / "fd").mkdir(parents=True)
    (tmp_path / str(PID) / "net").mkdir()
    return tmp_path


def add_fd(root: Path, fd: int, target: str) -> None:
    (root / str(PID) / "fd" / str(fd)).symlink_to(target)


def write_table(root: Path, name: str, text: str) -> None:
    (root / str(PID) / "net" / name).write_text(text)


def test_socket_inodes_keeps_only_sockets(fake_proc: Path) -> None:
    add_fd(fake_proc, 0, "/dev/null")
    add_fd(fake_proc, 1, "pipe:[77]")
    add_fd(fake_proc, 3, "socket:[100]")
    add_fd(fake_proc, 12, "socket:[200]")
    add_fd(fake_proc, 13, "anon_inode:[eventpoll]")
    # Not a link at all: readlink fails with EINVAL, which is skipped.
    (fake_proc / str(PID) / "fd" / "14").write_text("")
    assert procfs.socket_inodes(PID) == frozenset({100, 200})


def test_connection_of_takes_the_lowest_numbered_tcp_fd(fake_proc: Path) -> None:
    # fd 10 sorts before fd 4 as text: the lookup must order fds numerically.
    add_fd(fake_proc, 3, "socket:[100]")   # a unix socket: in no TCP table
    add_fd(fake_proc, 10, "socket:[300]")  # a second TCP socket (e.g. a forwarded port)
    add_fd(fake_proc, 4, "socket:[200]")   # the client's connection
    write_table(fake_proc, "tcp", HEADER + row(v4("10.0.0.1"), 22, v4("10.0.0.2"), 5000, 300))
    write_table(fake_proc, "tcp6", HEADER + row(
        v6("::ffff:10.0.0.1"), 22, v6("::ffff:10.0.0.9"), 6000, 200))
    conn = procfs.connection_of(PID)
    assert conn is not None
    assert (str(conn.remote_ip), conn.remote_port, conn.local_port, conn.inode) == (
        "10.0.0.9", 6000, 22, 200)
    assert conn.family == 4


def test_connection_of_without_tcp_socket(fake_proc: Path) -> None:
    add_fd(fake_proc, 3, "socket:[100]")
    write_table(fake_proc, "tcp", HEADER)
    write_table(fake_proc, "tcp6", HEADER)
    assert procfs.connection_of(PID) is None
    (fake_proc / str(PID) / "fd" / "3").unlink()
    assert procfs.connection_of(PID) is None


def test_vanished_fd_is_skipped(fake_proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_fd(fake_proc, 3, "socket:[100]")
    add_fd(fake_proc, 5, "socket:[200]")
    real_readlink = os.readlink
    closed = f"{fake_proc}/{PID}/fd/3"

    def readlink(path: str) -> str:
        # fd 3 is closed between listdir and readlink.
        if path == closed:
            raise FileNotFoundError(path)
        return real_readlink(path)

    monkeypatch.setattr(os, "readlink", readlink)
    assert procfs.socket_inodes(PID) == frozenset({200})


def test_unreadable_fd_is_access_denied(fake_proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_fd(fake_proc, 3, "socket:[100]")

    def readlink(path: str) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "readlink", readlink)
    with pytest.raises(AccessDenied):
        procfs.socket_inodes(PID)


def test_tcp6_absent_when_ipv6_is_disabled(fake_proc: Path) -> None:
    write_table(fake_proc, "tcp", HEADER + row(v4("10.0.0.1"), 22, v4("10.0.0.2"), 5000, 9))
    assert [c.inode for c in procfs.tcp_table(PID)] == [9]


def test_tcp_table_reads_both_families(fake_proc: Path) -> None:
    write_table(fake_proc, "tcp", HEADER + row(v4("10.0.0.1"), 22, v4("10.0.0.2"), 5000, 9))
    write_table(fake_proc, "tcp6", HEADER + row(v6("fd00::1"), 22, v6("fd00::2"), 5001, 10))
    assert [(c.family, c.inode) for c in procfs.tcp_table(PID)] == [(4, 9), (6, 10)]


def test_gone_process(fake_proc: Path) -> None:
    with pytest.raises(NoSuchProcess):
        procfs.socket_inodes(PID + 1)
    with pytest.raises(NoSuchProcess):
        procfs.tcp_table(PID + 1)
    with pytest.raises(NoSuchProcess):
        procfs.connection_of(PID + 1)


def test_malformed_table_names_the_file(fake_proc: Path) -> None:
    write_table(fake_proc, "tcp", HEADER + "   0: garbage\n")
    with pytest.raises(ProcError, match=rf"{PID}/net/tcp line 2"):
        procfs.tcp_table(PID)


def test_oversized_table_is_refused(fake_proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procfs, "MAX_TCP_TABLE", 200)
    write_table(fake_proc, "tcp", HEADER + row(v4("10.0.0.1"), 22, v4("10.0.0.2"), 1, 2) * 3)
    with pytest.raises(ProcError, match="larger than 200 bytes"):
        procfs.tcp_table(PID)


def test_non_ascii_table_is_refused(fake_proc: Path) -> None:
    (fake_proc / str(PID) / "net" / "tcp").write_bytes(HEADER.encode() + b"\xff\n")
    with pytest.raises(ProcError, match="not ASCII"):
        procfs.tcp_table(PID)


# -- real processes this test starts -----------------------------------------------------------

@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_proc_info_of_a_child(sleeper: subprocess.Popen[bytes]) -> None:
    info = procfs.proc_info(sleeper.pid)
    assert info.pid == sleeper.pid
    assert info.ppid == os.getpid()
    assert (info.real_uid, info.effective_uid, info.real_gid) == (
        os.getuid(), os.geteuid(), os.getgid())
    assert info.name == "sleep"
    assert info.exe is not None
    assert os.path.basename(info.exe) == "sleep"
    assert info.cmdline == ("sleep", "30")
    assert info.title == "sleep 30"
    assert procfs.still_running(info.pid, info.start_time)
    assert procfs.same_process(info)
    assert not procfs.still_running(info.pid, info.start_time + 1)


def test_zombie_and_exited_processes_are_gone(sleeper: subprocess.Popen[bytes]) -> None:
    info = procfs.proc_info(sleeper.pid)
    sleeper.kill()
    deadline = time.monotonic() + 5
    while procfs.tolerate_gone(lambda: procfs.proc_info(sleeper.pid), None) is not None:
        assert time.monotonic() < deadline  # not yet a zombie
        time.sleep(0.01)
    # Not reaped yet: a zombie, which counts as gone.
    with pytest.raises(NoSuchProcess):
        procfs.proc_info(sleeper.pid)
    assert not procfs.same_process(info)
    sleeper.wait()
    with pytest.raises(NoSuchProcess):
        procfs.proc_info(sleeper.pid)
    assert not procfs.still_running(info.pid, info.start_time)


@pytest.mark.parametrize("pid", [0, -1])
def test_no_parent_pids(pid: int) -> None:
    with pytest.raises(NoSuchProcess):
        procfs.proc_info(pid)


def test_deleted_executable_keeps_the_suffix(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    copy = tmp_path / "sshd"
    shutil.copy(sleep, copy)
    proc = subprocess.Popen([str(copy), "30"])
    try:
        copy.unlink()
        # Recreate the path: psutil would then strip " (deleted)"; we must not.
        copy.write_text("")
        info = procfs.proc_info(proc.pid)
        assert info.exe == f"{copy} (deleted)"
    finally:
        proc.kill()
        proc.wait()


def test_descendants_and_children(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    shell = subprocess.Popen(["sh", "-c", f"sleep 30 & echo $! > {marker}.tmp; "
                              f"mv {marker}.tmp {marker}; wait"])
    grandchild: int | None = None
    try:
        deadline = time.monotonic() + 5
        while not marker.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        grandchild = int(marker.read_text())
        assert shell.pid in procfs.children_of(os.getpid())
        assert grandchild not in procfs.children_of(os.getpid())
        assert procfs.descendants(shell.pid) == [grandchild]
        assert grandchild in procfs.descendants(os.getpid())
    finally:
        if grandchild is not None:
            os.kill(grandchild, signal.SIGKILL)  # reparented to init once the shell dies
        shell.kill()
        shell.wait()
    with pytest.raises(NoSuchProcess):
        procfs.descendants(shell.pid)


def test_connection_of_own_socket() -> None:
    """Our own loopback connection, found through /proc/self's namespace."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                conns = {c.inode: c for c in procfs.tcp_table(os.getpid())}
                inode = os.fstat(client.fileno()).st_ino
                assert conns[inode].remote_port == port
                assert conns[inode].local_port == client.getsockname()[1]
                assert inode in procfs.socket_inodes(os.getpid())


# -- ProcessTree -------------------------------------------------------------------------------


def test_process_tree_children_and_descendants() -> None:
    tree = procfs.ProcessTree.of([
        (1, 0, 0.0), (10, 1, 5.0), (11, 10, 6.0), (12, 10, 6.5), (13, 12, 7.0), (20, 1, 5.0),
    ])
    assert tree.children(10) == [11, 12]
    assert tree.descendants(10) == [11, 12, 13]
    assert tree.descendants(13) == []
    assert tree.children(99) == [] and tree.descendants(99) == []


def test_process_tree_drops_links_to_a_reused_parent_pid() -> None:
    # 30 started before the current process 10: its parent was an earlier 10.
    tree = procfs.ProcessTree.of([(10, 1, 50.0), (30, 10, 40.0), (31, 10, 60.0)])
    assert tree.children(10) == [31]


def test_process_tree_survives_a_cycle() -> None:
    # Impossible in a real /proc, but a snapshot of racing reads must not loop.
    tree = procfs.ProcessTree.of([(5, 6, 1.0), (6, 5, 1.0)])
    assert tree.descendants(5) == [6]


def test_process_tree_matches_psutil_for_this_process() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while not procfs.children_of(child.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        links = [(p.pid, p.info["ppid"], p.info["create_time"])
                 for p in psutil.process_iter(["ppid", "create_time"])]
        tree = procfs.ProcessTree.of(links)
        assert tree.descendants(child.pid) == procfs.descendants(child.pid)
        assert child.pid in tree.children(os.getpid())
    finally:
        for pid in procfs.descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_started_at_is_proc_infos_start_time() -> None:
    assert procfs.started_at(os.getpid()) == procfs.proc_info(os.getpid()).start_time
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(NoSuchProcess):
        procfs.started_at(child.pid)  # a zombie counts as gone
    child.wait()
    with pytest.raises(NoSuchProcess):
        procfs.started_at(child.pid)


def test_resource_limits_are_read_as_setrlimit_takes_them() -> None:
    import resource  # noqa: PLC0415

    limits = procfs.resource_limits(os.getpid())
    assert set(limits) == set(range(16))
    for number, value in limits.items():
        assert value == resource.getrlimit(number), number
