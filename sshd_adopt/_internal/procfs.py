"""Race-tolerant readers of /proc: processes, their sockets, their TCP tables.

Every reader maps OS errors once (:func:`_mapped`): a vanished process becomes
:class:`~sshd_adopt.errors.NoSuchProcess`, a refusal
:class:`~sshd_adopt.errors.AccessDenied`. Processes come and go while we look;
each place where that can happen says so in a comment and decides whether the
race is harmless (skip) or must abort the request (raise).

TCP tables are read from ``/proc/<pid>/net/tcp{,6}``, which shows the network
namespace *of that process*, not the reader's: the broker may run in another
namespace than the sshd it inspects (the test harness does exactly that).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import psutil

from sshd_adopt._internal.connection import Connection, normalise
from sshd_adopt.errors import AccessDenied, NoSuchProcess, ProcError

PROCFS = "/proc"
MAX_TCP_TABLE = 16 * 1024 * 1024  # bytes; a node with ~100k sockets still fits

T = TypeVar("T")


@dataclass(frozen=True)
class ProcInfo:
    """The facts about one process that the session checks need."""

    pid: int
    ppid: int
    real_uid: int
    effective_uid: int
    real_gid: int
    name: str
    exe: str | None
    cmdline: tuple[str, ...]
    start_time: float


@contextlib.contextmanager
def _mapped(pid: int) -> Iterator[None]:
    """Map psutil's and the OS's errors about ``pid`` to ours, once."""
    try:
        yield
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError) as err:
        raise NoSuchProcess(f"process {pid} is gone") from err
    except (psutil.AccessDenied, PermissionError) as err:
        raise AccessDenied(f"not allowed to inspect process {pid}: {err}") from err
    except psutil.Error as err:
        raise ProcError(f"process {pid}: {err}") from err


def proc_info(pid: int) -> ProcInfo:
    """Read one process's facts; a zombie counts as gone."""
    with _mapped(pid):
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.NoSuchProcess(pid)
            uids = proc.uids()
            gids = proc.gids()
            try:
                exe: str | None = os.readlink(f"{PROCFS}/{pid}/exe")
            except FileNotFoundError:
                exe = None  # kernel threads have no exe; the process may also be exiting
            return ProcInfo(
                pid=pid,
                ppid=proc.ppid(),
                real_uid=uids.real,
                effective_uid=uids.effective,
                real_gid=gids.real,
                name=proc.name(),
                exe=exe,
                cmdline=tuple(proc.cmdline()),
                start_time=proc.create_time(),
            )


def socket_inodes(pid: int) -> list[int]:
    """Inodes of the sockets ``pid`` holds, in file-descriptor order."""
    fd_dir = f"{PROCFS}/{pid}/fd"
    with _mapped(pid):
        names = os.listdir(fd_dir)
    inodes: list[int] = []
    for name in sorted(names, key=lambda n: int(n) if n.isdigit() else -1):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except (FileNotFoundError, OSError):
            continue  # the fd was closed between listdir and readlink: not ours to chase
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.append(int(target[8:-1]))
    return inodes


def _address(hex_text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Decode /proc/net/tcp's address: 32-bit words printed as native-endian hex."""
    if len(hex_text) not in (8, 32):
        raise ValueError(f"address {hex_text!r} has {len(hex_text)} hex digits")
    raw = b"".join(
        struct.pack("=I", int(hex_text[i : i + 8], 16)) for i in range(0, len(hex_text), 8)
    )
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    return ipaddress.IPv6Address(raw)


def parse_tcp_table(text: str, source: str) -> list[Connection]:
    """Parse the text of /proc/net/tcp or tcp6 (any state) into connections."""
    connections: list[Connection] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "sl":
            continue  # the header
        try:
            local, remote, inode = fields[1], fields[2], int(fields[9])
            local_ip, local_port = local.split(":")
            remote_ip, remote_port = remote.split(":")
            connections.append(
                Connection(
                    local_ip=normalise(_address(local_ip)),
                    local_port=int(local_port, 16),
                    remote_ip=normalise(_address(remote_ip)),
                    remote_port=int(remote_port, 16),
                    inode=inode,
                )
            )
        except (IndexError, ValueError) as err:
            raise ProcError(f"error parsing {source} line {lineno}: {line[:120]!r}") from err
    return connections


def tcp_table(pid: int) -> list[Connection]:
    """Every TCP socket in ``pid``'s network namespace (IPv4 then IPv6)."""
    connections: list[Connection] = []
    for name in ("tcp", "tcp6"):
        path = f"{PROCFS}/{pid}/net/{name}"
        try:
            with _mapped(pid), open(path, encoding="ascii") as handle:
                text = handle.read(MAX_TCP_TABLE + 1)
        except NoSuchProcess:
            raise
        except ProcError:
            if name == "tcp6":
                continue  # IPv6 disabled in that namespace
            raise
        if len(text) > MAX_TCP_TABLE:
            raise ProcError(f"{path} is larger than {MAX_TCP_TABLE} bytes")
        connections += parse_tcp_table(text, path)
    return connections


def connection_of(pid: int) -> Connection | None:
    """The TCP connection of the lowest-numbered TCP socket ``pid`` holds, if any.

    sshd's per-connection monitor holds exactly one TCP socket: the client's.
    """
    inodes = socket_inodes(pid)
    if not inodes:
        return None
    by_inode = {conn.inode: conn for conn in tcp_table(pid)}
    for inode in inodes:
        if inode in by_inode:
            return by_inode[inode]
    return None


def children(pid: int, *, recursive: bool = False) -> list[int]:
    """Child pids (or all descendants); processes that vanish meanwhile are skipped."""
    with _mapped(pid):
        return [child.pid for child in psutil.Process(pid).children(recursive=recursive)]


def still_running(pid: int, start_time: float) -> bool:
    """True if ``pid`` still names the process that started at ``start_time``.

    Guards against pid reuse between looking at a process and acting on it.
    """
    try:
        return proc_info(pid).start_time == start_time
    except ProcError:
        return False


def tolerate_gone(func: Callable[[], T], default: T) -> T:
    """Run ``func``; a process vanishing meanwhile yields ``default``."""
    try:
        return func()
    except NoSuchProcess:
        return default
