"""Ending a connection: SIGTERM to every process of it, SIGKILL to those still there later;
holding a post-authentication child still while its admission is decided.

Each process is pinned by its start time when the SIGTERM goes out, so the SIGKILL
never reaches a process that took a reused pid meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Sequence

from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import procfs
from sshd_adopt.errors import ProcError


def terminate(pids: Sequence[int], *, kill_after: float, why: str) -> list[int]:
    """SIGTERM ``pids`` now and SIGKILL the survivors after ``kill_after`` seconds.

    Returns the pids that were signalled. A signal the kernel refuses (EPERM: the broker
    lacks CAP_KILL) is logged as an error, never swallowed: a session that should have
    ended would otherwise go on unnoticed.
    """
    starts: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(ProcError):
            starts[pid] = procfs.started_at(pid)
    sent = [pid for pid in starts if _send(pid, signal.SIGTERM)]
    logger().warning("%s: SIGTERM sent to %s", why, sorted(sent)[:20])

    def finish() -> None:
        for pid, start in starts.items():
            if procfs.still_running(pid, start) and _send(pid, signal.SIGKILL):
                logger().warning("%s: SIGKILL sent to %d", why, pid)

    timer = threading.Timer(kill_after, finish)
    timer.daemon = True
    timer.start()
    return sent


def _send(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger().error("cannot send %s to pid %d: permission denied (is CAP_KILL granted?)",
                       sig.name, pid)
        return False
    return True


def end_at_authentication(monitor: int, user_side: Sequence[int], *, kill_after: float,
                          why: str) -> list[int]:
    """End a connection right after authentication, before its session ran anything.

    ``user_side`` (the post-authentication child and anything it forked: the user's
    uid, nothing of theirs has run) gets SIGKILL at once, so not another packet of the
    session is handled; the root ``monitor`` gets SIGTERM, so that it closes the session
    as sshd does (PAM, utmp), then SIGKILL after ``kill_after`` seconds if still there.
    Returns the pids signalled.
    """
    killed = [pid for pid in user_side if _send(pid, signal.SIGKILL)]
    if killed:
        logger().warning("%s: SIGKILL sent to %s", why, sorted(killed)[:20])
    return killed + terminate([monitor], kill_after=kill_after, why=why)


def kill_connection(monitor: int, pids: Sequence[int]) -> list[int]:
    """SIGKILL a connection at once: its monitor's whole process group, then ``pids``.

    sshd makes each connection's process the leader of a session and process group of
    its own (``setsid()`` after the listener's fork: OpenSSH sshd.c), and the pre- and
    post-authentication children it forks stay in that group (the user's shell calls
    ``setsid()`` again: session.c). One ``killpg`` therefore also reaches a child whose
    fork the broker has not heard of yet, and a fork racing with it fails (the kernel
    restarts a fork that a group signal interrupts). The group is signalled only while
    the monitor (or its zombie) still leads it, so the id cannot have been reused.
    ``pids`` outside the group get their own SIGKILL. No log line (watcher thread).
    Returns the pids signalled (the monitor first when the group was).
    """
    killed: list[int] = []
    try:
        leads = os.getpgid(monitor) == monitor
    except ProcessLookupError:
        leads = False
    if leads:
        try:
            os.killpg(monitor, signal.SIGKILL)
            killed.append(monitor)
        except ProcessLookupError:
            pass
        except PermissionError:
            logger().error("cannot send SIGKILL to process group %d: permission denied "
                           "(is CAP_KILL granted?)", monitor)
    killed += [pid for pid in pids if pid not in killed and _send(pid, signal.SIGKILL)]
    return killed


def hold(pid: int) -> bool:
    """Stop ``pid`` (SIGSTOP) until :func:`release`; False if it is gone."""
    return _send(pid, signal.SIGSTOP)


def release(pid: int) -> None:
    """Continue a process :func:`hold` stopped (nothing if it is gone)."""
    _send(pid, signal.SIGCONT)
