"""Filesystem access as another user, from a thread of a root process."""

from __future__ import annotations

import os
import platform
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal.node import fsids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setfsuid needs root")
NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory anyone may enter and write (pytest's tmp_path is root's alone)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as name:
        path = Path(name)
        path.chmod(0o777)
        yield path


def test_files_are_made_and_checked_as_the_user(shared_dir: Path) -> None:
    tmp_path = shared_dir
    made = tmp_path / "made"
    fsids.call_as(NOBODY, NOBODY, made.touch, timeout=5, what="touch")
    assert (made.stat().st_uid, made.stat().st_gid) == (NOBODY, NOBODY)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    with pytest.raises(PermissionError):
        fsids.call_as(NOBODY, NOBODY, secret.read_text, timeout=5, what="read")
    assert os.geteuid() == 0 and secret.read_text() == "root only"  # this thread unchanged


def test_a_hung_operation_times_out_and_counts_as_pending() -> None:
    release = threading.Event()
    pending = threading.BoundedSemaphore(1)
    with pytest.raises(fsids.FsidsError, match="not done within"):
        fsids.call_as(NOBODY, NOBODY, release.wait, timeout=0.05, what="hang",
                      pending=pending)
    with pytest.raises(fsids.FsidsError, match="too many operations still pending"):
        fsids.call_as(NOBODY, NOBODY, lambda: None, timeout=1, what="next", pending=pending)
    release.set()
    time.sleep(0.1)
    assert fsids.call_as(NOBODY, NOBODY, lambda: 7, timeout=1, what="after",
                         pending=pending) == 7


def test_a_socket_connected_as_peer_shows_the_users_ids_to_its_server(
        shared_dir: Path) -> None:
    """What munged reads (SO_PEERCRED) is the thread's effective uid and gid; the
    process's other threads, this one included, stay root."""
    path = str(shared_dir / "sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    seen: list[tuple[int, int, int]] = []

    def connect() -> tuple[int, int]:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        peer, _ = server.accept()
        seen.append(struct.unpack("3i", peer.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))))
        peer.close()
        client.close()
        return os.geteuid(), os.getegid()

    try:
        ids = fsids.call_as_peer(NOBODY, NOBODY - 1, connect, timeout=5, what="connect")
    finally:
        server.close()
    assert ids == (NOBODY, NOBODY - 1)
    assert [(uid, gid) for _pid, uid, gid in seen] == [(NOBODY, NOBODY - 1)]
    assert (os.geteuid(), os.getegid(), os.getuid()) == (0, 0, 0)
    # The thread's real and saved ids were root's: nothing of the process changed.
    status = Path("/proc/self/status").read_text()
    assert "\nUid:\t0\t0\t0\t0\n" in status and "\nGid:\t0\t0\t0\t0\n" in status


def test_an_unknown_machine_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "sparc64")
    assert not fsids.peer_ids_supported()
    with pytest.raises(fsids.FsidsError, match="no per-thread setresuid known for sparc64"):
        fsids.call_as_peer(NOBODY, NOBODY, lambda: None, timeout=1, what="x")
