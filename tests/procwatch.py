"""The kernel's proc connector, followed from a test: what ran and forked, uid changes, exits.

Tests use it to see what happened on the lab's nodes during a login without asking the
product: every exec (with the command line read the moment the event arrives, so even a
process that lives a few milliseconds is named) and every uid change, with the kernel's
monotonic timestamps (comparable with :func:`time.monotonic_ns`). All lab hosts share
the host's pid namespace, so one connector sees them all. Root only.
"""

from __future__ import annotations

import select
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sshd_adopt._internal.node.procevents import (
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_UID,
    open_proc_connector,
    parse_proc_events,
)


@dataclass(frozen=True)
class Exec:
    pid: int
    cmdline: str  # "" when the process was gone before we could read it
    at_ns: int


@dataclass(frozen=True)
class UidChange:
    pid: int
    ruid: int
    euid: int
    cmdline: str
    at_ns: int


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


class ProcWatch:
    """Records execs, uid changes and exits of every process while the block runs."""

    def __init__(self) -> None:
        self.execs: list[Exec] = []
        self.uid_changes: list[UidChange] = []
        #: pid -> when it exited (kernel monotonic ns); a pid reused later keeps the last
        self.exits: dict[int, int] = {}
        #: (parent, child) of every fork, in order
        self.forks: list[tuple[int, int]] = []
        self.lost = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procwatch", daemon=True)

    def __enter__(self) -> ProcWatch:
        self._sock = open_proc_connector()
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        self._ready.set()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                continue
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # ENOBUFS: the kernel dropped events
                self.lost += 1
                continue
            for event in parse_proc_events(data):
                if event.what == PROC_EVENT_EXEC:
                    self.execs.append(Exec(event.pid, _cmdline(event.pid), event.timestamp_ns))
                elif event.what == PROC_EVENT_UID:
                    self.uid_changes.append(UidChange(event.pid, event.ruid, event.euid,
                                                      _cmdline(event.pid),
                                                      event.timestamp_ns))
                elif event.what == PROC_EVENT_EXIT:
                    self.exits[event.pid] = event.timestamp_ns
                elif event.what == PROC_EVENT_FORK:
                    self.forks.append((event.parent, event.pid))

    def commands(self, needle: str) -> list[str]:
        """Command lines of the execs that contain ``needle``."""
        return [e.cmdline for e in self.execs if needle in e.cmdline]

