"""Ask another process's socket for its endpoints directly (``pidfd_getfd(2)``).

Why: finding a connection's 4-tuple through ``/proc/<pid>/net/tcp{,6}`` makes
the kernel walk its whole TCP hash table, sized by RAM rather than by the
number of sockets; on a 24 GiB node that costs ~3 ms per lookup even with a
handful of connections, and the broker does one per gate call and per
adoption. Duplicating the monitor's socket into the broker and calling
``getsockname``/``getpeername`` on it costs microseconds.

The duplicate is only ever *closed*: never shut down, read or written, so
the connection is untouched (a socket lives until its last descriptor goes).
``pidfd_getfd`` needs Linux 5.6 and ptrace rights over the target (root has
them unless Yama's ``ptrace_scope`` is 3); when it is unavailable,
:class:`Unavailable` tells the caller to read the TCP tables instead.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket

from sshd_adopt._internal.core.connection import Connection, normalise
from sshd_adopt.errors import AccessDenied, NoSuchProcess

# The same number on every architecture with the unified syscall table
# (x86_64, aarch64, ppc64le, s390x, riscv64): added together in Linux 5.6.
_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Errors that mean "this kernel or its policy will not let us", for good:
# ENOSYS (older kernel), EPERM (Yama ptrace_scope=3, a seccomp filter).
_UNSUPPORTED = (errno.ENOSYS, errno.EPERM)


class Unavailable(AccessDenied):
    """``pidfd_getfd`` cannot be used here; the caller falls back to the TCP tables."""


def _getfd(pidfd: int, target_fd: int) -> int | None:
    """A duplicate of ``target_fd`` of the pidfd's process; None if that fd is closed now."""
    fd = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err == errno.EBADF:
        return None  # closed between listing /proc/<pid>/fd and now: expected race
    if err == errno.ESRCH:
        raise NoSuchProcess("the process exited while its sockets were read")
    if err in _UNSUPPORTED:
        raise Unavailable(os.strerror(err))
    raise OSError(err, os.strerror(err))


def _endpoints(fd: int, inode: int) -> Connection | None:
    """The connection of a duplicated fd if it is a connected TCP socket, else None."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)  # not a socket any more (the fd number was reused)
        return None
    with sock:  # closes our duplicate only
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            return None
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_TCP:
            return None  # e.g. MPTCP or SCTP, which /proc/net/tcp does not list either
        if os.fstat(sock.fileno()).st_ino != inode:
            return None  # the fd number now names another socket
        try:
            local, remote = sock.getsockname(), sock.getpeername()
        except OSError:
            return None  # not connected (a listener): not a client connection
    return Connection(
        local_ip=normalise(ipaddress.ip_address(local[0])),
        local_port=int(local[1]),
        remote_ip=normalise(ipaddress.ip_address(remote[0])),
        remote_port=int(remote[1]),
        inode=inode,
    )


def first_tcp_connection(pid: int, sockets: list[tuple[int, int]]) -> Connection | None:
    """The connection of the lowest fd in ``sockets`` (``(fd, inode)``) that is TCP.

    Raises :class:`Unavailable` if ``pidfd_getfd`` cannot be used and
    NoSuchProcess if ``pid`` is gone. The caller checks afterwards that
    ``pid`` is still the process it meant (pids are reused).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError as err:
        raise NoSuchProcess(f"process {pid} is gone") from err
    except OSError as err:
        if err.errno in _UNSUPPORTED:
            raise Unavailable(str(err)) from err
        raise
    try:
        for target_fd, inode in sockets:
            fd = _getfd(pidfd, target_fd)
            if fd is None:
                continue
            connection = _endpoints(fd, inode)
            if connection is not None:
                return connection
        return None
    finally:
        os.close(pidfd)
