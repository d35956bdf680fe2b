#!/usr/bin/python3
"""Lab infrastructure: a home directory that root cannot read, as NFS root_squash makes it.

This kernel has no NFS (client or server), so the lab emulates what matters of a
root-squashed export: a read-only FUSE passthrough of a directory, mounted over that
same directory in one lab node's mount namespace, that answers every request made with
filesystem uid 0 with EACCES (the server maps root to nobody, and nobody cannot enter
a 0700 home), and serves every other uid with the kernel's own permission checks
(``default_permissions``). Like an NFS client, FUSE sends the caller's *filesystem* uid:
sshd opening a key file after ``seteuid(user)`` gets it, a root daemon reading it as
root does not.

    rootsquash.py DIR       (run as root in the node's mount namespace; stays in the
                             foreground until unmounted or killed)

The directory stays reachable underneath through a file descriptor opened before the
mount. Never installed on a node; used by scripts/cluster for the lab user "fay".
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from typing import Any

from fusepy import FUSE, FuseOSError, Operations, fuse_get_context  # Debian python3-fusepy


# fusepy is untyped: its base class is Any to mypy.
class RootSquash(Operations):  # type: ignore[misc]
    def __init__(self, root_fd: int) -> None:
        self.root = f"/proc/self/fd/{root_fd}"

    def _path(self, path: str) -> str:
        uid = fuse_get_context()[0]
        if uid == 0 and path != "/":
            raise FuseOSError(errno.EACCES)
        return self.root + path

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        info = os.lstat(self._path(path) if path != "/" else self.root + "/")
        return {key: getattr(info, key) for key in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime",
            "st_ctime")}

    def access(self, path: str, amode: int) -> int:
        if fuse_get_context()[0] == 0:
            raise FuseOSError(errno.EACCES)
        self._path(path)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        if fuse_get_context()[0] == 0:
            raise FuseOSError(errno.EACCES)
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseOSError(errno.EROFS)
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict[str, Any]:
        info = os.statvfs(self.root + "/")
        return {key: getattr(info, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}


def main(argv: list[str]) -> int:
    (directory,) = argv
    # A mount left by an earlier run that was killed: the node's own namespace only.
    subprocess.run(["umount", "-l", directory], capture_output=True, check=False)
    if not stat.S_ISDIR(os.stat(directory).st_mode):
        raise SystemExit(f"{directory}: not a directory")
    root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    FUSE(RootSquash(root_fd), directory, foreground=True, allow_other=True,
         default_permissions=True, ro=True, nothreads=True, nonempty=True,
         fsname="lab-rootsquash")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
