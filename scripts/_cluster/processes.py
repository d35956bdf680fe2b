"""Processes the lab started or that live in its namespaces: find them, stop them.

A process is named by (pid, start time) so that a recycled pid is never mistaken for a
daemon of ours; ``kill_and_wait`` sends SIGTERM, then SIGKILL to what is left.
``lab_processes`` finds everything inside a lab network or mount namespace (slurmstepds,
ssh sessions, strays of ``cluster exec``); ``listening`` is a readiness probe for sshd.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from .generation import HOSTS
from .namespaces import is_ns_mounted, ns_file
from .util import wait_for


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_matches(pid: int, start: int) -> bool:
    return proc_start_time(pid) == start


def reap() -> None:
    """Collect zombies of daemons this process started (they are our children)."""
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break


def kill_and_wait(targets: Iterable[tuple[int, int]], grace: float = 8.0) -> None:
    """SIGTERM (pid, start) pairs that still match, then SIGKILL what is left."""
    alive = [(p, s) for p, s in targets if pid_matches(p, s)]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        reap()
        return not any(pid_matches(p, s) for p, s in alive)

    if not wait_for(gone, grace, 0.1):
        for pid, start in alive:
            if pid_matches(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        wait_for(gone, 5, 0.1)


def ns_inode(path: Path) -> int | None:
    if not is_ns_mounted(path):
        return None
    return path.stat().st_ino


def lab_processes() -> list[tuple[int, int]]:
    """Every process living in a lab network or mount namespace (pid, start time)."""
    wanted: set[str] = set()
    for host in HOSTS:
        for kind, label in (("net", "net"), ("mnt", "mnt")):
            ino = ns_inode(ns_file(host, kind))
            if ino is not None:
                wanted.add(f"{label}:[{ino}]")
    if not wanted:
        return []
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            links = {os.readlink(f"/proc/{pid}/ns/net"), os.readlink(f"/proc/{pid}/ns/mnt")}
        except OSError:
            continue
        if links & wanted:
            start = proc_start_time(pid)
            if start is not None:
                found.append((pid, start))
    return found


def listening(pid: int, port: int) -> bool:
    """Does the network namespace of `pid` have a TCP listener on `port`?"""
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            return False
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False
