"""The kernel's proc connector: fork, exec, uid change and exit of every process, as they happen.

The broker follows logins by these events: a root sshd listener forking a connection's
monitor, the monitor switching its effective uid to read the user's key files (the
pre-authentication key check), the monitor's post-authentication child taking the
user's uid (authentication is over), a slurmstepd exiting. On kernels that filter
(6.6 and later) it subscribes to those four event types only. Subscribing needs
CAP_NET_ADMIN, and the kernel offers the connector in the initial network namespace
only: a broker running in another one (the lab's nodes) opens its socket there through
a throwaway thread that ``setns()``es, so no other thread ever changes namespace.
It must run in the initial pid and user namespaces, though: events name processes by
their pids there, and the kernel ignores subscriptions from anywhere else
(``cn_proc_mcast_ctl``). A broker in a container with a pid namespace of its own would
read other processes' pids (seen: a node's pid 630 reported as 2122), so it does without.

Message layout: ``include/uapi/linux/cn_proc.h`` (``struct proc_event``, which follows
a ``struct cn_msg`` inside a netlink message). Datagrams are parsed with bounds checks
at every step and fuzzed (``tests/unit/test_fuzz.py``): they come from the kernel, but
a parser that trusts lengths is one kernel change away from a crash loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Final

import psutil

from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node.procfs import own_netns

_NETLINK_CONNECTOR: Final = 11
_CN_IDX_PROC: Final = 1
_CN_VAL_PROC: Final = 1
_PROC_CN_MCAST_LISTEN: Final = 1
_NLMSG_DONE: Final = 3
_NLMSG: Final = struct.Struct("=IHHII")
_CN_MSG: Final = struct.Struct("=IIIIHH")
_EVENT_HEAD: Final = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FORK: Final = struct.Struct("=IIII")  # parent pid, parent tgid, child pid, child tgid
_PAIR: Final = struct.Struct("=II")  # pid, tgid
_ID: Final = struct.Struct("=IIII")  # pid, tgid, real id, effective id
PROC_EVENT_FORK: Final = 0x1
PROC_EVENT_EXEC: Final = 0x2
PROC_EVENT_UID: Final = 0x4
PROC_EVENT_EXIT: Final = 0x80000000
_CLONE_NEWNET: Final = 0x40000000
#: The events the broker reads. From Linux 6.6 a listener may name them
#: (``struct proc_input`` instead of the bare ``enum proc_cn_mcast_op``;
#: ``drivers/connector/cn_proc.c``, ``cn_proc_mcast_ctl`` and ``cn_filter``), and the
#: kernel drops gid, sid, comm, ptrace and coredump events before they are queued.
FOLLOWED_EVENTS: Final = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_UID | PROC_EVENT_EXIT
#: The first kernel release that reads an event mask. Older ones ignore a subscription
#: of any other length than the bare operation, silently: no events at all.
FILTER_SINCE: Final = (6, 6)
#: The initial pid and user namespaces, as /proc/self/ns names them: their inode numbers
#: are fixed (``include/linux/proc_ns.h``: PROC_PID_INIT_INO, PROC_USER_INIT_INO).
INITIAL_NAMESPACES: Final = {"pid": "pid:[4026531836]", "user": "user:[4026531837]"}
#: Receive buffer asked for: bursts of forks (an MPI launch) must not overflow it.
RECEIVE_BUFFER: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class ProcEvent:
    """One event of one process (threads are left out).

    ``parent`` is set for a fork; ``ruid``/``euid`` for a uid change;
    ``timestamp_ns`` is the kernel's monotonic clock when it happened.
    """

    what: int
    pid: int
    parent: int = 0
    ruid: int = -1
    euid: int = -1
    timestamp_ns: int = 0


def subscription(release: str) -> bytes:
    """The ``PROC_CN_MCAST_LISTEN`` payload for a kernel of ``release`` (``uname -r``).

    With an event mask (:data:`FOLLOWED_EVENTS`) from :data:`FILTER_SINCE` on, the
    bare operation before, or when the release cannot be read.
    """
    found = re.match(r"(\d+)\.(\d+)", release)
    if found is not None and (int(found[1]), int(found[2])) >= FILTER_SINCE:
        return struct.pack("=II", _PROC_CN_MCAST_LISTEN, FOLLOWED_EVENTS)
    return struct.pack("=I", _PROC_CN_MCAST_LISTEN)


def _connector_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
    try:
        sock.bind((0, _CN_IDX_PROC))
        payload = subscription(os.uname().release)
        cn = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(payload), 0)
        header = _NLMSG.pack(_NLMSG.size + len(cn) + len(payload), _NLMSG_DONE, 0, 0, 0)
        sock.send(header + cn + payload)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        sock.close()
        raise
    return sock


def _connector_in_netns(path: str) -> socket.socket:
    """Open the connector socket in the network namespace ``path`` names.

    A netlink socket keeps the namespace it was created in, so a throwaway
    thread enters the namespace, creates the socket and ends: no other thread
    of the broker ever changes namespace.
    """
    result: list[socket.socket] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            errors.append(err)
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(target, _CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns into {path}: {os.strerror(errno)}")
            result.append(_connector_socket())
        except BaseException as err:  # handed to the caller
            errors.append(err)
        finally:
            os.close(target)

    thread = threading.Thread(target=work, name="procevents-netns")
    thread.start()
    thread.join()
    if errors or not result:
        raise errors[0] if errors else OSError(f"no connector socket in {path}")
    return result[0]


def _other_netns(limit: int = 16) -> list[str]:
    """/proc paths of up to ``limit`` distinct network namespaces other than ours.

    The kernel offers the proc connector in the initial namespace only. Its
    canonical handle, /proc/1/ns/net, may be refused (a pid 1 with more
    capabilities than ours fails the ptrace access check), so any process
    living in another namespace is a candidate; the kernel tells us which
    one is right by accepting the subscription.
    """
    mine = own_netns()
    seen = {mine}
    paths: list[str] = []
    for pid in [1, *psutil.pids()]:
        path = f"/proc/{pid}/ns/net"
        try:
            name = os.readlink(path)
        except OSError:
            continue
        if name not in seen:
            seen.add(name)
            paths.append(path)
            if len(paths) >= limit:
                break
    return paths


def foreign_namespace() -> str | None:
    """Why this process may not follow the connector: it runs in a pid or user namespace
    other than the initial one (or cannot tell). None where it may."""
    for kind, initial in INITIAL_NAMESPACES.items():
        try:
            name = os.readlink(f"/proc/self/ns/{kind}")
        except OSError as err:
            return f"cannot read /proc/self/ns/{kind}: {err.strerror}"
        if name != initial:
            return (f"not in the initial {kind} namespace ({name}): the kernel's events would "
                    "name other processes")
    return None


def open_proc_connector() -> socket.socket:
    """A subscribed, non-blocking proc connector socket.

    Raises OSError if the kernel will not give one, or (EOPNOTSUPP) when this process
    runs in a pid or user namespace of its own (:func:`foreign_namespace`).
    """
    why = foreign_namespace()
    if why is not None:
        raise OSError(errno.EOPNOTSUPP, why)
    try:
        return _connector_socket()
    except OSError as first:
        for path in _other_netns():
            try:
                sock = _connector_in_netns(path)
            except OSError:
                continue
            logger().info("proc connector opened in the network namespace of %s", path)
            return sock
        raise first


def parse_proc_events(data: bytes) -> list[ProcEvent]:
    """Decode one datagram of proc connector messages (unknown events are skipped)."""
    events: list[ProcEvent] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, offset)[0]
        if length < _NLMSG.size or offset + length > len(data):
            break
        end = offset + length
        start = offset + _NLMSG.size + _CN_MSG.size
        if start + _EVENT_HEAD.size <= end:
            what, _cpu, stamp = _EVENT_HEAD.unpack_from(data, start)
            detail = start + _EVENT_HEAD.size
            event = _event(data, what, detail, end, stamp)
            if event is not None:
                events.append(event)
        offset += (length + 3) & ~3
    return events


def _event(data: bytes, what: int, at: int, end: int, stamp: int) -> ProcEvent | None:
    if what == PROC_EVENT_FORK and at + _FORK.size <= end:
        _ppid, parent_tgid, child_pid, child_tgid = _FORK.unpack_from(data, at)
        if child_pid == child_tgid:  # a new process, not a thread
            return ProcEvent(what, child_tgid, parent=parent_tgid, timestamp_ns=stamp)
    elif what in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) and at + _PAIR.size <= end:
        pid, tgid = _PAIR.unpack_from(data, at)
        if pid == tgid:
            return ProcEvent(what, tgid, timestamp_ns=stamp)
    elif what == PROC_EVENT_UID and at + _ID.size <= end:
        pid, tgid, ruid, euid = _ID.unpack_from(data, at)
        if pid == tgid:
            return ProcEvent(what, tgid, ruid=ruid, euid=euid, timestamp_ns=stamp)
    return None
