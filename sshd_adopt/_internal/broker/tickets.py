"""Session tickets: the adopt reply of a connection adopted early, where its wrapper finds it.

When the broker adopts a connection right after authentication it already knows what
the wrapper's "adopt" request would get back (the job, ``SLURM_JOB_ID``, an X11 job's
``DISPLAY``). It writes that reply to ``<socket dir>/sessions/<monitor pid>``, with the
monitor's start time, and the wrapper reads it instead of asking: a login then pays no
round trip to the broker on its critical path (the format, and how the wrapper checks
a ticket, are in :mod:`sshd_adopt._internal.protocol`). A ticket grants nothing: the
session is in the job already, and the wrapper uses a ticket only when its own cgroup
says so; anything else (a refusal to explain, options on the ForceCommand line, no
ticket yet) goes to the broker as before.

The directory is root's alone (as the key entries', checked the same way) and not
listable (0711: nobody learns which sessions exist); each ticket is readable by its
user only (mode 0400, owned by them: a site with ``PrivateData=jobs`` hides one user's
jobs from another), written atomically, removed when the monitor exits, and wiped
when the broker starts and stops. Owning the file lets a user rewrite their own
ticket; that gains nothing, as the wrapper takes from it only what the user could set
in their own environment anyway, and only when its cgroup is that job's.
"""

from __future__ import annotations

import contextlib
import os
import uuid

from sshd_adopt._internal import protocol
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.keyentries import UnsafeDirectory, unsafe_reason
from sshd_adopt.errors import NoSuchProcess, ProcError

_TEMP_PREFIX = ".new-"
#: Traversable, not listable: a wrapper opens its own ticket by name.
DIRECTORY_MODE = 0o711


class SessionTickets:
    """The ticket directory of one broker (``protocol.sessions_dir`` of its socket)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def prepare(self) -> None:
        """Create the directory (0711, root) if missing, check it and make it unlistable;
        raises UnsafeDirectory (naming it) when it is not root's alone."""
        with contextlib.suppress(FileExistsError):
            if unsafe_reason(os.path.dirname(self.directory)) is None:
                os.mkdir(self.directory, DIRECTORY_MODE)
        problem = unsafe_reason(self.directory)
        if problem is not None:
            raise UnsafeDirectory(f"session ticket directory {self.directory} is not root's "
                                  f"alone: {problem}; chown root:root, chmod 0711")
        os.chmod(self.directory, DIRECTORY_MODE)

    def issue(self, monitor_pid: int, reply: dict[str, str], *, uid: int, gid: int) -> None:
        """Write the ticket of ``monitor_pid``'s connection, readable by ``uid`` alone (the
        connection's user). Raises NoSuchProcess (the monitor is gone), ProcError, or
        OSError."""
        try:
            with open(f"{procfs.PROCFS}/{monitor_pid}/stat", "rb") as handle:
                _ppid, start = protocol.stat_identity(handle.read(4096))
        except FileNotFoundError as err:
            raise NoSuchProcess(f"process {monitor_pid} is gone") from err
        except (OSError, ValueError) as err:
            raise ProcError(f"process {monitor_pid}: stat: {err}") from err
        frame = protocol.encode({protocol.MONITOR_START: str(start), **reply})
        temp = os.path.join(self.directory, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, frame)
            # Mode first, while the file is still root's: changing the mode of another
            # user's file needs CAP_FOWNER, which the broker's unit does not grant.
            os.fchmod(fd, 0o400)
            os.fchown(fd, uid, gid)
        except OSError:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        try:
            os.replace(temp, os.path.join(self.directory, str(monitor_pid)))
        except OSError:
            os.unlink(temp)
            raise

    def revoke(self, monitor_pid: int) -> None:
        """Remove ``monitor_pid``'s ticket (nothing happens when there is none)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, str(monitor_pid)))

    def wipe(self) -> None:
        """Remove every ticket (and leftover temporaries)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(os.path.join(self.directory, name))
