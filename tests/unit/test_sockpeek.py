"""sockpeek against real sockets: the same answer as the TCP tables, the connection untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.node import procfs, sockpeek
from sshd_adopt.errors import NoSuchProcess


@contextmanager
def loopback(
    host: str, family: socket.AddressFamily
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, accepted) pair over ``host``."""
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        with socket.create_connection((host, port)) as client:
            accepted, _ = server.accept()
            with accepted:
                yield client, accepted


def from_tables(pid: int, inode: int) -> Connection:
    return {c.inode: c for c in procfs.tcp_table(pid)}[inode]


@pytest.mark.parametrize(("host", "family"), [
    ("127.0.0.1", socket.AF_INET),
    ("::1", socket.AF_INET6),
])
def test_same_answer_as_the_tcp_tables(host: str, family: socket.AddressFamily) -> None:
    with loopback(host, family) as (client, _accepted):
        inode = os.fstat(client.fileno()).st_ino
        found = sockpeek.first_tcp_connection(os.getpid(), [(client.fileno(), inode)])
        assert found == from_tables(os.getpid(), inode)
        assert found is not None and found.remote_port == client.getpeername()[1]


def test_ipv4_mapped_address_is_normalised() -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted:
                assert accepted.getpeername()[0] == "::ffff:127.0.0.1"
                inode = os.fstat(accepted.fileno()).st_ino
                found = sockpeek.first_tcp_connection(os.getpid(), [(accepted.fileno(), inode)])
                assert found is not None
                assert str(found.remote_ip) == "127.0.0.1" and found.family == 4
                assert found == from_tables(os.getpid(), inode)


def test_lowest_tcp_fd_wins_and_other_sockets_are_skipped() -> None:
    unix_a, unix_b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = socket.create_server(("127.0.0.1", 0))
    with unix_a, unix_b, udp, listener, loopback("127.0.0.1", socket.AF_INET) as (client, acc):
        pairs = [(s.fileno(), os.fstat(s.fileno()).st_ino)
                 for s in (unix_a, udp, listener, client, acc)]
        found = sockpeek.first_tcp_connection(os.getpid(), sorted(pairs))
        first = min(client.fileno(), acc.fileno())
        assert found is not None and found.inode == os.fstat(first).st_ino


def test_the_connection_is_untouched() -> None:
    with loopback("127.0.0.1", socket.AF_INET) as (client, accepted):
        inode = os.fstat(client.fileno()).st_ino
        for _ in range(3):
            sockpeek.first_tcp_connection(os.getpid(), [(client.fileno(), inode)])
        client.sendall(b"still here")
        assert accepted.recv(64) == b"still here"
        accepted.sendall(b"and back")
        assert client.recv(64) == b"and back"


def test_closed_fd_and_stale_inode_are_skipped() -> None:
    with loopback("127.0.0.1", socket.AF_INET) as (client, _accepted):
        inode = os.fstat(client.fileno()).st_ino
        # An fd number that is not open, then the right fd with the wrong inode
        # (the fd was closed and reused between listing and asking).
        assert sockpeek.first_tcp_connection(os.getpid(), [(9999, inode)]) is None
        assert sockpeek.first_tcp_connection(os.getpid(), [(client.fileno(), inode + 1)]) is None


def test_another_process() -> None:
    """The broker's case: a socket held by a different process."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import socket,sys,time; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
             "print(s.fileno(), flush=True); time.sleep(30)", str(port)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout is not None
            fd = int(child.stdout.readline())
            accepted, peer = server.accept()
            with accepted:
                found = procfs.connection_of(child.pid)
                assert found is not None
                assert (found.local_port, found.remote_port) == (peer[1], port)
                inode = dict(procfs._socket_fds(child.pid))[fd]
                assert found == from_tables(child.pid, inode)
        finally:
            child.kill()
            child.wait()
        with pytest.raises(NoSuchProcess):
            sockpeek.first_tcp_connection(child.pid, [(fd, 1)])


def test_connection_of_falls_back_to_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, sockets: list[tuple[int, int]]) -> None:
        raise sockpeek.Unavailable("Operation not permitted")

    monkeypatch.setattr(sockpeek, "first_tcp_connection", refuse)
    monkeypatch.setattr(procfs, "_pidfd_usable", True)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    # The listener is closed: the tables also list listening sockets.
    with client, accepted:
        found = procfs.connection_of(os.getpid())
        lowest = min(client.fileno(), accepted.fileno())
        assert found is not None and found.inode == os.fstat(lowest).st_ino
    assert procfs._pidfd_usable is False
