"""find_session against a real OpenSSH sshd on 127.0.0.1 (needs root and /usr/sbin/sshd).

The test starts its own sshd on a free high port with a throwaway host key, a
throwaway client key and its own ``AuthorizedKeysFile`` in a private temporary
directory, so neither the system's sshd nor the test user's home is touched.
The user ``sshdadopt-test`` is created once if missing (locked password,
``usermod -p '*'``) and reused afterwards; it has no key anywhere once the test
has finished. The ForceCommand prints the pid of the process that will be the
broker's peer, then becomes ``sleep``; the test, as root, plays the broker.

Every process started here is ended by pid: the ssh clients, everything
under the test's own listener, the listener itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshd_adopt._internal.node import procfs, sessions
from sshd_adopt.errors import NotAnSshSession, ProcError

SSHD = "/usr/sbin/sshd"
USER = "sshdadopt-test"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run sshd and read /proc/<pid>/fd"),
    pytest.mark.skipif(
        not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")
             and shutil.which("runuser")),
        reason="needs OpenSSH server and client, and runuser",
    ),
]

FORCE_COMMAND = """#!/bin/bash
# The ForceCommand: print the pid of the future peer, then become a long sleep.
case "$SSH_ORIGINAL_COMMAND" in
nested)  # one intermediate: this script waits for a child shell
    /bin/sh -c 'echo $$; exec sleep 60'
    exit ;;
fake)    # a copy of bash named sshd, titled like a session process, parents the peer
    exec -a "sshd: $USER@notty" {fake} -c 'sleep 60 & echo $!; wait' ;;
*)
    echo $$
    exec sleep 60 ;;
esac
"""


@dataclass(frozen=True)
class Sshd:
    """The test's own sshd: where it listens and how to log in to it."""

    port: int
    listener: subprocess.Popen[bytes]
    client_key: Path
    directory: Path
    uid: int


def _ensure_user() -> int:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(USER).pw_uid
    # Exit status 9 = the user exists already (a concurrent run created it).
    result = subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash",
                             "--user-group", USER], check=False, capture_output=True)
    if result.returncode not in (0, 9):
        pytest.skip(f"cannot create {USER}: {result.stderr.decode().strip()}")
    subprocess.run(["usermod", "-p", "*", USER], check=True)  # no password, not "!" (locked)
    return pwd.getpwnam(USER).pw_uid


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(port: int, listener: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if listener.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    uid = _ensure_user()
    # Readable by the user (sshd reads AuthorizedKeysFile and runs the
    # ForceCommand as the user), writable only by root.
    directory = Path(tempfile.mkdtemp(prefix="sshd-adopt-live."))
    directory.chmod(0o755)
    listener: subprocess.Popen[bytes] | None = None
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshd-adopt test",
                            "-f", str(directory / key)], check=True)
        shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
        (directory / "authorized_keys").chmod(0o644)
        fake_dir = directory / "fake"
        fake_dir.mkdir(mode=0o755)
        shutil.copy("/bin/bash", fake_dir / "sshd")
        script = directory / "force-command"
        script.write_text(FORCE_COMMAND.replace("{fake}", str(fake_dir / "sshd")))
        script.chmod(0o755)
        # sshd 9.2 refuses to start without its privilege separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for _attempt in range(5):
            port = _free_port()  # may be taken again before sshd binds: retried
            config = directory / "sshd_config"
            config.write_text(
                f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory}/host_key\n"
                "UsePAM no\nPidFile none\n"
                # /tmp/… is world-writable higher up: StrictModes would refuse the key file.
                "StrictModes no\n"
                f"AuthorizedKeysFile {directory}/authorized_keys\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"AllowUsers {USER}\nForceCommand {script}\n"
            )
            listener = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                        stdout=subprocess.DEVNULL,
                                        stderr=(directory / "sshd.log").open("ab"))
            if _wait_listening(port, listener):
                break
            _kill(listener.pid)
            listener.wait()
            listener = None
        if listener is None:
            pytest.fail(f"sshd did not start: {(directory / 'sshd.log').read_text()}")
        yield Sshd(port, listener, directory / "client_key", directory, uid)
    finally:
        if listener is not None:
            # Connections outlive their listener: end everything below it first.
            with contextlib.suppress(ProcError):
                for pid in procfs.descendants(listener.pid):
                    _kill(pid)
            listener.terminate()
            listener.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)  # the only copy of the key is gone too


@dataclass(frozen=True)
class Login:
    client: subprocess.Popen[bytes]
    peer_pid: int


@contextlib.contextmanager
def login(server: Sshd, tty: str, *command: str) -> Iterator[Login]:
    """One ssh connection whose ForceCommand announced its peer pid."""
    client = subprocess.Popen(
        ["ssh", "-F", "/dev/null", "-i", str(server.client_key), "-p", str(server.port),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
         tty, f"{USER}@127.0.0.1", *command],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout is not None
    peer_pid = 0
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(client.stdout, selectors.EVENT_READ)
            line = b""
            deadline = time.monotonic() + 20
            while not line.endswith(b"\n") and time.monotonic() < deadline:
                if selector.select(timeout=deadline - time.monotonic()):
                    chunk = os.read(client.stdout.fileno(), 1)
                    if not chunk:
                        break
                    line += chunk
        if not line.strip().isdigit():
            client.kill()
            _, err = client.communicate(timeout=10)
            pytest.fail(f"login failed: {line!r} {err.decode(errors='replace')}")
        peer_pid = int(line)
        yield Login(client, peer_pid)
    finally:
        # The peer is a sleep with no terminal: closing the connection alone
        # would not end it. Kill it by pid (and the ssh client, which is ours);
        # the monitor and session processes then exit on their own.
        if peer_pid:
            _kill(peer_pid)
        client.kill()
        client.wait(timeout=10)


@pytest.mark.parametrize("tty", ["-T", "-tt"])
def test_genuine_session(sshd: Sshd, tty: str) -> None:
    with login(sshd, tty) as session_login:
        found = sessions.find_session(session_login.peer_pid, sshd.uid)
        peer = procfs.proc_info(found.peer_pid)
        session = procfs.proc_info(found.session_pid)
        monitor = procfs.proc_info(found.monitor_pid)
        listener = procfs.proc_info(monitor.ppid)

        # The chain as observed with OpenSSH 9.2 (see sessions' docstring).
        assert listener.pid == sshd.listener.pid
        assert found.chain == (monitor.pid, session.pid, peer.pid)
        assert peer.ppid == session.pid
        assert session.ppid == monitor.pid
        assert (monitor.real_uid, monitor.effective_uid, monitor.exe) == (0, 0, SSHD)
        assert (session.real_uid, session.effective_uid, session.exe) == (sshd.uid, sshd.uid, SSHD)
        assert monitor.name == session.name == listener.name == "sshd"
        assert monitor.title == f"sshd: {USER} [priv]"
        if tty == "-T":
            assert session.title == f"sshd: {USER}@notty"
        else:
            assert session.title.startswith(f"sshd: {USER}@pts/")
        assert found.user == USER

        # The 4-tuple: sshd's end is the listener's port; the remote end is
        # the socket our ssh client holds (same network namespace here).
        assert found.connection is not None
        client_end = procfs.connection_of(session_login.client.pid)
        assert client_end is not None
        assert found.connection.local_port == sshd.port
        assert found.connection.remote_port == client_end.local_port
        assert str(found.connection.local_ip) == str(found.connection.remote_ip) == "127.0.0.1"
        # The session process holds the same socket; the user's peer holds none.
        assert procfs.connection_of(session.pid) == found.connection
        assert procfs.connection_of(peer.pid) is None

        members = sessions.sessions_of_monitor(found.monitor_pid)
        assert members[0] == monitor.pid
        assert set(found.chain) <= set(members)
        assert sessions.still_alive(found)

        os.kill(found.peer_pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sessions.still_alive(found):
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_intermediate_shell(sshd: Sshd) -> None:
    with login(sshd, "-T", "nested") as session_login:
        found = sessions.find_session(session_login.peer_pid, sshd.uid)
        assert len(found.chain) == 4  # monitor, session, the ForceCommand script, peer
        script = procfs.proc_info(found.chain[2])
        assert script.real_uid == sshd.uid
        assert script.cmdline[:2] == ("/bin/bash", str(sshd.directory / "force-command"))
        with pytest.raises(NotAnSshSession, match="within 0 intermediate"):
            sessions.find_session(session_login.peer_pid, sshd.uid, max_intermediate=0)


def test_wrong_uid_is_refused(sshd: Sshd) -> None:
    with login(sshd, "-T") as session_login, pytest.raises(NotAnSshSession, match="runs as uid"):
        sessions.find_session(session_login.peer_pid, 65534)  # nobody


def test_fake_sshd_inside_a_real_session(sshd: Sshd) -> None:
    with login(sshd, "-T", "fake") as session_login:
        fake = procfs.proc_info(procfs.proc_info(session_login.peer_pid).ppid)
        assert fake.title.startswith(f"sshd: {USER}@notty")  # the forgery is convincing…
        assert fake.name == "sshd"
        with pytest.raises(NotAnSshSession, match=r"fake/sshd, not a system sshd"):
            sessions.find_session(session_login.peer_pid, sshd.uid)  # …but not its exe


def test_process_of_the_user_outside_sshd(sshd: Sshd) -> None:
    runuser = subprocess.Popen(["runuser", "-u", USER, "--", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        sleeper: int | None = None
        while sleeper is None:
            assert time.monotonic() < deadline
            candidates = [runuser.pid, *procfs.descendants(runuser.pid)]
            sleeper = next((pid for pid in candidates
                            if procfs.proc_info(pid).real_uid == sshd.uid
                            and procfs.proc_info(pid).name == "sleep"), None)
            time.sleep(0.02)
        with pytest.raises(NotAnSshSession, match="runs as uid 0, and no sshd session"):
            sessions.find_session(sleeper, sshd.uid)
    finally:
        with contextlib.suppress(ProcError):
            for pid in procfs.descendants(runuser.pid):
                _kill(pid)
        _kill(runuser.pid)
        runuser.wait(timeout=10)
