"""The guardian wipes the key entries when the broker's end of its pipe closes, however.

Entries live in root-owned directories (``KeyEntries.prepare`` refuses others), so each
test makes its own under ``/run`` and removes it afterwards; the tests run as root. The
guardian is the real process: started by :class:`Guardian`, and once by a throwaway
"broker" process that is then killed with SIGKILL, as a crashing broker would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from sshd_adopt._internal.broker import guardian as guardian_module
from sshd_adopt._internal.broker.guardian import Guardian
from sshd_adopt._internal.node.keyentries import KeyEntries
from tests.unit.fakes import ALICE, BOB

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="entries need root-owned directories")


@pytest.fixture
def entries() -> Iterator[KeyEntries]:
    """Prepared entry directories with entries for alice and bob, and the present list."""
    top = tempfile.mkdtemp(prefix="sa-guard-", dir="/run")
    made = KeyEntries(os.path.join(top, "keys"), os.path.join(top, "principals"),
                      present_file=os.path.join(top, "present"))
    made.prepare()
    assert made.admit(ALICE)
    assert made.admit(BOB)
    made.write_present(frozenset({"alice", "bob"}))
    assert made.admitted() == {"alice", "bob"}
    yield made
    shutil.rmtree(top, ignore_errors=True)


def remaining(entries: KeyEntries) -> list[str]:
    """Every entry left, and "present" while the present list is there."""
    return sorted(os.listdir(entries.keys_dir) + os.listdir(entries.principals_dir)
                  + (["present"] if os.path.exists(entries.present_file) else []))


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def ignores(pid: int, sig: signal.Signals) -> bool:
    """Whether ``pid`` has set ``sig`` to SIG_IGN (its SigIgn mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except FileNotFoundError:
        return False
    return False


def gone(pid: int) -> bool:
    """``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_release_wipes_every_entry_and_the_guardian_ends(entries: KeyEntries) -> None:
    guard = Guardian(entries)
    try:
        eventually(lambda: ignores(guard.pid, signal.SIGTERM), "the guardian is ready")
        assert guard.alive()
        assert remaining(entries) == ["alice", "alice", "bob", "bob", "present"]
    finally:
        guard.release()
    assert not guard.alive()
    assert remaining(entries) == []


def test_the_guardian_outlives_a_service_stop_signal(entries: KeyEntries) -> None:
    guard = Guardian(entries)
    try:
        eventually(lambda: ignores(guard.pid, signal.SIGTERM), "the guardian is ready")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(guard.pid, sig)
        time.sleep(0.2)
        assert guard.alive()
        assert remaining(entries) == ["alice", "alice", "bob", "bob", "present"]
    finally:
        guard.release()
    assert remaining(entries) == []


_BROKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from sshd_adopt._internal.broker.guardian import Guardian
from sshd_adopt._internal.node.keyentries import KeyEntries
import subprocess
guard = Guardian(KeyEntries(sys.argv[2], sys.argv[3], present_file=sys.argv[4]))
# something the broker started, that outlives it, with every inheritable fd of the broker
leftover = subprocess.Popen(["sleep", "60"], close_fds=False)
print(guard.pid, leftover.pid, flush=True)
time.sleep(60)
"""


def test_a_broker_killed_outright_leaves_no_entry_behind(entries: KeyEntries) -> None:
    """Even while a process the broker started lives on: it holds no end of the pipe."""
    leftover = 0
    broker = subprocess.Popen(
        [sys.executable, "-I", "-c", _BROKER, guardian_module._PACKAGE_ROOT, entries.keys_dir,
         entries.principals_dir, entries.present_file], stdout=subprocess.PIPE, text=True)
    try:
        assert broker.stdout is not None
        guard, leftover = map(int, broker.stdout.readline().split())
        eventually(lambda: ignores(guard, signal.SIGTERM), "the guardian is ready")
        assert remaining(entries) == ["alice", "alice", "bob", "bob", "present"]
        broker.kill()
        broker.wait(5)
        eventually(lambda: remaining(entries) == [], "the entries are wiped")
        eventually(lambda: gone(guard), "the guardian ends")
        assert not gone(leftover)
    finally:
        if leftover:
            os.kill(leftover, signal.SIGKILL)
        if broker.poll() is None:
            broker.kill()
            broker.wait(5)
        if broker.stdout is not None:
            broker.stdout.close()


def test_the_guardian_wipes_only_the_entry_directories(entries: KeyEntries) -> None:
    top = os.path.dirname(entries.keys_dir)
    beside = os.path.join(top, "beside")
    with open(beside, "w", encoding="ascii") as other:
        other.write("not an entry\n")
    guard = Guardian(entries)
    guard.release()
    assert remaining(entries) == []
    assert os.path.isdir(entries.keys_dir)
    assert os.path.isdir(entries.principals_dir)
    assert os.path.exists(beside)
