"""The broker's guardian: when the broker dies, however it dies, the doors close.

The key entries let users in without asking the broker. They must not outlive it: a
user whose last job ends while the broker is dead would keep their entry. Under
systemd the unit's ``RuntimeDirectory=`` is removed when the service stops or fails;
without systemd (``--foreground`` under another supervisor, ``--daemon``) this small
process does it. The broker starts it with the read end of a pipe whose write end only
the broker holds: when the broker exits -- cleanly, on a crash, or by SIGKILL -- the
kernel closes that end, the guardian reads end-of-file, wipes every entry and exits.
It ignores the signals that stop a service, so that it outlives the broker it guards.

It is started with ``subprocess`` (fork and exec done in C), so starting it is safe
in the threaded broker at any time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import sshd_adopt
from sshd_adopt._internal.node.keyentries import KeyEntries

#: Where the running broker's package lives: the guardian runs the very same code.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sshd_adopt.__file__)))
_START = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from sshd_adopt._internal.broker.guardian import main; "
          "raise SystemExit(main(sys.argv[2:]))")


class Guardian:
    """The guardian process of one broker."""

    def __init__(self, entries: KeyEntries) -> None:
        read_end, self._write_end = os.pipe()
        os.set_inheritable(self._write_end, False)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-c", _START, _PACKAGE_ROOT, entries.keys_dir,
                 entries.principals_dir, entries.present_file],
                stdin=read_end, stdout=subprocess.DEVNULL, close_fds=True, cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            os.close(read_end)
        self.entries = entries

    @property
    def pid(self) -> int:
        return self._process.pid

    def alive(self) -> bool:
        return self._process.poll() is None

    def release(self, timeout: float = 5.0) -> None:
        """The broker is stopping: let the guardian wipe and exit, and reap it."""
        with contextlib.suppress(OSError):
            os.close(self._write_end)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout)


def main(argv: list[str]) -> int:
    """Wait for end-of-file on stdin, then wipe the entries in the two directories and
    the present list."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    keys_dir, principals_dir, present_file = (*argv, "")[:3]
    while True:
        try:
            if not os.read(0, 64):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    KeyEntries(keys_dir, principals_dir, present_file=present_file).wipe()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
