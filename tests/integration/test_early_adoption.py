"""Early adoption: a connection enters its job when sshd has authenticated it, not before.

The broker follows the proc connector; the moment a connection's post-authentication
child takes the user's uid it adopts the monitor and the child, so everything the
session forks is born in the job, and the wrapper only confirms. These tests watch
the same kernel events from outside (tests/procwatch.py) and sample the job's cgroups
every millisecond, so "nothing before authentication" is checked at every moment, not
only at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.harness import Cluster, remote_cgroup_job, wait_until
from tests.integration.conftest import with_settings
from tests.procwatch import ProcWatch, UidChange

CGROUP = "cat /proc/self/cgroup"


@dataclass
class CgroupSampler:
    """Samples the ``cgroup.procs`` of every step of a job every millisecond."""

    steps: list[Path]
    samples: list[tuple[int, frozenset[int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _members(self) -> frozenset[int]:
        pids: set[int] = set()
        for step in self.steps:  # with the cgroups below it (cgroup v2: slurm, user/...)
            pids |= Cluster.cgroup_pids(step)
        return frozenset(pids)

    def run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic_ns(), self._members()))
            time.sleep(0.001)

    def __enter__(self) -> CgroupSampler:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def joined_before(self, at_ns: int) -> set[int]:
        """Pids that were in the job at some sample before ``at_ns`` but not at the first."""
        baseline = self.samples[0][1]
        return {pid for t, pids in self.samples if t < at_ns for pid in pids - baseline}

    def ever_joined(self) -> set[int]:
        baseline = self.samples[0][1]
        return {pid for _t, pids in self.samples for pid in pids - baseline}


def _job_steps(cluster: Cluster, host: str, user: str, job: int) -> list[Path]:
    """The job's step cgroups (memory hierarchy), once slurmstepd has made both the extern
    and the batch step: a job is RUNNING in squeue a moment before they exist, and a
    sampler given no step would see nothing at all."""
    extern = cluster.job_cgroup_dir(host, cluster.uid(user), job)
    batch = extern.parent / "step_batch"
    wait_until(lambda: extern.is_dir() and batch.is_dir(), timeout=10,
               what=f"job {job}'s step cgroups under {extern.parent}")

    def script_running() -> bool:  # the batch script's `sleep` started: nothing more joins
        for pid in Cluster.cgroup_pids(batch):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return True
        return False

    # Else the batch script's own processes, started a moment later, count as joining.
    wait_until(script_running, timeout=10, what=f"job {job}'s batch script")
    return sorted(extern.parent.glob("step_*"))


def _authenticated(watch: ProcWatch, uid: int) -> list[UidChange]:
    """A connection's post-authentication child taking the user's uid (real and effective;
    the monitor's key checks change only its effective uid)."""
    return [c for c in watch.uid_changes
            if c.ruid == uid and c.euid == uid and c.cmdline.startswith("sshd")]


@pytest.fixture
def wrong_key(cluster: Cluster) -> Iterator[Path]:
    keydir = cluster.home("alice") / ".lab" / "wrongkey"
    cluster.exec("login", "rm", "-rf", str(keydir), user="alice")
    cluster.exec("login", "mkdir", "-p", str(keydir), user="alice")
    key = keydir / "id_ed25519"
    cluster.exec("login", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key),
                 user="alice")
    try:
        yield key
    finally:
        cluster.exec("login", "rm", "-rf", str(keydir), user="alice")


def test_a_wrong_key_then_the_right_one_enters_the_job_only_after_authentication(
        cluster: Cluster, wrong_key: Path) -> None:
    job = cluster.submit("alice", ["n1"])
    right = cluster.home("alice") / ".ssh" / "id_ed25519"
    with ProcWatch() as watch, CgroupSampler(_job_steps(cluster, "n1", "alice", job)) as cg:
        result = cluster.ssh("login", "n1", CGROUP, user="alice", extra_opts=[
            "-v", "-o", "IdentitiesOnly=yes", "-i", str(wrong_key), "-i", str(right)])
    assert result.returncode == 0, result.stderr
    found = remote_cgroup_job(result.stdout)
    assert found is not None and found.job == job
    # The wrong key really was tried first, on the same connection.
    offered = re.findall(r"Offering public key: (\S+)", result.stderr)
    assert offered[:2] == [str(wrong_key), str(right)], offered
    auth = _authenticated(watch, cluster.uid("alice"))
    assert len(auth) == 1, auth
    early = cg.joined_before(auth[0].at_ns)
    assert not early, f"in the job before authentication: {early}"
    assert cg.ever_joined(), "the sampler never saw the session join (it cannot fail)"


def test_holding_only_alices_public_key_puts_nothing_in_her_job(cluster: Cluster) -> None:
    """bob has alice's public key: sshd says it would accept it (the client cannot sign),
    reads her authorized_keys as her -- nothing of that connection enters her job."""
    job = cluster.submit("alice", ["n1"])
    stolen = cluster.home("bob") / ".lab" / "alice.pub"
    cluster.exec("login", "mkdir", "-p", str(stolen.parent), user="bob")
    stolen.write_text((cluster.home("alice") / ".ssh" / "id_ed25519.pub").read_text())
    os.chown(stolen, cluster.uid("bob"), cluster.uid("bob"))
    log = cluster.broker_log("n1")
    mark = log.mark()
    try:
        with ProcWatch() as watch, \
                CgroupSampler(_job_steps(cluster, "n1", "alice", job)) as cg:
            result = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="bob", extra_opts=[
                "-v", "-l", "alice", "-o", "IdentitiesOnly=yes", "-i", str(stolen)])
    finally:
        stolen.unlink()
    assert result.returncode == 255 and "SHOULD-NOT-RUN" not in result.stdout
    assert "Server accepts key" in result.stderr, result.stderr  # the strongest such attempt
    # sshd did switch to alice's uid to read her keys (the event the broker must not take
    # for an authenticated connection) ...
    assert [c for c in watch.uid_changes if c.euid == cluster.uid("alice")], watch.uid_changes
    assert not _authenticated(watch, cluster.uid("alice"))
    # ... and nothing entered any step of her job, at any sample.
    assert not cg.ever_joined()
    assert "early: user=alice" not in log.since(mark)


def tickets_gone(directory: Path, tickets: list[str]) -> bool:
    return not set(tickets) & set(os.listdir(directory))


def test_a_login_adopted_early_needs_no_round_trip(cluster: Cluster) -> None:
    """The broker adopts at authentication and leaves the answer in a session ticket; the
    wrapper reads it (it is in that job wherever its monitor is) instead of asking: one
    decision line, no request. On OpenSSH 10 the wrapper may start before the adoption is
    done (its shell is forked ~1 ms after authentication): then it asks, and the broker
    answers from the early result (``early=used``). Of a few logins, at least one must take
    the ticket. Each ticket goes when its connection does."""
    job = cluster.submit("alice", ["n1"])
    log = cluster.broker_log("n1")
    took_ticket = 0
    for _ in range(5):
        mark = log.mark()
        # The command's parent is the session's sshd child, whose parent is the monitor.
        result = cluster.ssh("login", "n1", f"{CGROUP}; echo J=$SLURM_JOB_ID; "
                             "m=$(awk '{print $4}' /proc/$PPID/stat); echo M=$m; "
                             "stat -c 'T=%a %U' /run/sshd-adopt/sessions/$m; "
                             "ls /run/sshd-adopt/sessions >/dev/null 2>&1 || echo UNLISTABLE",
                             user="alice", check=True)
        found = remote_cgroup_job(result.stdout)
        assert found is not None and found.job == job
        assert f"J={job}" in result.stdout
        # The connection's monitor had a ticket while it ran, alice's alone, in a directory
        # nobody can list.
        assert "T=400 alice" in result.stdout, result.stdout
        assert "UNLISTABLE" in result.stdout
        tickets = [line[2:] for line in result.stdout.splitlines() if line.startswith("M=")]
        early = log.wait_for("early: user=alice", mark=mark)
        assert f"outcome=adopt job={job}" in early
        time.sleep(0.5)
        requests = [line for line in log.since(mark).splitlines()
                    if "INFO: user=alice uid=" in line]
        assert all("early=used" in line for line in requests), requests
        took_ticket += not requests
        wait_until(functools.partial(tickets_gone, cluster.run / "n1" / "sessions", tickets),
                   5, "the ticket to go with the connection")
    assert took_ticket, "no login of five took its ticket: every wrapper asked the broker"


def test_forwarding_only_connection_is_in_the_job_right_after_authentication(
        cluster: Cluster) -> None:
    job = cluster.submit("alice", ["n1"])
    uid = cluster.uid("alice")
    with ProcWatch() as watch:
        client = cluster.spawn("login", "ssh", "-N", "-L", "127.0.0.1:15024:127.0.0.1:22",
                               "n1", user="alice")
        try:
            wait_until(lambda: bool(_authenticated(watch, uid)), 15, "authentication")
            auth = _authenticated(watch, uid)[0]
            monitor = psutil.Process(auth.pid).ppid()

            def in_job() -> bool:  # the monitor and the post-authentication child, both
                for pid in (monitor, auth.pid):
                    found = remote_cgroup_job(Path(f"/proc/{pid}/cgroup").read_text())
                    if found is None or found.job != job:
                        return False
                return True

            wait_until(in_job, 5, "the connection in the job", interval=0.001)
            after_ms = (time.monotonic_ns() - auth.at_ns) / 1e6
            print(f"forwarding-only connection in its job at most {after_ms:.1f} ms after "
                  "authentication")
            assert after_ms < 250  # the sweeper's grace alone is 500 ms
        finally:
            client.send_signal(signal.SIGTERM)
            client.wait(timeout=10)


def test_the_first_login_through_a_restarted_sshd_is_adopted_early(
        cluster: Cluster, broker_policy: Callable[..., None]) -> None:
    """sshd restarted under a running broker: a listener no scan has found yet (the
    sweeper's scans are five minutes apart here). Its very first connection is followed from
    its exec of sshd (-R, or sshd-session), and adopted at authentication."""
    broker_policy("n1", sweeper={"interval": 300})
    time.sleep(2.5)  # the scan due under the old interval (2 s) is behind us
    job = cluster.submit("alice", ["n1"])
    broker = cluster.broker_pid("n1")
    old = cluster.daemon_pid("sshd-n1-22")
    log = cluster.broker_log("n1")
    mark = log.mark()
    os.kill(old, signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(old), 10, "the old sshd to exit")
    cluster.run_script("up")
    new = cluster.daemon_pid("sshd-n1-22")
    assert new != old and cluster.broker_pid("n1") == broker
    result = cluster.ssh("login", "n1", CGROUP, user="alice", check=True)
    found = remote_cgroup_job(result.stdout)
    assert found is not None and found.job == job
    log.wait_for(f"sshd listener {new} started since the last full scan", mark=mark,
                 timeout=5)
    early = log.wait_for(f"outcome=adopt job={job}", mark=mark, timeout=5)
    assert re.search(rf"INFO: early: user=alice .* outcome=adopt job={job}\b", early), early


def test_without_the_proc_connector_logins_are_adopted_by_the_wrapper(
        cluster: Cluster, broker_restart: None) -> None:
    """broker.proc_events = false (a kernel or unit without the connector): the wrapper's
    request adopts, as before early adoption existed. The lab's broker is replaced by one
    started by hand with that setting (``scripts/cluster up`` brings the usual one back)."""
    del broker_restart
    lab_config = cluster.broker_config("n1")
    config = lab_config.with_name("no-proc-events.toml")
    config.write_text(with_settings(lab_config.read_text(), {"broker": {"proc_events": False}}))
    log = cluster.broker_log("n1")
    pid = cluster.broker_pid("n1")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 15, "the lab's broker to stop")
    mark = log.mark()
    broker = cluster.spawn("n1", "sh", "-c", f"exec {cluster.venv}/bin/sshd-adoptd --foreground "
                           f"--config {config} 2>>{log.path}")
    try:
        log.wait_for("listening on", mark=mark, timeout=15)
        assert "following the proc connector" not in log.since(mark)
        job = cluster.submit("alice", ["n1"])
        result = cluster.ssh("login", "n1", CGROUP, user="alice")
        assert result.returncode == 0, result.stderr
        found = remote_cgroup_job(result.stdout)
        assert found is not None and found.job == job
        line = log.wait_for(f"outcome=adopt job={job}", mark=mark)
        assert "early: " not in line and "early=used" not in line
        assert "adopt=" in line  # the request itself adopted
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=15)
        config.unlink()
