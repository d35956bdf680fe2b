"""The one way sshd-adopt runs an external tool (scontrol, squeue, munge, sshd -T, keys commands).

Every tool gets an absolute path, a fixed minimal environment (:data:`TOOL_ENV`:
never the broker's, which may come from anywhere, nor a user's), ``/`` as its
working directory, no stdin unless one is given, a deadline after which it is
killed, and a bound on what is read back. A tool may run as another user
(:class:`Identity`): the broker mints callerid credentials as the connecting
user and runs a site's keys command as the gate user, never as root.

Built on :func:`subprocess.run`, not on ``sh``: the broker is a threaded root
daemon, and ``sh`` forks in Python and switches credentials there
(``os.initgroups`` → NSS, then ``setgid``/``setuid``), which can deadlock in the
child on a lock another thread held at fork time (an sssd client's mutex, say).
``subprocess`` forks and drops credentials in C, with the groups resolved in the
parent beforehand.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from sshd_adopt.errors import Error

#: The environment of every tool: a root-chosen PATH and the C locale, so that
#: messages we parse are untranslated and nothing is inherited.
TOOL_ENV: Final[Mapping[str, str]] = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: Default bound on what is read from a tool's stdout and stderr, each.
MAX_OUTPUT: Final = 1024 * 1024


class ToolError(Error):
    """An external tool could not be run, or did not finish in time."""


class ToolNotFound(ToolError):
    """The tool's executable does not exist (or is not executable)."""


class ToolTimeout(ToolError):
    """The tool outlived its deadline and was killed."""


@dataclass(frozen=True)
class Identity:
    """Credentials to run a tool with: uid, primary gid and the supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Finished:
    """A tool that ran to its end (any exit status)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def text(self) -> str:
        """stdout as text (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def problem(self) -> str:
        """stderr as one line for a log, or the exit status when it said nothing."""
        said = self.stderr.decode(errors="replace").strip().replace("\n", "; ")
        return said or f"exit status {self.returncode}"


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    as_user: Identity | None = None,
    max_output: int = MAX_OUTPUT,
) -> Finished:
    """Run ``argv`` (``argv[0]`` an absolute path) and wait at most ``timeout`` seconds.

    Raises :class:`ToolNotFound` when the executable is missing,
    :class:`ToolTimeout` when it had to be killed (SIGKILL, then reaped), and
    :class:`ToolError` for any other failure to start it or output beyond
    ``max_output`` bytes. A non-zero exit status is not an error: the caller
    reads :attr:`Finished.returncode`.
    """
    command = tuple(argv)
    if not command or not command[0].startswith("/"):
        raise ToolError(f"tool {command[:1]!r}: the path must be absolute")
    if timeout <= 0:
        raise ToolTimeout(f"{command[0]}: no time left to run it")
    if as_user is not None and os.geteuid() != 0 and as_user.uid == os.geteuid():
        as_user = None  # already that user (tests, or a broker run unprivileged)
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, input=input, stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout, env=dict(TOOL_ENV), cwd="/",
            close_fds=True, check=False,
            user=as_user.uid if as_user else None, group=as_user.gid if as_user else None,
            extra_groups=list(as_user.groups) if as_user else None,
        )
    except FileNotFoundError as err:
        raise ToolNotFound(f"{command[0]}: not installed") from err
    except subprocess.TimeoutExpired as err:
        raise ToolTimeout(f"{command[0]}: killed after {timeout * 1000:.0f} ms") from err
    except OSError as err:
        raise ToolError(f"{command[0]}: cannot run: {os.strerror(err.errno or 0)}") from err
    if len(done.stdout) > max_output or len(done.stderr) > max_output:
        raise ToolError(f"{command[0]}: printed more than {max_output} bytes")
    return Finished(command, done.returncode, done.stdout, done.stderr,
                    time.monotonic() - started)


def identity_of(uid: int, gid: int, name: str) -> Identity:
    """The credentials a login of ``name`` would have (its groups from NSS, looked up here)."""
    return Identity(uid, gid, tuple(sorted(set(os.getgrouplist(name, gid)))))
