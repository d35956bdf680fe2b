"""Filesystem access as another user: a throwaway thread with that user's fsuid and fsgid.

``setfsuid``/``setfsgid`` act on the calling thread only (glibc broadcasts ``setuid`` to
every thread, not these), so the broker's other threads keep root's identity. Access
checks then are the user's: a home that root cannot read (NFS with root_squash, a 0700
``~/.ssh``) reads as it does for sshd, and a ``/proc/<pid>`` file owned by the user is
writable without CAP_DAC_OVERRIDE. Needs CAP_SETUID and CAP_SETGID (``setfsuid(2)``).
A hung file server stalls the one thread: the caller waits at most its timeout.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

from sshd_adopt.errors import Error

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


class FsidsError(Error):
    """The operation could not run as the user: ids not taken, too many pending, timed out."""


def call_as(uid: int, gid: int, work: Callable[[], T], *, timeout: float, what: str,
            pending: threading.BoundedSemaphore | None = None) -> T:
    """``work()`` in a new thread whose filesystem ids are ``uid``/``gid``; its result.

    Exceptions of ``work`` are re-raised here. Raises :class:`FsidsError` when the ids
    cannot be taken, when ``pending`` (a bound on abandoned threads) is exhausted, or
    when ``work`` does not finish within ``timeout`` seconds (the thread is abandoned).
    ``what`` names the operation in errors.
    """
    if pending is not None and not pending.acquire(blocking=False):
        raise FsidsError(f"{what}: too many operations still pending (a file server hung?)")
    result: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            _libc.setfsgid(gid)
            _libc.setfsuid(uid)
            # setfsuid returns the previous value: asking again confirms the switch.
            if _libc.setfsuid(uid) != uid or _libc.setfsgid(gid) != gid:
                raise FsidsError(f"{what}: cannot take uid {uid}/gid {gid} (CAP_SETUID?)")
            result.append(work())
        except BaseException as err:  # handed to the caller
            failure.append(err)
        finally:
            if pending is not None:
                pending.release()
            done.set()

    threading.Thread(target=run, name=f"as-uid-{uid}", daemon=True).start()
    if not done.wait(timeout):
        raise FsidsError(f"{what}: not done within {timeout:g} s (a file server hung?)")
    if failure:
        raise failure[0]
    return result[0]
