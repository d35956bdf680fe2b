"""The privileged spawn helper against a real mount namespace (no Slurm needed).

A process made by ``unshare --mount`` holds a namespace whose /tmp is a tmpfs with a
marker file: the same shape as a job container's. The helper is started exactly as the
broker starts it (:func:`spawning.launch`), given the descriptors the broker would give,
and must run the command inside that namespace as the given user, report its exit, pass
signals on, and hang the command up when the wrapper's connection goes.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal import protocol
from sshd_adopt._internal.services import spawning
from sshd_adopt._internal.slurm.stepd import CLONE_NEWNS

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setns, setuid)")
#: The helper as the broker runs it, but importing this checkout (``-I`` drops the cwd).
HELPER = [sys.executable, "-I", "-c",
          f"import sys; sys.path.insert(0, {str(REPO)!r}); "
          "from sshd_adopt._internal.node import nsexec; nsexec.main()"]


@pytest.fixture(scope="module")
def namespace() -> Iterator[int]:
    """A pid whose mount namespace has a private /tmp holding ``marker``."""
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o mode=1777 sshd-adopt-test /tmp && echo inside > /tmp/marker && "
         "chmod 644 /tmp/marker && exec sleep 300"])
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{proc.pid}/root/tmp/marker").exists():
        assert time.monotonic() < deadline, "the test namespace did not come up"
        time.sleep(0.02)
    yield proc.pid
    proc.kill()
    proc.wait()


class Spawn:
    """One helper with pipes for its streams and the wrapper's end of its connection."""

    def __init__(self, namespace_pid: int, argv: list[str], *, streams: int = 3,
                 stdin: int | None = None, **changes: object) -> None:
        ctl, theirs_ctl = socket.socketpair()
        # What systemd's Accept=yes gives it: the connection on 0, and again as fd 3.
        self.process = subprocess.Popen(
            HELPER, stdin=theirs_ctl.fileno(), start_new_session=True, close_fds=False,
            env=spawning.HELPER_ENV,
            preexec_fn=lambda: os.dup2(0, 3))
        theirs_ctl.close()
        assert int.from_bytes(ctl.recv(4), "big") == self.process.pid
        self.wrapper, theirs = socket.socketpair()
        ns = os.open(f"/proc/{namespace_pid}/ns/mnt", os.O_RDONLY)
        params: dict[str, object] = {
            "namespaces": [CLONE_NEWNS], "uid": NOBODY, "gid": NOBODY,
            "groups": [], "umask": 0o027, "rlimits": {"7": [512, 1024]},
            "tty": False, "home": "/nonexistent", "path": "/bin/sh", "argv": argv,
            "env": {"PATH": "/usr/bin:/bin", "MARK": "from-the-session"},
            "controlling_tty": 0, "loginuid": None,
        }
        params.update(changes)
        body = json.dumps(params).encode()
        ctl.sendmsg([len(body).to_bytes(4, "big")], [(
            socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno(), ns]))])
        ctl.sendall(body)
        os.close(ns)
        ctl.close()
        theirs.close()
        # The wrapper's side: asked for its streams, it sends them.
        self.wrapper.settimeout(20)
        self.asked = protocol.read_frame(self.wrapper)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        null = os.open("/dev/null", os.O_RDONLY)
        sent = [stdin if stdin is not None else null, out_w, err_w, null][:streams]
        self.wrapper.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", sent))])
        for fd in (null, out_w, err_w):
            os.close(fd)
        self.out = os.fdopen(out_r, "rb")
        self.err = os.fdopen(err_r, "rb")

    def end(self) -> dict[str, str]:
        assert self.asked == {"v": "1", "result": "send"}
        frame = protocol.read_frame(self.wrapper)
        self.process.wait(timeout=20)
        return frame

    def close(self) -> None:
        self.wrapper.close()
        self.out.close()
        self.err.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_the_command_runs_in_the_namespace_as_the_user_and_its_status_comes_back(
        namespace: int) -> None:
    spawn = Spawn(namespace, ["sh", "-c", 'cat /tmp/marker; id -u; id -G; umask; ulimit -n; '
                              'pwd; grep -E "^Cap(Prm|Eff)" /proc/self/status; echo "$MARK"; '
                              "exit 7"])
    try:
        assert spawn.end() == {"v": "1", "result": "exited", "status": "7"}
        lines = spawn.out.read().decode().splitlines()
        assert lines == ["inside", str(NOBODY), str(NOBODY), "0027", "512", "/",
                         "CapPrm:\t0000000000000000", "CapEff:\t0000000000000000",
                         "from-the-session"]
        # sshd's words when the home directory is missing; the session starts in /
        assert b"Could not chdir to home directory /nonexistent" in spawn.err.read()
    finally:
        spawn.close()
    assert not Path("/tmp/marker").exists() or Path("/tmp/marker").read_text() != "inside\n"


def test_the_command_inherits_nothing_of_the_helper(namespace: int) -> None:
    """Only its three streams (not systemd's copy of the connection on fd 3), default
    signal dispositions (Python ignores SIGPIPE and SIGXFSZ), no capability."""
    spawn = Spawn(namespace, ["sh", "-c", "ls /proc/$$/fd; grep -E '^Sig(Ign|Blk):' "
                              "/proc/$$/status; grep -E '^Cap(Inh|Amb):' /proc/$$/status"])
    try:
        assert spawn.end() == {"v": "1", "result": "exited", "status": "0"}
        lines = spawn.out.read().decode().split()
        assert lines[:4] == ["0", "1", "2", "SigBlk:"], lines  # no fd 3: systemd's copy closed
        text = " ".join(lines)
        assert "SigIgn: 0000000000000000" in text and "SigBlk: 0000000000000000" in text
        assert "CapInh: 0000000000000000" in text and "CapAmb: 0000000000000000" in text
    finally:
        spawn.close()


def test_a_command_killed_by_sigkill_is_reported_so(namespace: int) -> None:
    spawn = Spawn(namespace, ["sh", "-c", "kill -9 $$"])
    try:
        assert spawn.end() == {"v": "1", "result": "exited", "signal": "9"}
    finally:
        spawn.close()


def test_a_signal_from_the_wrapper_reaches_the_command(namespace: int) -> None:
    spawn = Spawn(namespace, ["sh", "-c", "echo started; exec sleep 60"])
    try:
        assert spawn.out.readline() == b"started\n"
        spawn.wrapper.sendall(protocol.encode({"v": "1", "sig": str(int(signal.SIGTERM))}))
        assert spawn.end() == {"v": "1", "result": "exited", "signal": str(int(signal.SIGTERM))}
    finally:
        spawn.close()


def test_the_wrapper_going_away_hangs_the_command_up(namespace: int) -> None:
    spawn = Spawn(namespace, ["sh", "-c", "echo started; exec sleep 60"])
    try:
        assert spawn.out.readline() == b"started\n"
        spawn.wrapper.shutdown(socket.SHUT_RDWR)
        spawn.process.wait(timeout=20)
        assert spawn.out.read() == b""  # the command is gone: nobody holds the pipe
    finally:
        spawn.close()


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_it_never_runs_anything_as_root(namespace: int, field: str) -> None:
    spawn = Spawn(namespace, ["sh", "-c", "echo ran"], **{field: 0})
    try:
        frame = spawn.end()
        assert frame["result"] in ("failed", "exited")
        assert spawn.out.read() == b""
        if frame["result"] == "exited":
            assert frame["status"] != "0"
        assert b"never spawned as root" in spawn.err.read() or "never spawned as root" in \
            frame.get("message", "")
    finally:
        spawn.close()


def test_a_peer_that_is_not_root_is_refused() -> None:
    """The helper takes orders from root only (its standard input's peer)."""
    directory = Path(tempfile.mkdtemp(prefix="sshd-adopt-nsexec-"))
    os.chmod(directory, 0o755)
    path = directory / "spawn.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    os.chmod(path, 0o777)
    client = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
         "s.connect(sys.argv[1]); time.sleep(30)", str(path)], user=NOBODY, group=NOBODY)
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        helper = subprocess.Popen(HELPER, stdin=conn.fileno(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        conn.close()
        assert helper.wait(timeout=20) == 1
    finally:
        client.kill()
        client.wait()
        listener.close()
        shutil.rmtree(directory)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_anything_but_three_streams_is_refused(namespace: int, count: int) -> None:
    spawn = Spawn(namespace, ["sh", "-c", "echo ran"], streams=count)
    try:
        frame = spawn.end()
        assert frame["result"] == "failed" and "3 descriptors" in frame["message"], frame
        assert spawn.out.read() == b""
    finally:
        spawn.close()


def test_a_terminal_must_be_the_sessions_controlling_one(namespace: int) -> None:
    master, slave = os.openpty()
    try:
        # A terminal, but not the one the broker read as the peer's controlling terminal.
        spawn = Spawn(namespace, ["sh", "-c", "echo ran"], stdin=slave, tty=True,
                      controlling_tty=os.fstat(slave).st_rdev + 1)
        try:
            frame = spawn.end()
            assert frame["result"] == "failed" and "controlling terminal" in frame["message"]
        finally:
            spawn.close()
        spawn = Spawn(namespace, ["sh", "-c", "tty; exit 3"], stdin=slave, tty=True,
                      controlling_tty=os.fstat(slave).st_rdev)
        try:
            assert spawn.end() == {"v": "1", "result": "exited", "status": "3"}
            assert spawn.out.read().decode().strip() == os.ttyname(slave)
        finally:
            spawn.close()
    finally:
        os.close(master)
        os.close(slave)
