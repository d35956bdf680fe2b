"""Issue #4 end to end: the connection lands in the job it came from (callerid), bounded.

alice typically holds other jobs on the target node, so only the callerid RPC
to the source host's slurmd can pick the right one. Each test asserts which
job's extern cgroup the remote process is in, and the broker's decision line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness import Cluster, remote_cgroup_job, wait_until

DEADLINE = 1.0  # the default callerid deadline


def job_of(text: str) -> int | None:
    found = remote_cgroup_job(text)
    return found.job if found is not None else None


def two_jobs_on(cluster: Cluster, user: str, node: str) -> list[int]:
    jobs = []
    for _ in range(2):
        jobs.append(cluster.submit(user, [node]))
        time.sleep(1.1)
    return jobs


def test_ssh_from_a_batch_step_and_an_srun_step_lands_in_the_spanning_job(
    cluster: Cluster,
) -> None:
    others = two_jobs_on(cluster, "alice", "n2")
    log = cluster.broker_log("n2")
    mark = log.mark()
    batch = cluster.run_in_batch(
        "alice", ["n1", "n2"],
        "ssh n2 cat /proc/self/cgroup; echo ---; "
        f"srun --overlap -N1 -n1 -w {cluster.node('n1')} ssh n2 cat /proc/self/cgroup",
    )
    assert batch.returncode == 0, batch.output
    from_batch, from_srun = batch.output.split("---")
    assert job_of(from_batch) == batch.job_id, batch.output
    assert job_of(from_srun) == batch.job_id, batch.output
    assert batch.job_id not in others
    decisions = log.since(mark)
    assert f"member of job {batch.job_id} via native" in decisions


def test_the_source_job_wins_over_a_newer_one(cluster: Cluster) -> None:
    """The job the ssh comes from was started first; a newer job of alice's runs on the
    target too. Only the callerid answer can pick the older one ("newest" would not)."""
    token = uuid.uuid4().hex[:12]
    lab = cluster.home("alice") / ".lab"
    go, out = lab / f"go-{token}", lab / f"source-{token}.out"
    source = cluster.submit("alice", ["n1", "n2"], (
        "#!/bin/bash\n"
        f"while [ ! -e {go} ]; do sleep 0.1; done\n"
        f"ssh n2 cat /proc/self/cgroup >{out}.tmp 2>&1; mv {out}.tmp {out}\n"
        "exec sleep 600\n"))
    time.sleep(1.1)  # extern steps are dated to the second
    newer = cluster.submit("alice", ["n2"])
    log = cluster.broker_log("n2")
    mark = log.mark()
    try:
        go.touch()
        wait_until(out.exists, 30, "the ssh from the source job")
        landed = job_of(out.read_text())
    finally:
        go.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    assert landed == source, (landed, source, newer)
    assert f"member of job {source} via native" in log.wait_for(
        f"outcome=adopt job={source}", mark=mark)


def test_from_the_login_host_action_unknown_decides(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    jobs = [*two_jobs_on(cluster, "alice", "n2"), cluster.submit("alice", ["n2"])]
    log = cluster.broker_log("n2")
    mark = log.mark()
    newest = cluster.ssh("login", "n2", "cat /proc/self/cgroup", user="alice", check=True)
    assert job_of(newest.stdout) == jobs[-1]
    # The login host runs no slurmd: nothing is sent there, action_unknown decides at once.
    decision = log.wait_for(f"outcome=adopt job={jobs[-1]}", mark=mark).splitlines()
    assert "source is not a Slurm node" in next(
        line for line in decision if f"outcome=adopt job={jobs[-1]}" in line)
    broker_policy("n2", policy={"action_unknown": "deny"})
    mark = log.mark()
    denied = cluster.ssh("login", "n2", "true", user="alice")
    assert denied.returncode == 255
    # Decided after authentication (the source is asked only then): the wrapper says why.
    assert "unable to determine source job" in denied.stderr
    assert "action_unknown=deny" in log.wait_for("outcome=deny", mark=mark)


def test_from_a_compute_node_outside_any_job_is_indeterminate(cluster: Cluster) -> None:
    jobs = two_jobs_on(cluster, "alice", "n2")
    log = cluster.broker_log("n2")
    mark = log.mark()
    result = cluster.ssh("n1", "n2", "cat /proc/self/cgroup", user="alice", check=True)
    assert job_of(result.stdout) == jobs[-1]
    assert "job indeterminate via native" in log.wait_for("user=alice", mark=mark)


def _timed_login(cluster: Cluster) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = cluster.ssh("n1", "n2", "cat /proc/self/cgroup", user="alice", timeout=60)
    return time.monotonic() - started, result


@contextlib.contextmanager
def _firewall(cluster: Cluster, node: str, target: str) -> Iterator[None]:
    rule = ["INPUT", "-p", "tcp", "--dport", "6818", "-j", target]
    if target == "REJECT":
        rule += ["--reject-with", "tcp-reset"]
    cluster.exec(node, "iptables", "-I", *rule)
    try:
        yield
    finally:
        cluster.exec(node, "iptables", "-D", *rule, check=False)


def _slurmd_pid(cluster: Cluster, host: str) -> int:
    node = cluster.node(host)
    out = subprocess.run(["pgrep", "-f", f"slurmd -D -N {node}$"], capture_output=True,
                         text=True).stdout.split()
    assert out, f"slurmd of {node} not found"
    return int(out[0])


def test_a_silent_or_hung_source_costs_at_most_the_deadline(cluster: Cluster) -> None:
    jobs = two_jobs_on(cluster, "alice", "n2")
    baseline, first = _timed_login(cluster)
    assert job_of(first.stdout) == jobs[-1]
    log = cluster.broker_log("n2")

    with _firewall(cluster, "n1", "REJECT"):
        mark = log.mark()
        rejected, result = _timed_login(cluster)
    assert job_of(result.stdout) == jobs[-1]
    assert "source unreachable" in log.wait_for("user=alice", mark=mark)
    assert rejected < baseline + 0.5, (rejected, baseline)

    with _firewall(cluster, "n1", "DROP"):
        mark = log.mark()
        dropped, result = _timed_login(cluster)
    assert job_of(result.stdout) == jobs[-1]
    assert "source unreachable" in log.wait_for("user=alice", mark=mark)
    assert dropped < baseline + DEADLINE + 0.5, (dropped, baseline)

    slurmd = _slurmd_pid(cluster, "n1")
    os.kill(slurmd, signal.SIGSTOP)
    try:
        mark = log.mark()
        frozen, result = _timed_login(cluster)
    finally:
        os.kill(slurmd, signal.SIGCONT)
    assert job_of(result.stdout) == jobs[-1]
    assert "source unreachable" in log.wait_for("user=alice", mark=mark)
    assert frozen < baseline + DEADLINE + 0.5, (frozen, baseline)


def test_over_ipv6_the_fall_through_is_clean(cluster: Cluster) -> None:
    """slurmd listens on IPv4 only (no CommunicationParameters=EnableIPv6), so an IPv6
    source is no slurmd's address: nothing is sent and action_unknown decides at once.
    """
    jobs = two_jobs_on(cluster, "alice", "n2")
    log = cluster.broker_log("n2")
    mark = log.mark()
    batch = cluster.run_in_batch("alice", ["n1", "n2"], "ssh n2-v6 cat /proc/self/cgroup")
    assert batch.returncode == 0, batch.output
    line = log.wait_for("user=alice", mark=mark)
    assert "fd5a:" in line  # the client's IPv6 ULA address
    assert "source is not a Slurm node" in line
    # The spanning job started last on n2, so "newest" picks it here; the log
    # line shows it was chosen by action_unknown, not by callerid.
    assert f"action_unknown=newest picked job {batch.job_id}" in line
    assert job_of(batch.output) == batch.job_id
    assert batch.job_id not in jobs


def test_users_never_land_in_each_others_jobs(cluster: Cluster) -> None:
    for user in ("alice", "bob"):
        cluster.submit(user, ["n2"])
    results = {user: cluster.run_in_batch(user, ["n1", "n2"], "ssh n2 cat /proc/self/cgroup")
               for user in ("alice", "bob")}
    for user, batch in results.items():
        found = remote_cgroup_job(batch.output)
        assert found is not None, batch.output
        assert found.job == batch.job_id
        assert found.uid == cluster.uid(user)


def test_sixty_four_simultaneous_logins_from_one_job_all_land_in_it(cluster: Cluster) -> None:
    two_jobs_on(cluster, "alice", "n2")
    pid = cluster.broker_pid("n2")
    command = (
        "for i in $(seq 64); do ssh n2 cat /proc/self/cgroup > $HOME/.lab/fan.$i 2>&1 & done; "
        "wait; for f in $HOME/.lab/fan.*; do cat $f; echo =====; done; rm -f $HOME/.lab/fan.*"
    )
    started = time.monotonic()
    batch = cluster.run_in_batch("alice", ["n1", "n2"], command, extra_args=["--mem=1500"],
                                 timeout=120)
    elapsed = time.monotonic() - started
    landed = [text for text in batch.output.split("=====\n") if text.strip()]
    jobs = [job_of(text) for text in landed]
    assert len(jobs) == 64, batch.output[-2000:]
    assert set(jobs) == {batch.job_id}
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    hwm_kb = int(next(line.split()[1] for line in status if line.startswith("VmHWM")))
    print(f"64 logins in {elapsed:.1f}s (incl. job start); broker peak RSS {hwm_kb} kB")
    assert hwm_kb < 200_000
