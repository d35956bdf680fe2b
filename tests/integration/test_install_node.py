"""Issue #7: ``scripts/install`` on a real lab node, then ``sshd-adopt doctor``: all green.

test_install.py installs into temporary directories; here the real script runs with its
DEFAULT paths (/opt/sshd-adopt, /etc/sshd-adopt, /etc/ssh/sshd_config.d, /etc/systemd/system,
the sshd-adopt-gate user) on compute node n3, and the installed product is then started
and used as an admin would: the broker from the prefix, the doctor against the default
config and sshd's own /etc/ssh/sshd_config, and a real sshd with the node's configuration
plus the installed drop-in, logged into as alice (adopted into her job), bob (no job:
refused) and carol (an admin the drop-in's Match block leaves out: a plain session).

Nothing the host or the rest of the lab sees changes. Everything runs in a mount namespace
nested in n3's (``unshare -m``), in which

* /etc, /opt, /root, /run and /var/log are overlays whose upper dirs are in this test's
  tmp dir (on the host's disk, not a tmpfs): useradd, the drop-in, the venv, pip's cache,
  PAM's /run/motd.dynamic and the lastlog records of useradd and sshd land there. n3's
  own mounts below those dirs (the lab's /etc/slurm, /etc/hosts, /etc/pam.d, /run/munge, ...) are
  moved back on top, so the node still is lab node n3 (but the lab's /etc/ssh: the
  install's drop-in goes to the node's own /etc/ssh/sshd_config.d, in the overlay);
* /run/sshd-adopt, which on every lab node is the lab broker's run dir, is a fresh tmpfs:
  the installed broker gets its own socket there;
* /tmp is a fresh tmpfs, and the lab's syslog socket is replaced by one of this test, so
  useradd's and PAM's syslog lines do not reach the lab's log.

The install itself runs in the host's network namespace (n3's has no route out, and pip
needs the node's package index or mirror); everything else runs in n3's. The namespace
lives as long as a holder process; teardown kills every process in it, so it is gone
even when a test fails.

The installed configuration is used untouched: slurm.conf is at the default path, n3 is
found as NodeName by its host name, the socket is the default one, and the example file's
``[exempt] groups = ["clusteradm"]`` agrees with the drop-in's ``Match Group
slurmusers,!clusteradm``. One test breaks that agreement on purpose: the doctor must FAIL
its ``exempt`` check, and the broker's sweeper really ends the admin's (carol's) session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import CLEAN_ENV, REPO, Cluster, LogFile, remote_cgroup_job

pytestmark = pytest.mark.cluster

NODE = "n3"
PORT = 2022  # a spare port in n3's network namespace (the lab uses 22, 2222 and 6818)
PREFIX = Path("/opt/sshd-adopt")
CONFIG = Path("/etc/sshd-adopt/sshd-adopt.toml")
DROPIN = Path("/etc/ssh/sshd_config.d/sshd-adopt.conf")
UNIT = Path("/etc/systemd/system/sshd-adoptd.service")
SPAWN_SOCKET = UNIT.parent / "sshd-adopt-spawn.socket"
SPAWN_SERVICE = UNIT.parent / "sshd-adopt-spawn@.service"
GATE_USER = "sshd-adopt-gate"
#: Top-level dirs overlaid in the nested namespace (every write of the install and of the
#: installed product lands in one of them, or in the two fresh tmpfs).
OVERLAID = ("/etc", "/opt", "/root", "/run", "/var/log")
#: n3's mounts left under the overlays: the lab's /etc/ssh (its host key, for hostbased
#: logins) would take the drop-in the install writes; the overlay shows the node's own.
NOT_MOVED_BACK = ("/etc/ssh",)
#: Host files whose content must be the same after the test (only the lab writes them).
ACCOUNT_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")
#: The installed example's exempt list, which a test removes to break the agreement
#: between ``[exempt]`` and the drop-in's Match line.
EXEMPT_LINE = 'groups = ["clusteradm"]\n'
NO_JOBS = "Access denied by sshd-adopt: you have no active jobs on this node"


# --------------------------------------------------------------------------- helpers


class SyslogSink:
    """A /dev/log of our own: a datagram socket read by a thread (a full queue would block
    the sender), so the nested namespace's syslog lines stay out of the lab's log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)  # as /dev/log: every user's programs may log
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="syslog-sink", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.lines.append(data.decode(errors="replace"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _unescape(field_text: str) -> str:
    """A /proc/*/mountinfo path field (spaces and the like are octal escapes)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def submounts(mountinfo: str) -> list[str]:
    """The visible mount points below the overlaid dirs, parents first, each once.

    Hidden mounts (under a later mount on a parent path, as the host's
    /run/sshd-adopt-lab/ns is under n3's /run tmpfs) are left out: path lookup never
    reaches them. A mount is visible when resolving its mount point, as the kernel walks
    a path (at each prefix, into the last mount on it), ends at that very mount.
    """
    mounts = []  # (id, parent id, mount point), in mountinfo order
    for line in mountinfo.splitlines():
        fields = line.split()
        mounts.append((int(fields[0]), int(fields[1]), _unescape(fields[4])))
    ids = {m[0] for m in mounts}
    root = next(m[0] for m in mounts if m[2] == "/" and m[1] not in ids)

    def resolve(path: str) -> int:
        current = root
        parts = [p for p in path.split("/") if p]
        for prefix in ["/"] + ["/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]:
            while True:
                on_top = [m[0] for m in mounts if m[1] == current and m[2] == prefix]
                if not on_top:
                    break
                current = on_top[-1]
        return current

    points: list[str] = []
    for mount_id, _, point in mounts:
        if (any(point.startswith(top + "/") for top in OVERLAID) and point not in points
                and point not in NOT_MOVED_BACK and resolve(point) == mount_id):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"))  # parents before their children


def setup_script(tmp: Path, points: list[str], lab_run: Path) -> str:
    """The shell script that builds the nested namespace (run by ``unshare -m``)."""
    q = shlex.quote
    stash = tmp / "stash"
    lines = ["set -e", f"mkdir -p {q(str(stash))}"]
    # mount -n: no /run/mount/utab entries (that /run is still n3's at this point).
    for index, point in enumerate(points):
        target = q(str(stash / str(index)))
        lines.append(f"if [ -d {q(point)} ]; then mkdir {target}; else : > {target}; fi")
        lines.append(f"mount -n --bind {q(point)} {target}")
    for top in OVERLAID:
        name = top.strip("/").replace("/", "-")
        upper, work = tmp / f"{name}.upper", tmp / f"{name}.work"
        lines.append(f"mkdir -p {q(str(upper))} {q(str(work))}")
        lines.append(f"mount -n -t overlay sshd-adopt-test-{name} -o "
                     f"lowerdir={top},upperdir={upper},workdir={work} {top}")
    for index, point in enumerate(points):  # n3's own mounts, back on top of the overlays
        lines.append(f"mount -n --move {q(str(stash / str(index)))} {q(point)}")
    lines += [
        f"mount -n --bind {q(str(tmp / 'dev-log'))} {q(str(lab_run / 'dev-log'))}",
        "mount -n -t tmpfs -o mode=0755,nosuid,nodev,size=16m sshd-adopt-test-run "
        "/run/sshd-adopt",
    ]
    # The checkout itself stays visible under the fresh /tmp (CI clones into /tmp). Its
    # stash must be outside /tmp, which the tmpfs covers: the fresh /run/sshd-adopt.
    keep = REPO.is_relative_to("/tmp")
    repo_stash = "/run/sshd-adopt/.repo"
    if keep:
        lines += [f"mkdir {repo_stash}", f"mount -n --bind {q(str(REPO))} {repo_stash}"]
    lines.append(
        "mount -n -t tmpfs -o mode=1777,nosuid,nodev,size=512m sshd-adopt-test-tmp /tmp")
    if keep:
        lines += [f"mkdir -p {q(str(REPO))}",
                  f"mount -n --move {repo_stash} {q(str(REPO))}", f"rmdir {repo_stash}"]
    lines += [
        "echo ready",
        "exec sleep infinity",
    ]
    return "\n".join(lines) + "\n"


def digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return "absent"


def non_ok(document: dict[str, Any], allowed: tuple[str, ...] = ()) -> list[str]:
    """Every check that is not OK (except names in ``allowed``), as readable lines."""
    return [f"{c['status']} {c['name']}: {c['detail']} (fix: {c['fix']})"
            for c in document["checks"] if c["status"] != "OK" and c["name"] not in allowed]


@dataclass
class Node:
    """The nested namespace on n3 with sshd-adopt installed in it, and what happened there."""

    cluster: Cluster
    tmp: Path
    holder: subprocess.Popen[str]
    sink: SyslogSink
    mnt_ino: int
    children: list[subprocess.Popen[str]] = field(default_factory=list)
    broker: subprocess.Popen[str] | None = None
    sshd: subprocess.Popen[str] | None = None
    install: subprocess.CompletedProcess[str] | None = None
    skeleton_doctor: dict[str, Any] = field(default_factory=dict)
    host_before: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ running

    def argv(self, *cmd: str, net: bool = True) -> list[str]:
        nsdir = self.cluster.nsdir
        ns = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt",
              f"--uts={nsdir / (NODE + '.uts')}"]
        if net:
            ns.append(f"--net={nsdir / (NODE + '.net')}")
        return [*ns, "--wd=/", "--", *cmd]

    def run(self, *cmd: str, net: bool = True, timeout: float = 60, check: bool = True,
            input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*cmd, net=net), capture_output=True, text=True,
                              timeout=timeout, input=input, env=env or CLEAN_ENV,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the nested namespace: {shlex.join(cmd)} -> rc "
                                 f"{proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def start(self, name: str, *cmd: str) -> subprocess.Popen[str]:
        """A daemon in the nested namespace, in the foreground, its output in tmp/NAME.log."""
        with (self.tmp / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(self.argv(*cmd), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, env=CLEAN_ENV)
        self.children.append(proc)
        return proc

    def log(self, name: str) -> LogFile:
        return LogFile(self.tmp / f"{name}.log")

    def doctor(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = self.run(str(PREFIX / "bin" / "sshd-adopt"), "doctor", "--json", *args,
                        check=False)
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    def ssh(self, user: str, command: str) -> subprocess.CompletedProcess[str]:
        """From the login host to the installed sshd; the lab knows n3's key as "n3"."""
        return self.cluster.ssh("login", NODE, command, user=user, port=PORT,
                                extra_opts=["-o", f"HostKeyAlias={NODE}"])

    def upper(self, top: str) -> Path:
        return self.tmp / (top.strip("/").replace("/", "-") + ".upper")

    # ------------------------------------------------------------------ teardown

    def processes(self) -> list[int]:
        """Every process in the nested mount namespace."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(entry / "ns" / "mnt").st_ino == self.mnt_ino:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def destroy(self) -> None:
        """Stop the daemons, kill whatever else lives in the namespace, reap, clean up."""
        for proc in (self.sshd, self.broker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        deadline = time.monotonic() + 15
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:  # sessions, the holder: nothing in there is anyone else's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for proc in [*self.children, self.holder]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.sink.close()
        left = self.processes()
        assert not left, f"processes left in the nested namespace: {left}"
        for top in OVERLAID:  # the venv and the rest; the logs stay for a post-mortem
            name = top.strip("/").replace("/", "-")
            for suffix in ("upper", "work"):
                shutil.rmtree(self.tmp / f"{name}.{suffix}", ignore_errors=True)


def host_state() -> dict[str, str]:
    """What must be the same on the host before and after (and while installed)."""
    state = {path: digest(path) for path in ACCOUNT_FILES}
    for path in (PREFIX, CONFIG.parent, DROPIN, UNIT):
        state[str(path)] = "present" if path.exists() else "absent"
    return state


def node_run_state(cluster: Cluster) -> list[str]:
    """n3's own /run tmpfs (not the lab dirs mounted into it): every entry and its mtime."""
    out = cluster.exec(NODE, "find", "/run", "-xdev", "-printf", "%D %p %T@\n").stdout
    device = out.split(" ", 1)[0]
    return sorted(line for line in out.splitlines() if line.split(" ", 1)[0] == device)


def start_holder(cluster: Cluster, tmp: Path) -> subprocess.Popen[str]:
    mountinfo = cluster.exec(NODE, "cat", "/proc/self/mountinfo").stdout
    script = setup_script(tmp, submounts(mountinfo), cluster.run)
    nsdir = cluster.nsdir
    holder = subprocess.Popen(
        ["nsenter", f"--mount={nsdir / (NODE + '.mnt')}", f"--uts={nsdir / (NODE + '.uts')}",
         f"--net={nsdir / (NODE + '.net')}", "--wd=/", "--",
         "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=CLEAN_ENV)
    assert holder.stdout is not None
    ready, _, _ = select.select([holder.stdout], [], [], 30)
    line = holder.stdout.readline() if ready else ""
    if line.strip() != "ready":
        holder.kill()
        _, err = holder.communicate(timeout=10)
        raise AssertionError(f"the nested namespace was not set up:\n{err}")
    return holder


# --------------------------------------------------------------------------- the fixture


@pytest.fixture(scope="module")
def node(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("install-node")
    assert not set(str(tmp)) & set(",:"), f"{tmp}: not usable in overlay options"
    host_before = host_state()
    run_before = node_run_state(cluster)
    lab_syslog = cluster.syslog()
    syslog_mark = lab_syslog.mark()
    sink = SyslogSink(tmp / "dev-log")
    try:
        holder = start_holder(cluster, tmp)
    except BaseException:
        sink.close()
        raise
    node = Node(cluster, tmp, holder, sink, os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino,
                host_before=host_before)
    try:
        # The lab created the gate user on the host (its own sshd needs it); a fresh node
        # has none, so the install's useradd is exercised: remove it in the overlay only.
        if node.run("getent", "passwd", GATE_USER, check=False).returncode == 0:
            node.run("userdel", GATE_USER)
        # As an admin runs it: the caller's environment (pip mirror settings included),
        # n3's host name, and the network of the host (n3 has no route to a package index).
        node.install = node.run(str(REPO / "scripts" / "install"), net=False, timeout=300,
                                check=False, env=dict(os.environ))
        assert node.install.returncode == 0, node.install.stdout + node.install.stderr

        node.broker = node.start("sshd-adoptd", str(PREFIX / "bin" / "sshd-adoptd"),
                                 "--foreground")
        node.log("sshd-adoptd").wait_for("listening on /run/sshd-adopt/broker.sock",
                                         timeout=15)
        node.sshd = node.start(
            "sshd", "/usr/sbin/sshd", "-D", "-e", "-p", str(PORT), "-o", "PidFile=none",
            "-h", str(cluster.var / "ssh" / NODE / "ssh_host_ed25519_key"))
        node.log("sshd").wait_for(f"Server listening on 0.0.0.0 port {PORT}", timeout=15)

        # The configuration as installed, untouched: what the doctor says first.
        _, node.skeleton_doctor = node.doctor()
        yield node
    finally:
        node.destroy()
    # Only after the namespace is gone: the host is as before, the lab's log untouched.
    assert host_state() == host_before
    assert node_run_state(cluster) == run_before
    leaked = [line for line in lab_syslog.since(syslog_mark).splitlines()
              if GATE_USER in line or f"port {PORT}" in line]
    assert not leaked, leaked


# --------------------------------------------------------------------------- the tests


def test_install_did_every_step_with_the_default_paths(node: Node) -> None:
    assert node.install is not None
    out = node.install.stdout
    expected = [
        f"create a venv at {PREFIX} from /usr/bin/python3",
        f"pip install sshd-adopt from {REPO} into {PREFIX}",
        f"write the configuration {CONFIG}",
        f"write the sshd drop-in {DROPIN}",
        f"create the locked system user {GATE_USER}",
        "/usr/sbin/sshd -t: ok",
    ]
    # The unit is written when /etc/systemd exists (it does on this host, without a running
    # systemd, so no daemon-reload), skipped otherwise.
    units = Path("/etc/systemd").is_dir()
    expected += ([f"write the systemd unit {UNIT}",
                  f"write the session spawner's socket {SPAWN_SOCKET}",
                  f"write the session spawner's service {SPAWN_SERVICE}"] if units
                 else ["/etc/systemd does not exist: no systemd unit installed"])
    for line in expected:
        assert line in out, out
    assert "daemon-reload" not in out
    assert re.search(r"sshd -t -f \S+: ok", out), out  # the drop-in on its own
    # The doctor at the end of the install: only the broker (not started yet) failed.
    assert "FAIL  broker" in out, out
    entry = node.run("getent", "passwd", GATE_USER).stdout.strip().split(":")
    assert entry[5:] == ["/nonexistent", "/usr/sbin/nologin"], entry
    assert node.run("passwd", "--status", GATE_USER).stdout.split()[1] == "L"
    # Everything the install wrote is in the overlays: the files named above, the account
    # databases, and the venv; nothing else under /etc or /opt.
    etc = {str(p.relative_to(node.upper("/etc"))) for p in node.upper("/etc").rglob("*")
           if p.is_file()}
    accounts = {p for p in etc
                if re.fullmatch(r"(passwd|group|g?shadow|sub[ug]id)-?|\.pwd\.lock", p)}
    assert etc - accounts == {"sshd-adopt/sshd-adopt.toml", "ssh/sshd_config.d/sshd-adopt.conf",
                              *(str(path.relative_to("/etc")) for path in
                                (UNIT, SPAWN_SOCKET, SPAWN_SERVICE) if units)}
    assert [p.name for p in node.upper("/opt").iterdir()] == ["sshd-adopt"]


def test_a_second_install_changes_nothing(node: Node) -> None:
    proc = node.run(str(REPO / "scripts" / "install"), net=False, timeout=300,
                    env=dict(os.environ))
    assert "install: 0 change(s)" in proc.stdout, proc.stdout
    assert f"keeping the existing configuration {CONFIG}" in proc.stdout


def test_doctor_on_the_untouched_install_is_green(node: Node) -> None:
    """Right after the install and the broker's start, before anything was edited."""
    assert non_ok(node.skeleton_doctor, allowed=("sshd (managed user)",)) == []


def set_config(node: Node, text: str) -> None:
    """Replace the installed configuration and reload the broker, as an admin does."""
    assert node.broker is not None
    node.run("sh", "-c", f"cat > {CONFIG}.new && mv {CONFIG}.new {CONFIG}", input=text)
    mark = node.log("sshd-adoptd").mark()
    node.broker.send_signal(signal.SIGHUP)
    node.log("sshd-adoptd").wait_for("reloaded", mark=mark, timeout=15)


def test_an_admin_outside_exempt_keeps_her_session_and_doctor_flags_an_exempt_managed_user(
        node: Node) -> None:
    """Who is managed is sshd's Match block alone: carol (left out by it) keeps a plain
    session whatever [exempt] says, and the doctor stays green. The pair is inconsistent
    when [exempt] names a user the block manages (a broken broker would lock her out): the
    doctor FAILs that, naming the user."""
    original = node.run("cat", str(CONFIG)).stdout
    assert original.count(EXEMPT_LINE) == 1, original
    set_config(node, original.replace(EXEMPT_LINE, "", 1))
    try:
        _, document = node.doctor()
        assert non_ok(document, allowed=("sshd (managed user)",)) == []
        mark = node.log("sshd-adoptd").mark()
        carol = node.ssh("carol", "echo IN; sleep 4; echo STILL-HERE")
        assert "IN" in carol.stdout and "STILL-HERE" in carol.stdout, carol
        assert "user=carol" not in node.log("sshd-adoptd").since(mark)
        set_config(node, original.replace(EXEMPT_LINE, 'users = ["root", "alice"]\n' +
                                          EXEMPT_LINE, 1))
        status, document = node.doctor()
        problems = non_ok(document, allowed=("sshd (managed user)",))
        assert status == 1
        assert len(problems) == 1, problems
        assert problems[0].startswith(
            f"FAIL sshd (alice): exempt user alice gets ForceCommand {PREFIX}/bin/sshd-adopt"
        ), problems
    finally:
        set_config(node, original)


def test_doctor_reports_all_green(node: Node) -> None:
    status, document = node.doctor()
    # Without --user the managed-user view is the one thing not checked (by design).
    assert non_ok(document, allowed=("sshd (managed user)",)) == []
    skipped = [c for c in document["checks"] if c["status"] == "SKIP"]
    assert [c["name"] for c in skipped] == ["sshd (managed user)"]
    assert (status, document["ok"]) == (0, True)
    names = {c["name"] for c in document["checks"]}
    for name in ("config", "config file", "slurm.conf", "PrologFlags", "NodeName",
                 "spool dir", "broker", "key entries", "sshd (root)", "path (wrapper)",
                 "path (interpreter)", "path (package)"):
        assert name in names, names


def test_doctor_with_a_job_of_alice_gives_the_adopt_decision(
        node: Node, cluster: Cluster) -> None:
    job = cluster.submit("alice", [NODE])
    status, document = node.doctor("--user", "alice")
    assert non_ok(document) == []
    assert status == 0
    details = {c["name"]: c["detail"] for c in document["checks"]}
    alice = [c["detail"] for c in document["checks"] if c["name"] == "sshd (alice)"]
    assert "AuthorizedKeysFile /run/sshd-adopt/keys/%u" in alice, alice
    assert "path (AuthorizedKeysCommand)" in details
    dry = document["dry_run"]
    assert [j["job_id"] for j in dry["jobs"]] == [job]
    assert dry["decision"].startswith(f"adopt into job {job}"), dry


def test_the_installed_product_adopts_real_logins(node: Node, cluster: Cluster) -> None:
    broker = node.log("sshd-adoptd")
    mark = broker.mark()
    job = cluster.submit("alice", [NODE])
    alice = node.ssh("alice", 'echo "JOB=$SLURM_JOB_ID"; cat /proc/self/cgroup')
    assert alice.returncode == 0, alice.stderr
    found = remote_cgroup_job(alice.stdout)
    assert found is not None and (found.node, found.job, found.step) == (
        NODE, job, "extern"), alice.stdout
    assert f"JOB={job}" in alice.stdout
    assert f"outcome=adopt job={job}" in broker.wait_for("user=alice uid=", mark=mark)

    bob = node.ssh("bob", "echo SHOULD-NOT-RUN")
    assert bob.returncode == 255 and NO_JOBS in bob.stderr, bob
    assert "SHOULD-NOT-RUN" not in bob.stdout
    assert "outcome=restricted-keys" in broker.wait_for("gate: user=bob", mark=mark)

    # The admin: a plain session outside any job, left alone well past the sweeper's grace
    # and interval, [exempt] agreeing with the drop-in.
    carol = node.ssh("carol", "echo IN; sleep 3; cat /proc/self/cgroup; echo STILL-HERE")
    assert carol.returncode == 0 and "STILL-HERE" in carol.stdout, carol
    assert remote_cgroup_job(carol.stdout) is None
    assert "user=carol" not in broker.since(mark)


def test_nothing_leaks_to_the_host_or_the_lab(node: Node, cluster: Cluster) -> None:
    """While installed and running on n3: the host's files and the lab's broker unchanged."""
    assert host_state() == node.host_before
    assert not PREFIX.exists() and not DROPIN.exists()
    # The lab's own broker on n3 still owns the lab socket and still serves.
    assert (cluster.run / NODE / "broker.sock").exists()
    job = cluster.submit("alice", [NODE])
    lab = cluster.ssh("login", NODE, "cat /proc/self/cgroup", user="alice")
    found = remote_cgroup_job(lab.stdout)
    assert found is not None and found.job == job, lab
    # What else the install and the logins wrote went to the overlays, not to n3 or the
    # host: useradd's and sshd's lastlog records, PAM's /run/motd.dynamic, pip's cache.
    assert (node.upper("/var/log") / "lastlog").exists()
    assert (node.upper("/run") / "motd.dynamic").exists()
    assert any("useradd" in line for line in node.sink.lines), node.sink.lines
    assert node.broker is not None and node.broker.poll() is None
