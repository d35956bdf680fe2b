"""kill_connection on real processes: a stand-in connection (a session leader with a child
the caller does not know of, as sshd's monitor and a post-authentication child it has just
forked) is killed whole; a process that leads no group gets its own signal only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sshd_adopt._internal.node import signals

#: A session leader (as sshd's connection process after setsid()) that forks a child which
#: stays in its process group, prints the child's pid, then waits.
CONNECTION = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def test_the_monitors_group_is_killed_with_a_child_nobody_listed() -> None:
    monitor = subprocess.Popen([sys.executable, "-c", CONNECTION], stdout=subprocess.PIPE,
                               start_new_session=True, text=True)
    assert monitor.stdout is not None
    child = int(monitor.stdout.readline())
    try:
        assert os.getpgid(child) == monitor.pid
        assert signals.kill_connection(monitor.pid, [monitor.pid]) == [monitor.pid]
        assert monitor.wait(timeout=5) == -signal.SIGKILL
        assert _gone(child), "the unlisted child in the monitor's group survived"
    finally:
        monitor.kill()
        monitor.wait()


def test_a_process_leading_no_group_is_killed_alone() -> None:
    """The test's own group must survive: only the listed pid is signalled."""
    lone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.getpgid(lone.pid) != lone.pid
        assert signals.kill_connection(lone.pid, [lone.pid]) == [lone.pid]
        assert lone.wait(timeout=5) == -signal.SIGKILL
    finally:
        lone.kill()
        lone.wait()


def test_a_connection_already_gone_is_nothing_to_kill() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    assert signals.kill_connection(gone.pid, [gone.pid]) == []
