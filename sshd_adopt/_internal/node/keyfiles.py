"""Read a user's key file the way sshd does: as the user, with StrictModes.

Only the command gate's fallback reads key files (a user whose key entry is not there
yet, or who is refused with the message); the default path lets sshd read them itself.
The read runs in a throwaway thread whose *filesystem* uid and gid are the user's
(:mod:`sshd_adopt._internal.node.fsids`). So a home that root cannot read (NFS with
root_squash, a 0700 ``~/.ssh``) is read exactly as sshd reads it, and nothing the user
could not read themselves is ever handed out. A hung file server stalls one thread, not
the broker: the caller waits at most its timeout, and at most :data:`MAX_PENDING` reads
may be outstanding.

The checks follow ``auth2-pubkeyfile.c`` and ``misc.c`` (``auth_openkeyfile``,
``safe_path_fd``/``safe_path``, OpenSSH 9.2 and 10.0): the path is opened following
symlinks; it must be a regular file owned by the user or root and not group- or
world-writable; every directory from its real path up to the real home (or ``/``)
likewise.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Final

from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.node import fsids
from sshd_adopt.errors import Error

#: Reads allowed in flight at once, counting ones abandoned at their timeout.
MAX_PENDING: Final = 8
_pending = threading.BoundedSemaphore(MAX_PENDING)


class KeyFileError(Error):
    """The key file cannot be used: unreadable, unsafe (StrictModes), too large, or hung."""


def _insecure(info: os.stat_result, uid: int) -> bool:
    """sshd's StrictModes test for one path component."""
    return info.st_uid not in (0, uid) or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _read_checked(path: str, account: Account, limit: int) -> str:
    """Open, check and read ``path``; runs with the user's filesystem ids."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as err:
        raise KeyFileError(f"{path}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if _insecure(info, account.uid):
            raise KeyFileError(f"{path}: bad ownership or modes (StrictModes)")
        real = os.path.realpath(path)
        home = os.path.realpath(account.home)
        directory = os.path.dirname(real)
        while True:
            try:
                if _insecure(os.stat(directory), account.uid):
                    raise KeyFileError(f"{path}: bad ownership or modes of {directory} "
                                       "(StrictModes)")
            except OSError as err:
                raise KeyFileError(f"{path}: {directory}: {err.strerror}") from err
            if directory in (home, "/"):
                break
            directory = os.path.dirname(directory)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise KeyFileError(f"{path}: larger than {limit} bytes")
    return data.decode("utf-8", "replace").replace("\0", "")


def read_as_user(account: Account, path: str, *, limit: int, timeout: float) -> str:
    """The text of ``path`` read as ``account`` ("" if it does not exist).

    Raises :class:`KeyFileError` with the reason when it cannot be used, and when the
    read does not finish within ``timeout`` seconds (the thread is then abandoned).
    """
    if account.uid == 0:
        return _read_checked(path, account, limit)
    try:
        return fsids.call_as(account.uid, account.gid,
                             lambda: _read_checked(path, account, limit),
                             timeout=timeout, what=f"reading {path}", pending=_pending)
    except fsids.FsidsError as err:
        raise KeyFileError(str(err)) from err
