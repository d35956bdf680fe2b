"""Admission without a process: sshd reads the keys itself, the broker keeps the door.

The managed Match block's ``AuthorizedKeysFile`` names ``/run/sshd-adopt/keys/%u``, an
entry the broker keeps while the user has a job on the node (a symlink to the user's
own ``~/.ssh/authorized_keys``, which sshd opens as the user). ``sshd-adopt-keys``, the
AuthorizedKeysCommand, is the fallback. Each test logs in through a lab node's port-22
sshd and looks at what the user and the admin would: the client's output, the cgroup
of the remote command, what ran on the node (the kernel's proc connector), the entry
files, the broker's log.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import Cluster, remote_cgroup_job, wait_until
from tests.procwatch import ProcWatch

DENIED = "Permission denied (publickey)"
NO_JOBS = "Access denied by sshd-adopt: you have no active jobs on this node"
CGROUP = "cat /proc/self/cgroup"


def entry(cluster: Cluster, host: str, user: str) -> Path:
    """The user's key entry on ``host`` (/run/sshd-adopt/keys/<user> inside the node)."""
    return cluster.run / host / "keys" / user


def only_this_key(cluster: Cluster, user: str, key: Path, cert: Path | None = None) -> list[str]:
    """ssh options offering ``key`` (and ``cert``) and nothing else: a copy of the lab's
    ssh_config without its IdentityFile lines, next to the key."""
    lab = (cluster.var / "etc" / "ssh_config").read_text().splitlines()
    lines = [line for line in lab if not line.strip().startswith("IdentityFile")]
    lines += ["    IdentitiesOnly yes", f"    IdentityFile {key}"]
    if cert is not None:
        lines.append(f"    CertificateFile {cert}")
    config = key.parent / "ssh_config"
    config.write_text("\n".join(lines) + "\n")
    os.chown(config, cluster.uid(user), cluster.uid(user))
    config.chmod(0o600)
    return ["-F", str(config)]


def job_of(result: subprocess.CompletedProcess[str]) -> int | None:
    found = remote_cgroup_job(result.stdout)
    return found.job if found is not None and found.step == "extern" else None


# --------------------------------------------------------------------------- no process


def test_a_login_with_a_job_starts_no_process_for_its_keys(cluster: Cluster) -> None:
    """alice has a job and an entry: sshd reads her key file itself, nothing is started for
    her keys. bob, without a job, goes through the command gate in the same watch: the
    watch does see sshd-adopt-keys when it runs."""
    job = cluster.submit("alice", ["n1"])
    wait_until(lambda: os.path.lexists(entry(cluster, "n1", "alice")), 5, "alice's entry")
    with ProcWatch() as watch:
        alice = cluster.ssh("login", "n1", CGROUP, user="alice")
        bob = cluster.ssh("login", "n1", "true", user="bob")
    assert alice.returncode == 0, alice.stderr
    assert job_of(alice) == job
    assert bob.returncode == 255 and NO_JOBS in bob.stderr
    gates = watch.commands("sshd-adopt-keys")
    assert [c for c in gates if c.endswith(" bob")], watch.execs[-50:]
    assert not [c for c in gates if c.endswith(" alice")], gates
    assert watch.lost == 0


# --------------------------------------------------------------------------- rc files once


BASHRC_COUNT = "labrc-count"


@pytest.fixture
def counting_bashrc(cluster: Cluster) -> Iterator[Path]:
    """alice's ~/.bashrc counts its runs on the node and defines a function, before Debian's
    early return for non-interactive shells."""
    counter = cluster.home("alice") / ".lab" / BASHRC_COUNT
    path = cluster.home("alice") / ".bashrc"
    original = path.read_bytes()
    snippet = (f'[ -n "$SSH_CONNECTION" ] && echo "$$ $SHLVL" >> {counter}\n'
               "labfn() { echo FUNCTION-OK; }\n")
    counter.unlink(missing_ok=True)
    path.write_bytes(snippet.encode() + original)
    try:
        yield counter
    finally:
        path.write_bytes(original)
        counter.unlink(missing_ok=True)


@pytest.mark.parametrize("port", [22, 2222])
def test_bashrc_runs_exactly_once_and_its_functions_work(
        cluster: Cluster, counting_bashrc: Path, port: int) -> None:
    """As under a bare sshd (port 2222 is pam_slurm_adopt's): ~/.bashrc runs once, in the
    shell that runs the command, so what it defines is there."""
    job = cluster.submit("alice", ["n1"])
    result = cluster.ssh("login", "n1", f"labfn; {CGROUP}", user="alice", port=port)
    assert result.returncode == 0, result.stderr
    assert "FUNCTION-OK" in result.stdout
    assert job_of(result) == job
    runs = counting_bashrc.read_text().splitlines()
    assert len(runs) == 1, runs


# --------------------------------------------------------------------------- follows jobs


def _first_times(conditions: dict[str, Callable[[], bool]], timeout: float) -> dict[str, float]:
    """When each condition first held (time.monotonic), polling every 2 ms."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(conditions) and time.monotonic() < deadline:
        for name, holds in conditions.items():
            if name not in seen and holds():
                seen[name] = time.monotonic()
        time.sleep(0.002)
    missing = set(conditions) - set(seen)
    assert not missing, f"never seen within {timeout}s: {sorted(missing)}"
    return seen


def test_the_entry_follows_the_extern_step_within_a_second(cluster: Cluster) -> None:
    path = entry(cluster, "n1", "alice")
    assert not os.path.lexists(path)
    job = cluster.submit("alice", ["n1"], wait=False)
    socket = cluster.stepd_socket("n1", job)
    appeared = _first_times({"socket": socket.exists,
                             "entry": lambda: os.path.lexists(path)}, 30)
    print(f"entry {1000 * (appeared['entry'] - appeared['socket']):.0f} ms after the socket")
    assert appeared["entry"] - appeared["socket"] < 1.0
    assert os.readlink(path) == str(cluster.home("alice") / ".ssh" / "authorized_keys")
    cluster.wait_running(job)
    assert job_of(cluster.ssh("login", "n1", CGROUP, user="alice")) == job
    stepd = cluster.extern_stepd_pid("n1", job)
    cluster.exec("ctl", "scancel", str(job))
    # (Slurm 24.11 may leave the socket file behind: the stepd's exit is the job's end here.)
    gone = _first_times({"stepd": lambda: not psutil.pid_exists(stepd),
                         "entry": lambda: not os.path.lexists(path)}, 30)
    print(f"entry gone {1000 * (gone['entry'] - gone['stepd']):.0f} ms after the stepd")
    assert gone["entry"] - gone["stepd"] < 1.0
    refused = cluster.ssh("login", "n1", "true", user="alice")
    assert refused.returncode == 255 and NO_JOBS in refused.stderr


def test_a_login_right_after_squeue_says_running_gets_in(cluster: Cluster) -> None:
    """The user's first ssh the moment squeue shows the job running: through the entry, or
    through the command gate when the broker's events are a moment behind."""
    job = cluster.submit("alice", ["n2"], wait=False)
    wait_until(lambda: (cluster.job_info(job) or ("", []))[0] == "RUNNING", 30,
               f"squeue to show job {job} running", interval=0.02)
    result = cluster.ssh("login", "n2", CGROUP, user="alice")
    assert result.returncode == 0, result.stderr
    assert job_of(result) == job


# --------------------------------------------------------------------------- fail closed


def test_a_killed_broker_closes_the_door_and_a_restart_rebuilds_first(
        cluster: Cluster, broker_restart: None) -> None:
    """kill -9: the broker's guardian removes every entry at once, so nobody whose job ends
    meanwhile can still authenticate; a new broker makes the entries before it answers."""
    del broker_restart
    job = cluster.submit("alice", ["n1"])
    path = entry(cluster, "n1", "alice")
    wait_until(lambda: os.path.lexists(path), 5, "alice's entry")
    log = cluster.broker_log("n1")
    os.kill(cluster.broker_pid("n1"), signal.SIGKILL)
    wait_until(lambda: not os.path.lexists(path), 2, "the guardian to remove the entry",
               interval=0.01)
    cluster.cancel(job)
    result = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="alice")
    assert result.returncode == 255 and DENIED in result.stderr
    assert "SHOULD-NOT-RUN" not in result.stdout
    # A job that starts while no broker runs: the restarted broker finds it before serving.
    job = cluster.submit("alice", ["n1"])
    mark = log.mark()
    cluster.run_script("up", timeout=300)
    wait_until(cluster.broker_socket("n1").exists, 15, "broker socket")
    started = log.since(mark)
    rebuilt = re.search(r"key entries rebuilt in \S+: (\d+) user", started)
    assert rebuilt is not None and int(rebuilt.group(1)) >= 1, started
    assert started.index("key entries rebuilt") < started.index("listening on"), started
    assert os.path.lexists(path)
    assert job_of(cluster.ssh("login", "n1", CGROUP, user="alice")) == job


# --------------------------------------------------------------------------- homes


def test_a_home_root_cannot_read(cluster: Cluster) -> None:
    """fay's 0700 home is served on the nodes by a FUSE mount that refuses uid 0, as an NFS
    export with root_squash would (the kernel here has no NFS server): sshd reads her keys
    as her; so does the gate."""
    keys = cluster.home("fay") / ".ssh" / "authorized_keys"
    as_root = cluster.exec("n1", "cat", str(keys), check=False)
    assert as_root.returncode != 0 and "Permission denied" in as_root.stderr
    # The emulated export is read-only: the batch step writes nowhere in her home.
    job = cluster.submit("fay", ["n1"], extra_args=["--output=/dev/null", "--chdir=/tmp"])
    for port in (22, 2222):
        result = cluster.ssh("login", "n1", CGROUP, user="fay", port=port)
        assert result.returncode == 0, (port, result.stderr)
        assert job_of(result) == job, port
    cluster.cancel(job)
    refused = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="fay")
    assert refused.returncode == 255 and NO_JOBS in refused.stderr
    assert "SHOULD-NOT-RUN" not in refused.stdout


# --------------------------------------------------------------------------- certificates


@pytest.fixture
def alice_certificate(cluster: Cluster) -> Iterator[list[str]]:
    """A fresh key of alice's (in no authorized_keys) with a certificate of the lab's user CA:
    ssh options that offer only it."""
    keydir = cluster.home("alice") / ".lab" / "cert"
    cluster.exec("login", "rm", "-rf", str(keydir), user="alice")
    cluster.exec("login", "mkdir", "-p", str(keydir), user="alice")
    key = keydir / "id_ed25519"
    cluster.exec("login", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key),
                 user="alice")
    subprocess.run(["ssh-keygen", "-q", "-s", str(cluster.var / "etc" / "user_ca"), "-I",
                    "alice-lab-test", "-n", "alice", "-V", "-5m:+1h", f"{key}.pub"],
                   check=True, capture_output=True)
    cert = keydir / "id_ed25519-cert.pub"
    os.chown(cert, cluster.uid("alice"), cluster.uid("alice"))
    try:
        yield only_this_key(cluster, "alice", key, cert)
    finally:
        cluster.exec("login", "rm", "-rf", str(keydir), user="alice")


def test_a_certificate_enters_only_with_a_job(cluster: Cluster,
                                              alice_certificate: list[str]) -> None:
    sshd = cluster.sshd_log("n1")
    mark = sshd.mark()
    refused = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="alice",
                          extra_opts=alice_certificate)
    assert refused.returncode == 255 and DENIED in refused.stderr, refused.stderr
    assert "SHOULD-NOT-RUN" not in refused.stdout
    assert "Accepted publickey for alice" not in sshd.since(mark)
    job = cluster.submit("alice", ["n1"])
    mark = sshd.mark()
    result = cluster.ssh("login", "n1", CGROUP, user="alice", extra_opts=alice_certificate)
    assert result.returncode == 0, result.stderr
    assert job_of(result) == job
    assert re.search(r"Accepted publickey for alice .*CERT", sshd.since(mark))


# --------------------------------------------------------------------------- the directory


def test_an_entry_directory_others_can_write_stops_the_broker_and_fails_doctor(
        cluster: Cluster, broker_restart: None) -> None:
    del broker_restart
    keys_dir = cluster.run / "n1" / "keys"
    pid = cluster.broker_pid("n1")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15, "the broker to stop")
    mode = stat.S_IMODE(keys_dir.stat().st_mode)
    keys_dir.chmod(0o777)
    try:
        started = cluster.exec("n1", str(cluster.venv / "bin" / "sshd-adoptd"), "--foreground",
                               "--config", str(cluster.broker_config("n1")), check=False,
                               timeout=30)
        assert started.returncode != 0
        assert "/run/sshd-adopt/keys" in started.stderr, started.stderr
        assert "writable by group or others" in started.stderr, started.stderr
        assert not cluster.broker_socket("n1").exists()
        doctor = cluster.exec("n1", str(cluster.venv / "bin" / "sshd-adopt"), "doctor",
                              "--config", str(cluster.broker_config("n1")), check=False)
        assert doctor.returncode != 0
        line = next(ln for ln in doctor.stdout.splitlines() if "key entries" in ln)
        assert "FAIL" in line and "/run/sshd-adopt/keys" in line, doctor.stdout
    finally:
        keys_dir.chmod(mode)


# --------------------------------------------------------------------------- site command


@pytest.fixture
def site_keys_command(cluster: Cluster) -> Iterator[tuple[str, Path, Path]]:
    """A site keys command (like sss_ssh_authorizedkeys): prints the keys of a directory the
    site keeps, and logs who ran it. (command line, key of alice's in that directory only,
    the log)."""
    site = cluster.var / "site-keys"
    subprocess.run(["rm", "-rf", str(site)], check=True)
    site.mkdir(mode=0o755)
    log = site / "calls.log"
    log.touch()
    log.chmod(0o666)
    script = site / "lab-site-keys"
    script.write_text("#!/bin/sh\n"
                      f'echo "$(id -un) $1" >> {log}\n'
                      f'exec cat {site}/"$1".pub\n')
    script.chmod(0o755)
    keydir = cluster.home("alice") / ".lab" / "sitekey"
    cluster.exec("login", "rm", "-rf", str(keydir), user="alice")
    cluster.exec("login", "mkdir", "-p", str(keydir), user="alice")
    key = keydir / "id_ed25519"
    cluster.exec("login", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key),
                 user="alice")
    (site / "alice.pub").write_text(Path(f"{key}.pub").read_text())
    try:
        yield f"{script} %u", key, log
    finally:
        cluster.exec("login", "rm", "-rf", str(keydir), user="alice")
        subprocess.run(["rm", "-rf", str(site)], check=True)


def test_keys_from_a_site_command(cluster: Cluster, broker_policy: Callable[..., None],
                                  site_keys_command: tuple[str, Path, Path]) -> None:
    """With admission.keys_command the keys come from the site's command, run by the gate as
    the command user, for users with a job and (restricted, to be told why) without."""
    command, key, calls = site_keys_command
    broker_policy("n1", admission={"keys_command": command})
    assert not os.path.lexists(entry(cluster, "n1", "alice"))  # no entries in this mode
    only_site_key = only_this_key(cluster, "alice", key)
    refused = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="alice",
                          extra_opts=only_site_key)
    assert refused.returncode == 255 and NO_JOBS in refused.stderr, refused.stderr
    job = cluster.submit("alice", ["n1"])
    assert not os.path.lexists(entry(cluster, "n1", "alice"))
    result = cluster.ssh("login", "n1", CGROUP, user="alice", extra_opts=only_site_key)
    assert result.returncode == 0, result.stderr
    assert job_of(result) == job
    runs = calls.read_text().splitlines()
    assert runs and set(runs) == {"sshd-adopt-gate alice"}, runs
