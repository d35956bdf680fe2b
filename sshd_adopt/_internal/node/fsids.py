"""Work done as another user: a throwaway thread with that user's ids, never the process.

Two kinds of ids, each taken by one new thread that ends with the work, so the ids die
with it and the broker's other threads keep root's identity:

* **filesystem ids** (:func:`call_as`): ``setfsuid``/``setfsgid`` act on the calling
  thread only. Access checks then are the user's: a home that root cannot read (NFS with
  root_squash, a 0700 ``~/.ssh``) reads as it does for sshd, and a ``/proc/<pid>`` file
  owned by the user is writable without CAP_DAC_OVERRIDE.
* **effective ids** (:func:`call_as_peer`): what a unix socket's peer credentials
  (``SO_PEERCRED``: effective uid and gid at ``connect()``) report, so that munged mints a
  credential for the user. glibc's ``setresuid`` changes every thread of the process
  (its setxid broadcast), so the raw system call is made: the kernel keeps credentials
  per thread. Real and saved ids stay root's; supplementary groups are not changed
  (``SO_PEERCRED`` carries none).

Both need CAP_SETUID and CAP_SETGID. A hung server (file or munged) stalls the one
thread: the caller waits at most its timeout.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

from sshd_adopt.errors import Error

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
#: ``setresuid``/``setresgid`` system call numbers by machine (``uname -m``), from the
#: kernel's ``arch/x86/entry/syscalls/syscall_64.tbl`` and
#: ``include/uapi/asm-generic/unistd.h`` (arm64).
_SETRESID_CALLS: dict[str, tuple[int, int]] = {"x86_64": (117, 119), "aarch64": (147, 149)}


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
    def take() -> None:
        _libc.setfsgid(gid)
        _libc.setfsuid(uid)
        # setfsuid returns the previous value: asking again confirms the switch.
        if _libc.setfsuid(uid) != uid or _libc.setfsgid(gid) != gid:
            raise FsidsError(f"{what}: cannot take uid {uid}/gid {gid} (CAP_SETUID?)")

    return _on_thread(uid, take, work, timeout=timeout, what=what, pending=pending)


def peer_ids_supported() -> bool:
    """Whether :func:`call_as_peer` knows this machine's system call numbers."""
    return platform.machine() in _SETRESID_CALLS


def call_as_peer(uid: int, gid: int, work: Callable[[], T], *, timeout: float, what: str,
                 pending: threading.BoundedSemaphore | None = None) -> T:
    """``work()`` in a new thread whose effective ids are ``uid``/``gid``; its result.

    A socket ``work`` connects shows ``uid``/``gid`` to its peer (``SO_PEERCRED``). Raises
    :class:`FsidsError` on an unknown machine (:func:`peer_ids_supported`), when the
    ids cannot be taken, when ``pending`` is exhausted, or after ``timeout`` seconds.
    """
    calls = _SETRESID_CALLS.get(platform.machine())
    if calls is None:
        raise FsidsError(f"{what}: no per-thread setresuid known for {platform.machine()}")
    setresuid, setresgid = calls
    keep = ctypes.c_long(-1)

    def take() -> None:
        if (_libc.syscall(ctypes.c_long(setresgid), keep, ctypes.c_long(gid), keep) != 0
                or _libc.syscall(ctypes.c_long(setresuid), keep, ctypes.c_long(uid),
                                 keep) != 0):
            errno = ctypes.get_errno()
            raise FsidsError(f"{what}: cannot take uid {uid}/gid {gid}: {os.strerror(errno)}")
        if os.geteuid() != uid or os.getegid() != gid:  # this thread's, from the kernel
            raise FsidsError(f"{what}: uid {uid}/gid {gid} not taken")

    return _on_thread(uid, take, work, timeout=timeout, what=what, pending=pending)


def _on_thread(uid: int, take: Callable[[], None], work: Callable[[], T], *, timeout: float,
               what: str, pending: threading.BoundedSemaphore | None) -> T:
    """Run ``take()`` then ``work()`` on a new thread that ends with them."""
    if pending is not None and not pending.acquire(blocking=False):
        raise FsidsError(f"{what}: too many operations still pending (a server hung?)")
    result: list[T] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            take()
            result.append(work())
        except BaseException as err:  # handed to the caller
            failure.append(err)
        finally:
            if pending is not None:
                pending.release()
            done.set()

    threading.Thread(target=run, name=f"as-uid-{uid}", daemon=True).start()
    if not done.wait(timeout):
        raise FsidsError(f"{what}: not done within {timeout:g} s (a server hung?)")
    if failure:
        raise failure[0]
    return result[0]
