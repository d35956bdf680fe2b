"""Issue #21: sessions inside the job's namespaces (Slurm's tmpfs job container).

The module turns the lab's job container on (every node: 22.05 cannot leave one out)
and off again at the end. A job writes a marker into its private /tmp; what the user
cares about is then checked through the real sshd-adopt front end (port 22) and against
pam_slurm_adopt (port 2222): that the session sees the job's files, behaves like any
login (terminal, job control, Ctrl-C, window size, exit status, file transfers), is in
the job and dies with it, leaves nothing behind when the client goes, and that the new
"spawn" request cannot be turned against anyone.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
import uuid

import pytest

from tests.harness import VENV, Cluster, remote_cgroup_job, user_pids, wait_until

PYTHON = str(VENV / "bin" / "python3")
MARKER = "/tmp/ns-marker"


#: pam_slurm_adopt (like Slurm's own tasks) setns()es into the job's namespace, which
#: resets the root directory to the namespace's: on a chroot generation that is the host's
#: "/", so its sessions run on the host's userland, not the generation's (a lab artifact,
#: tests/integration/test_job_container_lab.py).
CHROOT = "on a chroot generation pam_slurm_adopt's sessions land in the host's userland"


def marked_job(cluster: Cluster) -> tuple[int, str]:
    """A job of alice on n1 with ``secret-<job>`` in its private /tmp.

    The job writes it itself; on a chroot generation Slurm's tasks do not run in the job's
    /tmp (see CHROOT), so alice writes it from inside the job's namespace, where the
    generation's /tmp is the job's."""
    ready = cluster.home("alice") / ".lab" / f"ns-ready-{uuid.uuid4().hex[:10]}"
    write = "" if cluster.gen.root is not None else f'echo "secret-$SLURM_JOB_ID" > {MARKER}\n'
    job = cluster.submit("alice", ["n1"], f"#!/bin/bash\n{write}touch {ready}\n"
                         "exec sleep 100000\n")
    wait_until(ready.exists, 30, f"job {job} to start", 0.1)
    ready.unlink()
    secret = f"secret-{job}"
    if cluster.gen.root is not None:
        uid, gid = cluster.uid("alice"), cluster.home("alice").stat().st_gid
        subprocess.run(
            ["nsenter", f"--mount={cluster.nsdir / 'n1.mnt'}", "--", "nsenter",
             f"--mount={cluster.job_namespace('n1', job)}", "--", "setpriv", f"--reuid={uid}",
             f"--regid={gid}", "--clear-groups", "sh", "-c",
             f"echo {secret} > {cluster.in_root(MARKER)}"], check=True, timeout=30)
    return job, secret


def _job_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            found = remote_cgroup_job(handle.read())
    except FileNotFoundError:
        return None
    return found.job if found is not None and found.step == "extern" else None


def test_a_session_sees_the_jobs_private_tmp(job_container: Cluster) -> None:
    cluster = job_container
    job, secret = marked_job(cluster)
    log = cluster.broker_log("n1")
    mark = log.mark()
    result = cluster.ssh("login", "n1", f'cat {MARKER}; cat /proc/self/cgroup; '
                         'echo "JOB=$SLURM_JOB_ID ARGV0=$0"', user="alice")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == secret
    found = remote_cgroup_job(result.stdout)
    assert found is not None and (found.job, found.step) == (job, "extern"), result.stdout
    assert f"JOB={job} ARGV0=bash" in result.stdout
    assert "spawn: user=alice" in log.wait_for(f"job={job} helper=", mark=mark)
    # The node's own /tmp has no such file: the job's is private.
    node = cluster.exec("n1", "cat", MARKER, check=False)
    assert secret not in node.stdout


def test_pam_slurm_adopt_shows_the_same_file(job_container: Cluster) -> None:
    """The oracle: the real module (port 2222) puts the session into the same /tmp."""
    cluster = job_container
    if cluster.gen.root is not None:
        pytest.skip(CHROOT)
    _job, secret = marked_job(cluster)
    ours = cluster.ssh("login", "n1", f"cat {MARKER}", user="alice")
    theirs = cluster.ssh("login", "n1", f"cat {MARKER}", user="alice", port=2222)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (
        0, secret + "\n"), (ours, theirs)


def test_the_session_is_in_the_job_it_was_adopted_into(job_container: Cluster) -> None:
    """Two jobs: the session enters the namespace of the one it was adopted into (the
    newest, with no source job), never the other's."""
    cluster = job_container
    first, first_secret = marked_job(cluster)
    second, second_secret = marked_job(cluster)
    result = cluster.ssh("login", "n1", f"cat {MARKER}; cat /proc/self/cgroup", user="alice")
    found = remote_cgroup_job(result.stdout)
    assert found is not None and found.job == second
    assert result.stdout.splitlines()[0] == second_secret != first_secret
    assert first != second


class Terminal:
    """An ``ssh -tt`` client on a pseudo-terminal of ours, as a user at a keyboard."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        self.size(24, 80)

        def controlling() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=controlling)
        os.close(slave)
        self.seen = ""

    def size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                self.seen = self.seen[found.end():]
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; output:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the client closed the terminal
                    raise AssertionError(f"{pattern!r} not seen before the end; output:\n"
                                         f"{self.seen[-2000:]}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_an_interactive_session_inside_the_namespace(job_container: Cluster) -> None:
    cluster = job_container
    job, secret = marked_job(cluster)
    term = Terminal(cluster.command("login", "ssh", "-tt", "n1", user="alice"))
    try:
        term.send(f'echo "ARGV0=$0 JOB=$SLURM_JOB_ID"; cat {MARKER}\n')
        term.expect(rf"ARGV0=-bash JOB={job}\r?\n{secret}")
        # window size changes reach the session's terminal
        term.size(33, 97)
        time.sleep(0.5)
        term.send("stty size\n")
        term.expect(r"\b33 97\r?\n")
        # job control
        term.send("sleep 1031 &\n")
        term.send("jobs; echo JOBS-LISTED\n")
        term.expect(r"\[1\]\+\s+Running\s+sleep 1031 &[\s\S]*JOBS-LISTED\r?\n")
        term.send("kill %1; wait; echo KILLED\n")
        term.expect(r"Terminated\s+sleep 1031[\s\S]*KILLED")
        # Ctrl-C reaches the foreground process, not the shell
        term.send("sleep 1032\n")
        wait_until(lambda: bool(user_pids("alice", "sleep 1032")), 15, "sleep 1032 to run")
        pid = user_pids("alice", "sleep 1032")[0]
        assert _job_of(pid) == job  # the spawned session's processes are in the job
        term.send("\x03")
        term.send("echo RC=$?\n")
        term.expect(r"RC=130")
        term.send("exit 7\n")
        assert term.proc.wait(timeout=20) == 7
    finally:
        term.close()


def test_file_transfers_into_the_jobs_tmp(job_container: Cluster) -> None:
    cluster = job_container
    marked_job(cluster)
    home = cluster.home("alice")
    src = home / "ns-xfer-src.txt"
    src.write_text("payload\n" * 500)
    back = home / "ns-xfer-back.txt"
    back.unlink(missing_ok=True)
    cluster.exec("n1", "sh", "-c", "rm -f /tmp/ns-*.txt")  # an earlier run's, if it failed
    try:
        sftp = cluster.exec("login", "sftp", "-b", "-", "n1", user="alice", check=False,
                            input=f"put {src} /tmp/ns-sftp.txt\n")
        assert sftp.returncode == 0, sftp.stderr
        for args, remote in ((["scp", str(src)], "/tmp/ns-scp.txt"),
                             (["scp", "-O", str(src)], "/tmp/ns-scpO.txt")):
            copied = cluster.exec("login", *args, f"n1:{remote}", user="alice", check=False)
            assert copied.returncode == 0, copied.stderr
        rsync = cluster.exec("login", "rsync", "-a", str(src), "n1:/tmp/ns-rsync.txt",
                             user="alice", check=False)
        assert rsync.returncode == 0, rsync.stderr
        fetched = cluster.exec("login", "scp", "-O", "n1:/tmp/ns-rsync.txt", str(back),
                               user="alice", check=False)
        assert fetched.returncode == 0, fetched.stderr
        assert back.read_text() == src.read_text()
        listing = cluster.ssh("login", "n1", "md5sum /tmp/ns-*.txt", user="alice",
                              check=True).stdout
        assert len(set(re.findall(r"^([0-9a-f]{32}) ", listing, re.M))) == 1, listing
        assert len(listing.splitlines()) == 4
        node = cluster.exec("n1", "sh", "-c", "ls /tmp/ns-*.txt", check=False)
        assert "ns-" not in node.stdout  # none of it landed in the node's /tmp
    finally:
        src.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


def _start(cluster: Cluster, command: str) -> subprocess.Popen[str]:
    proc = cluster.spawn("login", "ssh", "n1", command, user="alice")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    return proc


def test_the_session_dies_with_the_job(job_container: Cluster) -> None:
    cluster = job_container
    job, _ = marked_job(cluster)
    client = _start(cluster, "echo started; exec sleep 1033")
    try:
        pid = user_pids("alice", "sleep 1033")[0]
        assert _job_of(pid) == job
        cluster.cancel(job)
        client.wait(timeout=30)
        wait_until(lambda: not user_pids("alice", "sleep 1033"), 15, "the session to end")
    finally:
        client.kill()
        client.wait()


def test_closing_the_client_leaves_nothing_behind(job_container: Cluster) -> None:
    cluster = job_container
    marked_job(cluster)
    client = _start(cluster, "echo started; exec sleep 1034")
    helpers_before = set(user_pids("alice", "sshd_adopt._internal.node.nsexec"))
    try:
        assert user_pids("alice", "sleep 1034")
        client.send_signal(signal.SIGKILL)  # the client goes away without a word
        client.wait()
        wait_until(lambda: not user_pids("alice", "sleep 1034"), 20,
                   "the command to end after its client went")
        wait_until(lambda: not (set(user_pids("alice", "sshd_adopt._internal.node.nsexec"))
                                - helpers_before), 20, "its relay to end")
    finally:
        client.kill()
        client.wait()


# --------------------------------------------------------------------------- abuse

SPAWN = r'''
import array, os, random, socket, struct, sys
path = "/run/sshd-adopt/broker.sock"
def frame(text):
    body = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(body)) + body
def talk(payload, fds=None):
    s = socket.socket(socket.AF_UNIX); s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(payload)
        first = s.recv(65536)
        if fds is None or b"result=send" not in first:
            return first
        s.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                  if fds else [])
        return first + b" | " + s.recv(65536)
    except OSError as err:
        return repr(err).encode()
    finally:
        s.close()
mode = sys.argv[1]
spawn = "v=1\0op=spawn\0tty=0\0sftp=/usr/lib/openssh/sftp-server"
if mode == "spawn":
    print(talk(frame(spawn), [0, 1, 2]))
elif mode == "fds":
    print(talk(frame(spawn), [0, 1, 2, 2][:int(sys.argv[2])]))
elif mode == "claim":
    print(talk(frame(spawn + "\0job=" + sys.argv[2]), [0, 1, 2]))
elif mode == "big":
    print(talk(struct.pack(">I", 1 << 20) + b"x" * (1 << 20)))
elif mode == "fuzz":
    rng = random.Random(int(sys.argv[2]))
    keys = ["v", "op", "tty", "sftp", "job", "uid", "user", "o.action_unknown", "x"]
    for _ in range(int(sys.argv[3])):
        items = {"v": "1", "op": "spawn"}
        for key in rng.sample(keys, rng.randint(0, 4)):
            items[key] = rng.choice(["0", "1", "/bin/sh", "../x", "", "\n", "x" * 300,
                                     str(rng.randint(-5, 99999))])
        body = "\0".join(f"{k}={v}" for k, v in items.items()).encode()
        if rng.random() < 0.2:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        talk(frame(body), [0, 1, 2][:rng.randint(0, 3)] if rng.random() < 0.5 else None)
    print("fuzzed")
'''


def _spawn_abuse(cluster: Cluster, user: str, *args: str) -> str:
    return cluster.exec("n1", PYTHON, "-c", SPAWN, *args, user=user, timeout=120,
                        check=False).stdout


def test_only_an_adopted_sessions_wrapper_can_spawn(job_container: Cluster) -> None:
    cluster = job_container
    job, _ = marked_job(cluster)
    log = cluster.broker_log("n1")
    mark = log.mark()
    # A user with a job here, but not from an ssh session; a user without one.
    assert "not an ssh session" in _spawn_abuse(cluster, "alice", "spawn")
    assert "not an ssh session" in _spawn_abuse(cluster, "bob", "spawn")
    # From inside a session started in the namespace: its processes are not under sshd.
    inside = cluster.ssh("login", "n1", f"{PYTHON} -c '{SPAWN}' spawn", user="alice")
    assert "not an ssh session" in inside.stdout, inside
    assert log.since(mark).count("spawn refused") >= 3
    assert log.since(mark).count(" helper=") == 1  # the ssh login that ran the python
    assert job in cluster.jobs()


def test_bad_spawn_requests_are_refused_and_logged(job_container: Cluster) -> None:
    cluster = job_container
    job, _ = marked_job(cluster)
    log = cluster.broker_log("n1")
    mark = log.mark()
    # A request may not name a job (or anything else the broker derives itself).
    assert "result=send" not in _spawn_abuse(cluster, "alice", "claim", str(job))
    log.wait_for("a spawn request carries exactly", mark=mark)
    # Descriptors are asked for only once the request passed every other check (the
    # wrong counts themselves: tests/unit/test_spawning.py): from outside a session,
    # never, whatever is sent.
    for count in ("0", "2", "3", "4"):
        answer = _spawn_abuse(cluster, "alice", "fds", count)
        assert "result=send" not in answer and "not an ssh session" in answer, answer
    assert "outside 1.." in _spawn_abuse(cluster, "alice", "big") or \
        "outside 1.." in log.wait_for("frame length", mark=mark)
    assert _spawn_abuse(cluster, "alice", "fuzz", "21", "300").strip() == "fuzzed"
    # The broker is still there and still right.
    result = cluster.ssh("login", "n1", f"cat {MARKER}", user="alice")
    assert result.returncode == 0 and result.stdout.startswith("secret-")
    # Nothing was ever started but for that last, legitimate login.
    assert log.since(mark).count(" helper=") == 1


# --------------------------------------------------------------------------- under systemd


def test_under_systemd_sessions_start_from_the_spawner_socket_unsandboxed(
        job_container: Cluster, sysnode: Cluster) -> None:
    """The node s1 boots systemd (forky only; booted after the job container was turned on,
    so its slurmd has it) with sshd-adopt installed by scripts/install: the broker runs in
    its sandboxed unit, and sessions into a job with a private /tmp start from
    sshd-adopt-spawn.socket. The session sees the job's /tmp, is in the job, and has none
    of the broker's sandbox (no NoNewPrivileges, no seccomp filter, a full bounding set)."""
    node = sysnode
    node.sysnode("systemctl", "enable", "--now", "sshd-adopt-spawn.socket", timeout=30)
    try:
        ready = node.home("alice") / ".lab" / f"ns-ready-{uuid.uuid4().hex[:10]}"
        job = node.submit("alice", ["s1"], "#!/bin/bash\n"
                          f'echo "secret-$SLURM_JOB_ID" > {MARKER}\ntouch {ready}\n'
                          "exec sleep 100000\n", extra_args=["--partition=systemd"])
        wait_until(ready.exists, 30, f"job {job} to write its marker", 0.1)
        ready.unlink()
        out = node.ssh("login", "s1", f"cat {MARKER}; grep -E '^(NoNewPrivs|Seccomp|CapBnd):' "
                       "/proc/self/status; grep ^0:: /proc/self/cgroup", user="alice",
                       timeout=60)
        assert out.returncode == 0, out
        facts = dict(line.split(":", 1) for line in out.stdout.splitlines()[1:])
        assert out.stdout.splitlines()[0] == f"secret-{job}", out.stdout
        assert facts["NoNewPrivs"].strip() == "0" and facts["Seccomp"].strip() == "0", facts
        assert int(facts["CapBnd"], 16) & (1 << 21), facts  # CAP_SYS_ADMIN: not the unit's set
        assert f"/{node.job_cgroup_name('s1', job)}/step_extern/" in facts["0"], facts
        journal = node.sysnode("journalctl", "--no-pager", "-o", "cat", "-u",
                               "sshd-adoptd").stdout
        assert f"job={job} helper=" in journal, journal[-2000:]
        broker = node.sysnode("systemctl", "show", "sshd-adoptd", "--property=MainPID").stdout
        status = node.sysnode("cat", f"/proc/{broker.strip().split('=')[1]}/status").stdout
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)  # the broker kept its sandbox
    finally:
        node.sysnode("systemctl", "disable", "--now", "sshd-adopt-spawn.socket", timeout=30,
                     check=False)
