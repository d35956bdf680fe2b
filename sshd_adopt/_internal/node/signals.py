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


def kill_now(pid: int) -> bool:
    """SIGKILL ``pid`` at once (no log line: callers on the watcher thread log later);
    False if it is gone."""
    return _send(pid, signal.SIGKILL)


def hold(pid: int) -> bool:
    """Stop ``pid`` (SIGSTOP) until :func:`release`; False if it is gone."""
    return _send(pid, signal.SIGSTOP)


def release(pid: int) -> None:
    """Continue a process :func:`hold` stopped (nothing if it is gone)."""
    _send(pid, signal.SIGCONT)
