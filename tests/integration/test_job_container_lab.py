"""The lab with Slurm's tmpfs job container: a private /tmp (and /dev/shm) per job.

``scripts/cluster job-container on`` (scripts/_cluster/jobcontainer.py) gives slurm.conf
``JobContainerType=job_container/tmpfs`` (22.05, 24.11) or ``NamespaceType=namespace/tmpfs``
(26.05) and job_container.conf with ``BasePath=<lab state dir>/job-container`` (Debian's
slurmd appends ``/<NodeName>``); ``off`` takes them away. The module turns the container on
for its tests and off again afterwards (the ``job_container`` fixture of conftest.py).

What the tests pin down, per generation:

* a job's /tmp is its own: what its batch step writes there, a step of the job
  (``srun --overlap``) reads, and the node's /tmp has not got it;
* the job's mount namespace is held by ``<base>/<NodeName>/<job>/.ns`` in the node's mount
  namespace (below the generation's root on a chroot generation, where slurmd runs), and
  inside it the job's private /tmp is mounted at ``<root>/tmp``: a process that enters the
  namespace (setns) has its root reset to the namespace's root, the host's "/", so on a
  chroot generation it must chroot back to the generation's root to see the job's /tmp;
* the job's tasks run in the job's private /tmp. Not on a chroot generation (trixie, forky):
  Slurm's tasks setns() into the job's namespace and so land outside the generation's root,
  on the host's userland and the host's /tmp (strict xfail: a lab artifact, no real node
  chroots its slurmd).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.harness import Cluster, wait_until

MARKER = "/tmp/marker"
_CHROOT_TASKS = ("on a chroot generation Slurm's tasks setns() into the job's mount namespace, "
                 "which resets their root to the host's '/': they run on the host's userland "
                 "and /tmp, not the job's (mounted at <generation root>/tmp)")


def _job_writing_marker(cluster: Cluster) -> tuple[int, str]:
    """A job of alice on n1 whose batch step wrote a fresh token into /tmp/marker and
    sleeps; returns (job, token) once a step of the job reads the token there."""
    token = uuid.uuid4().hex
    job = cluster.submit("alice", ["n1"], f"echo {token} >{MARKER} && exec sleep 600")

    def written() -> bool:
        return _in_job(cluster, job, "cat", MARKER).stdout.strip() == token

    wait_until(written, 30, f"job {job}'s batch step to write {MARKER}", interval=0.5)
    return job, token


def _in_job(cluster: Cluster, job: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    """``cmd`` as a step of ``job`` on n1, beside its batch step (srun --overlap)."""
    return cluster.exec("login", "srun", f"--jobid={job}", "--overlap", "-N1",
                        f"--nodelist={cluster.node('n1')}", *cmd, user="alice", check=False)


def _forget_leaked_marker(token: str) -> None:
    """A chroot generation's job writes its /tmp/marker into the host's /tmp (see
    _CHROOT_TASKS): remove it, ours only."""
    marker = Path(MARKER)
    try:
        if marker.read_text().strip() == token:
            marker.unlink()
    except OSError:
        pass


def test_slurm_runs_the_tmpfs_plugin(job_container: Cluster) -> None:
    config = job_container.slurm("scontrol", "show", "config")
    assert re.search(r"^(JobContainerType|NamespaceType)\s*=\s*(job_container|namespace)/tmpfs",
                     config, re.M), config


def test_a_jobs_tmp_marker_is_seen_by_the_job_and_not_on_the_node(
        job_container: Cluster) -> None:
    cluster = job_container
    job, token = _job_writing_marker(cluster)
    try:
        assert _in_job(cluster, job, "cat", MARKER).stdout.strip() == token
        on_node = cluster.exec("n1", "cat", MARKER, check=False)
        assert token not in on_node.stdout, (on_node.stdout, on_node.stderr)
    finally:
        cluster.cancel(job)
        _forget_leaked_marker(token)


def test_the_jobs_namespace_holds_its_private_tmp_below_the_generation_root(
        job_container: Cluster) -> None:
    """``<root><base>/<NodeName>/<job>/.ns`` in the node's mount namespace holds the job's
    namespace; a process entering it (nsenter: setns) finds the job's private /tmp (owned by
    alice, mode 0700, bound from the job's directory under the base path) at ``<root>/tmp``,
    its own root being the host's "/"."""
    cluster = job_container
    job, token = _job_writing_marker(cluster)
    try:
        root = str(cluster.gen.root or "")
        job_dir = cluster.var / "job-container" / cluster.node("n1") / str(job)
        probe = (f"readlink /proc/self/root; stat -c '%U %a' {root}/tmp; "
                 f"grep ' {root}/tmp ' /proc/self/mountinfo")
        entered = subprocess.run(
            ["nsenter", f"--mount={cluster.nsdir / 'n1.mnt'}", "--", "nsenter",
             f"--mount={root}{job_dir}/.ns", "--", "sh", "-c", probe],
            capture_output=True, text=True, timeout=30, check=False)
        assert entered.returncode == 0, entered.stderr
        own_root, owner, mount = entered.stdout.splitlines()[:3]
        assert own_root == "/"
        assert owner == "alice 700"
        assert f"{job_dir}/.{job}" in mount.split()[3], mount
    finally:
        cluster.cancel(job)
        _forget_leaked_marker(token)


def test_the_jobs_tasks_run_in_its_private_tmp(job_container: Cluster,
                                               request: pytest.FixtureRequest) -> None:
    cluster = job_container
    if cluster.gen.root is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_CHROOT_TASKS))
    job, token = _job_writing_marker(cluster)
    try:
        seen = _in_job(cluster, job, "sh", "-c", "stat -c '%U %a' /tmp; "
                       "grep ' /tmp ' /proc/self/mountinfo")
        owner, _, mount = seen.stdout.partition("\n")
        assert owner == "alice 700", seen.stdout
        job_dir = cluster.var / "job-container" / cluster.node("n1") / str(job)
        assert f"{job_dir}/.{job}" in mount, mount
        assert not Path(MARKER).exists() or token not in Path(MARKER).read_text()
    finally:
        cluster.cancel(job)
        _forget_leaked_marker(token)
