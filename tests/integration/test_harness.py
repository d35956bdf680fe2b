"""Done-when of issue #2: the lab harness gives real Slurm + real pam_slurm_adopt behaviour."""

from __future__ import annotations

import subprocess

from tests.harness import COMPUTE, Cluster, remote_cgroup_job, wait_until

DENIAL = "Access denied by pam_slurm_adopt: you have no active jobs on this node"


def test_status_is_healthy_and_root_netns_untouched(cluster: Cluster) -> None:
    status = cluster.run_script("status")
    assert "DOWN" not in status.stdout
    root_addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True,
                                check=True).stdout
    assert "10.213.0." not in root_addrs
    assert "fd5a:213" not in root_addrs
    # Names resolve inside the lab only, and every node sees every other on v4 and v6.
    for target, port in (("n2", 22), ("n3-v6", 2222), ("n2-v6", 22), ("ctl", 6817)):
        probe = f"exec 3<>/dev/tcp/{target}/{port}; echo connected"
        assert cluster.exec("n1", "bash", "-c", probe, timeout=10).stdout == "connected\n"
    assert cluster.exec("n1", "getent", "hosts", "n3-v6").stdout.split()[0] == "fd5a:213::13"


def test_two_node_job_has_extern_steps_on_both_nodes(cluster: Cluster) -> None:
    uid = cluster.uid("alice")
    job = cluster.submit("alice", ["n1", "n2"])
    for node in ("n1", "n2"):
        sock = cluster.stepd_socket(node, job)
        assert sock.exists(), sock
        assert cluster.stepd_answers(sock)
        # slurmstepd listens on its socket before it builds the step's cgroups.
        cgroup = cluster.job_cgroup_dir(node, uid, job)
        wait_until(cgroup.is_dir, 10, f"{cgroup} created")
        steps = {step for _pid, step in cluster.listpids(node, job)}
        assert "extern" in steps, cluster.listpids(node, job)
    assert not cluster.stepd_socket("n3", job).exists()
    cluster.cancel(job)
    for node in ("n1", "n2"):
        assert not cluster.stepd_answers(cluster.stepd_socket(node, job))
    assert job not in cluster.jobs()


def test_ssh_from_batch_step_is_adopted_into_its_job_via_callerid(cluster: Cluster) -> None:
    """alice holds two other jobs on n2, so pam_slurm_adopt must ask n1's slurmd (callerid)."""
    uid = cluster.uid("alice")
    others = [cluster.submit("alice", ["n2"]) for _ in range(2)]
    pam = cluster.pam_log()
    mark = pam.mark()
    result = cluster.run_in_batch("alice", ["n1", "n2"],
                                  "cat /proc/self/cgroup; echo =====; "
                                  "ssh -p 2222 n2 cat /proc/self/cgroup", keep=True)
    assert result.returncode == 0, result.output
    local, _, remote = result.output.partition("=====\n")
    mine = remote_cgroup_job(local)
    assert mine is not None and mine.node == "n1" and mine.job == result.job_id, local
    assert mine.step == "batch"
    where = remote_cgroup_job(remote)
    assert where is not None, result.output
    assert (where.node, where.uid, where.job, where.step) == ("n2", uid, result.job_id,
                                                              "extern")
    assert where.job not in others
    log = pam.wait_for(f"adopted into job {result.job_id}", mark)
    assert "has 3 job" in log, log  # "jobs" (22.05, 24.11), "job(s)" (26.05)
    assert f"member of job {result.job_id}" in log, log


def test_user_without_job_is_denied_on_the_pam_sshd(cluster: Cluster) -> None:
    pam = cluster.pam_log()
    mark = pam.mark()
    for node in COMPUTE:
        proc = cluster.ssh("login", node, "true", user="bob", port=2222)
        assert proc.returncode == 255, (proc.stdout, proc.stderr)
        assert DENIAL in proc.stderr
        assert proc.stdout == ""
    assert DENIAL in pam.wait_for(DENIAL, mark)


def test_remote_cgroup_job_parser() -> None:
    text = (
        "6:freezer:/slurm_n2/uid_2001/job_3/step_extern\n"
        "4:memory:/slurm_n2/uid_2001/job_3/step_extern\n"
        "1:cpu:/\n0::/\n"
    )
    got = remote_cgroup_job(text)
    assert got is not None and (got.node, got.uid, got.job, got.step) == ("n2", 2001, 3,
                                                                          "extern")
    batch = remote_cgroup_job("4:memory:/slurm_n1/uid_7/job_12/step_batch/task_0\n")
    assert batch is not None and batch.step == "batch" and batch.job == 12
    assert remote_cgroup_job("4:memory:/process_api/abc\n") is None
