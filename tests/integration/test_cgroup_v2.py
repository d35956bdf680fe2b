"""Several slurmds on one cgroup v2 hierarchy: each broker counts only its own node's jobs.

On the forky generation every node's slurmd makes ``system.slice/<NodeName>_slurmstepd.scope``
on the same (host's) cgroup2 hierarchy, as several slurmds of one machine do on a real
multi-slurmd node, and Slurm 26.05 names a job's directory by its SLUID, which is the same
on every node of the job. A process of a session on n1 that sits in n2's extern step of the
same job looks, path for path, like a process in the job, but n1's stepd neither limits nor
ends it. The broker must take it for what it is: outside n1's job, so the sweeper brings it
back. (cgroup v1 generations keep their jobs under ``/slurm_<NodeName>`` in every hierarchy;
the unit tests in tests/unit/test_cgroups.py cover both layouts' anchors.)
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import Cluster, wait_until


@pytest.fixture(autouse=True)
def _v2_only(cluster: Cluster) -> None:
    if cluster.gen.cgroup != "v2":
        pytest.skip("a cgroup v2 generation only (forky): its nodes share one v2 hierarchy")


def _unified(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line for line in lines if line.startswith("0::"))


@contextlib.contextmanager
def _session(cluster: Cluster, host: str, command: str) -> Iterator[int]:
    """A long ssh session of alice into ``host``; yields the pid of its ``command``."""
    client = cluster.spawn("login", "ssh", host, command, user="alice")
    try:
        found: list[int] = []

        def started() -> bool:
            out = subprocess.run(["pgrep", "-u", "alice", "-fx", command], capture_output=True,
                                 text=True, check=False).stdout.split()
            found[:] = [int(p) for p in out if psutil.Process(int(p)).name() != "ssh"]
            return bool(found)

        wait_until(started, 15, f"alice's {command!r} on {host}")
        yield found[0]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)


def test_a_session_process_moved_into_another_nodes_step_is_brought_back(
        cluster: Cluster) -> None:
    uid = cluster.uid("alice")
    job = cluster.submit("alice", ["n1", "n2"])
    here, there = cluster.node("n1"), cluster.node("n2")
    # The same job directory (its SLUID) under both nodes' scopes.
    assert cluster.job_cgroup_name("n1", job) == cluster.job_cgroup_name("n2", job)
    name = cluster.job_cgroup_name("n1", job)
    log = cluster.broker_log("n1")
    with _session(cluster, "n1", "sleep 171") as pid:
        wait_until(lambda: f"/{here}_slurmstepd.scope/{name}/step_extern/" in _unified(pid), 10,
                   f"the session in job {job} on {here}")
        mark = log.mark()
        # (nothing was adopted on n2, so its extern step has no task cgroup yet: its ``user``)
        other = cluster.job_cgroup_dir("n2", uid, job) / "user"
        (other / "cgroup.procs").write_text(f"{pid}\n")
        assert f"/{there}_slurmstepd.scope/{name}/step_extern/" in _unified(pid)
        # n1's sweeper: the process is outside n1's job, whatever its path looks like.
        wait_until(lambda: f"/{here}_slurmstepd.scope/{name}/step_extern/" in _unified(pid),
                   15, f"the sweeper to bring pid {pid} back into {here}'s job {job}")
        text = log.since(mark)
        assert re.search(rf"sweeper: user=alice .*outside job {job} of its connection", text), text
