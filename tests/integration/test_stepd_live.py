"""The stepd client, slurm.conf reader and local job scan against real Slurm 22.05.

Runs as root on the host: the lab's spool dirs are plain host directories and
every lab host shares the host's /proc, so the host sees the real stepds. The
slurm.conf exists only in the lab mount namespaces, hence ``load_slurm_facts``
runs inside n1. ADD_EXTERN_PID is only tried on a ``sleep`` we start ourselves
as the job's owner, never on anyone else's process.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import psutil
import pytest

from sshd_adopt._internal.slurm.localjobs import all_extern_steps, user_jobs
from sshd_adopt._internal.slurm.stepd import (
    EXTERN_STEP,
    NEWEST_PROTOCOL,
    PROTOCOL_VERSIONS,
    StepdConnection,
    list_extern_steps,
)
from tests.harness import Cluster, remote_cgroup_job, wait_until

pytestmark = pytest.mark.cluster

TIMEOUT = 3.0
FACTS_SCRIPT = """
import dataclasses, json
from sshd_adopt._internal.slurm.facts import load_slurm_facts
facts = dataclasses.asdict(load_slurm_facts())
facts["prolog_flags"] = sorted(facts["prolog_flags"])
facts["comm_params"] = sorted(facts["comm_params"])
facts["slurmds"] = {str(address): port for address, port in facts["slurmds"].items()}
print(json.dumps(facts))
"""


def test_load_slurm_facts_on_n1(cluster: Cluster) -> None:
    out = cluster.exec(
        "n1", "env", "PYTHONPATH=/work/main", sys.executable, "-c", FACTS_SCRIPT
    ).stdout
    facts = json.loads(out)
    assert facts["nodename"] == "n1"
    assert facts["node_addr"] == "10.213.0.11"
    assert facts["spool_dir"] == str(cluster.spool("n1"))
    assert facts["cluster_name"] == "lab"
    assert facts["slurmd_port"] == 6818
    assert facts["slurm_user"] == "slurm"
    assert facts["prolog_flags"] == ["contain", "x11"]
    assert facts["version"].startswith("22.05.")
    assert facts["protocol_version"] == PROTOCOL_VERSIONS["22.05"]
    # Where a callerid request may go: the three compute nodes' slurmds, nothing else.
    assert facts["slurmds"] == {f"10.213.0.{n}": 6818 for n in (11, 12, 13)}
    assert facts["slurmd_user_uid"] == 0
    assert facts["comm_params"] == ["block_zero_hash"]


def test_stepd_client_against_a_real_extern_step(cluster: Cluster) -> None:
    alice = cluster.uid("alice")
    job = cluster.submit("alice", ["n1"], "sleep 300")
    try:
        spool = str(cluster.spool("n1"))
        path = str(cluster.stepd_socket("n1", job))
        assert path in {s.path for s in list_extern_steps(spool, "n1")}

        with StepdConnection.open(path, timeout=TIMEOUT) as stepd:
            # We send 26.05's version; a 22.05 stepd accepts it and answers its own.
            assert PROTOCOL_VERSIONS["22.05"] < NEWEST_PROTOCOL
            assert stepd.protocol_version == PROTOCOL_VERSIONS["22.05"]
            assert stepd.step_uid() == alice
            daemon = psutil.Process(stepd.daemon_pid())
            assert daemon.cmdline()[:2] == ["slurmstepd:", f"[{job}.extern]"]
            assert stepd.x11_display() == (0, None)
            # STARTING (1) or RUNNING (2) in 22.05's numbering: right after the job
            # starts the extern step may still be setting up.
            assert stepd.state() in (1, 2)
            assert stepd.step_uid() == alice  # connection still in sync

        jobs = user_jobs(spool, "n1", alice, timeout=TIMEOUT)
        mine = [j for j in jobs if j.job_id == job]
        assert len(mine) == 1
        assert mine[0].started == pytest.approx(daemon.create_time())
        assert abs(mine[0].started - time.time()) < 300
        assert not [j for j in user_jobs(spool, "n1", cluster.uid("bob"), timeout=TIMEOUT)
                    if j.job_id == job]
        assert (job, alice) in all_extern_steps(spool, "n1", timeout=TIMEOUT)
    finally:
        cluster.cancel(job)


def test_add_extern_pid_moves_our_own_sleep(cluster: Cluster) -> None:
    alice = cluster.uid("alice")
    job = cluster.submit("alice", ["n1"], "sleep 300")
    sleeper = cluster.spawn("n1", "sleep", "120", user="alice")
    try:
        # ``spawn`` runs nsenter/setpriv, which exec into sleep: same pid.
        wait_until(lambda: psutil.Process(sleeper.pid).name() == "sleep", 10, "sleep to start")
        assert psutil.Process(sleeper.pid).uids().real == alice
        assert remote_cgroup_job(cluster.cgroup_of("n1", sleeper.pid)) is None

        with StepdConnection.open(str(cluster.stepd_socket("n1", job)), timeout=TIMEOUT) as s:
            assert s.step_uid() == alice
            s.add_extern_pid(sleeper.pid)

        procs = (cluster.job_cgroup_dir("n1", alice, job) / "cgroup.procs").read_text().split()
        assert str(sleeper.pid) in procs
        where = remote_cgroup_job(cluster.cgroup_of("n1", sleeper.pid))
        assert where is not None
        assert (where.job, where.step) == (job, "extern")
        assert (sleeper.pid, "extern") in cluster.listpids("n1", job)
    finally:
        sleeper.kill()
        sleeper.wait(10)
        cluster.cancel(job)


def test_stale_extern_socket_names_are_not_jobs(cluster: Cluster) -> None:
    """A socket file nobody listens on (a crashed stepd's) is skipped and reported."""
    spool = cluster.spool("n1")
    stale = spool / f"n1_999999.{EXTERN_STEP}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    problems: list[str] = []
    try:
        jobs = user_jobs(str(spool), "n1", cluster.uid("alice"), timeout=TIMEOUT,
                         on_problem=lambda p: problems.append(str(p)))
        assert 999999 not in {j.job_id for j in jobs}
        assert any("job 999999" in p and "refused" in p for p in problems)
    finally:
        stale.unlink()
