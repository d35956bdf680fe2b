"""Issue #3 end to end: the broker and the ForceCommand wrapper on the real cluster.

Every test logs in through the port-22 sshd of a lab node (UsePAM no, the
shipped drop-in, the node's own sshd-adoptd) and asserts what a user or admin
would look at: what the client printed, its exit status, which cgroup the
remote process is in, what `scontrol listpids` shows, whether the session dies
with the job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sshd_adopt._internal.core import accounts
from tests.harness import VENV, Cluster, process_running, remote_cgroup_job, wait_until

DENIED = "Permission denied (publickey)"
NO_JOBS = "Access denied by sshd-adopt: you have no active jobs on this node"
UNKNOWN = "Access denied by sshd-adopt: unable to determine source job"
WRAPPER = str(VENV / "bin" / "sshd-adopt")


def cgroup_job(text: str) -> int | None:
    found = remote_cgroup_job(text)
    return found.job if found is not None else None


def test_user_without_job_is_told_why_and_nothing_of_theirs_runs(cluster: Cluster) -> None:
    """bob (bash), no job here: refused with the message, his command never runs."""
    log = cluster.broker_log("n1")
    mark = log.mark()
    result = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="bob")
    assert result.returncode == 255
    assert NO_JOBS in result.stderr
    assert "SHOULD-NOT-RUN" not in result.stdout
    line = log.wait_for("gate: user=bob", mark=mark)
    assert "outcome=restricted-keys" in line
    assert "user has no jobs on this node" in line


def test_on_deny_refuse_refuses_at_authentication(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    """admission.on_deny=refuse: no key at all, refused before any session exists."""
    broker_policy("n1", admission={"on_deny": "refuse"})
    log = cluster.broker_log("n1")
    mark = log.mark()
    result = cluster.ssh("login", "n1", "echo SHOULD-NOT-RUN", user="bob")
    assert result.returncode == 255
    assert DENIED in result.stderr
    assert "SHOULD-NOT-RUN" not in result.stdout
    assert "outcome=refuse" in log.wait_for("gate: user=bob", mark=mark)


def test_one_job_session_lands_in_the_extern_step(cluster: Cluster) -> None:
    job = cluster.submit("alice", ["n1"])
    result = cluster.ssh("login", "n1", 'cat /proc/self/cgroup; echo "JOB=$SLURM_JOB_ID"',
                         user="alice", check=True)
    found = remote_cgroup_job(result.stdout)
    assert found is not None, result.stdout
    assert (found.job, found.step) == (job, "extern")
    assert f"JOB={job}" in result.stdout


def _remote_leaf(user: str, marker: str) -> int | None:
    """The remote process of ``user`` whose command line has ``marker`` (not the client)."""
    out = subprocess.run(["pgrep", "-u", user, "-f", marker], capture_output=True,
                         text=True).stdout.split()
    for pid in map(int, out):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmd and cmd[0] not in (b"ssh", b"nsenter", b"setpriv"):
            return pid
    return None


def _session_pids(user: str, marker: str) -> dict[int, str]:
    """pid -> cmdline of the chain from a session's process up to its sshd monitor."""
    leaf = _remote_leaf(user, marker)
    assert leaf is not None, f"no process with {marker!r}"
    pids: dict[int, str] = {}
    pid = leaf
    while pid > 1:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        pids[pid] = cmd
        if re.match(rf"sshd(-session)?: {user} \[(?:priv|postauth)\]", cmd):
            break
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pids


def test_listpids_shows_the_sshd_processes_and_scancel_ends_the_session(
    cluster: Cluster,
) -> None:
    job = cluster.submit("alice", ["n1"])
    client = cluster.spawn("login", "ssh", "-o", "LogLevel=INFO", "n1",
                           "sleep 313; echo NOTKILLED", user="alice")
    try:
        wait_until(lambda: _remote_leaf("alice", "^sleep 313") is not None, 15, "remote sleep")
        session = _session_pids("alice", "^sleep 313")
        listed = {pid for pid, step in cluster.listpids("n1", job) if step == "extern"}
        monitor = [pid for pid, cmd in session.items()
                   if re.match(r"sshd(-session)?: alice \[(?:priv|postauth)\]", cmd)]
        notty = [pid for pid, cmd in session.items() if re.match(r"sshd(-session)?: alice@", cmd)]
        assert monitor and notty, session
        assert set(session) <= listed, (session, listed)
        cluster.cancel(job)
        stdout, stderr = client.communicate(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 255
    assert "NOTKILLED" not in stdout
    assert "closed by remote host" in stderr
    wait_until(lambda: not any(process_running(pid) for pid in session), 10, "session pids to die")



@pytest.mark.parametrize("user", ["root", "carol"])
def test_root_and_exempt_admin_get_in_unadopted(cluster: Cluster, user: str) -> None:
    cluster.submit("alice", ["n1"])  # a job on the node changes nothing for them
    result = cluster.ssh("login", "n1", "cat /proc/self/cgroup", user=user, check=True)
    assert cgroup_job(result.stdout) is None
    assert "slurm_" not in result.stdout


def test_root_and_exempt_get_in_when_slurm_conf_is_broken(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    broker_policy("n3", slurm={"conf_path": "/nonexistent/slurm.conf"})
    cluster.submit("alice", ["n3"])
    for user in ("root", "carol"):
        result = cluster.ssh("login", "n3", "true", user=user)
        assert result.returncode == 0, result.stderr
    # A managed user meets action_generic_failure (ignore -> fallthrough=deny), and is
    # told why (the key entries need the node's jobs, so the command gate decides).
    log = cluster.broker_log("n3")
    mark = log.mark()
    alice = cluster.ssh("login", "n3", "echo SHOULD-NOT-RUN", user="alice")
    assert alice.returncode == 255
    assert "this host is not a Slurm compute node" in alice.stderr
    assert "SHOULD-NOT-RUN" not in alice.stdout
    decision = log.wait_for("NodeName is unknown", mark=mark).splitlines()
    assert "alice" in next(line for line in decision if "NodeName is unknown" in line)


def test_interactive_login_gets_a_login_shell(cluster: Cluster) -> None:
    cluster.submit("alice", ["n1"])
    result = cluster.exec(
        "login", "ssh", "-tt", "n1", user="alice", timeout=30, check=False,
        input='echo "ARGV0=$0 JOB=$SLURM_JOB_ID"; exit 0\n')
    assert re.search(r"ARGV0=-bash JOB=\d+", result.stdout), result.stdout


def test_exit_status_and_quoting_survive(cluster: Cluster) -> None:
    cluster.submit("alice", ["n1"])
    assert cluster.ssh("login", "n1", "exit 7", user="alice").returncode == 7
    quoted = cluster.ssh("login", "n1", 'printf "%s\\n" "a b" c', user="alice", check=True)
    assert quoted.stdout == "a b\nc\n"


def test_file_transfers_work_and_run_inside_the_job(cluster: Cluster) -> None:
    job = cluster.submit("alice", ["n1"])
    home = cluster.home("alice")
    src = home / "xfer-src.txt"
    src.write_text("payload\n" * 1000)
    for name in ("xfer-sftp.txt", "xfer-scp.txt", "xfer-scpO.txt", "xfer-rsync.txt"):
        (home / name).unlink(missing_ok=True)
    try:
        batch = f"put {src} xfer-sftp.txt\nget xfer-sftp.txt /tmp/xfer-sftp-back.txt\n"
        sftp = cluster.exec("login", "sftp", "-b", "-", "n1", user="alice", input=batch,
                            check=False)
        assert sftp.returncode == 0, sftp.stderr
        scp = cluster.exec("login", "scp", str(src), "n1:xfer-scp.txt", user="alice",
                           check=False)
        assert scp.returncode == 0, scp.stderr
        scp_o = cluster.exec("login", "scp", "-O", "n1:xfer-src.txt",
                             f"{home}/xfer-scpO.txt", user="alice", check=False)
        assert scp_o.returncode == 0, scp_o.stderr
        rsync = cluster.exec("login", "rsync", "-a", str(src), "n1:xfer-rsync.txt",
                             user="alice", check=False)
        assert rsync.returncode == 0, rsync.stderr
        for name in ("xfer-sftp.txt", "xfer-scp.txt", "xfer-scpO.txt", "xfer-rsync.txt"):
            assert (home / name).read_text() == src.read_text(), name
        # The transfer programs themselves run in the job: hold an sftp session
        # open and look at its sftp-server.
        client = subprocess.Popen(cluster.command("login", "sftp", "n1", user="alice"),
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            def server_pid() -> int | None:
                out = subprocess.run(["pgrep", "-u", "alice", "-f", "sftp-server"],
                                     capture_output=True, text=True).stdout.split()
                return int(out[0]) if out else None
            wait_until(lambda: server_pid() is not None, 15, "sftp-server")
            pid = server_pid()
            assert pid is not None
            assert cgroup_job(cluster.cgroup_of("n1", pid)) == job
        finally:
            client.kill()
            client.wait()
    finally:
        for name in ("xfer-src.txt", "xfer-sftp.txt", "xfer-scp.txt", "xfer-scpO.txt",
                     "xfer-rsync.txt"):
            (home / name).unlink(missing_ok=True)


def _three_jobs(cluster: Cluster) -> list[int]:
    jobs = []
    for _ in range(3):
        jobs.append(cluster.submit("alice", ["n1"]))
        time.sleep(1.1)  # distinct start times, so "newest" is unambiguous
    return jobs


def test_several_jobs_newest_adopts_the_job_started_last(cluster: Cluster) -> None:
    jobs = _three_jobs(cluster)
    result = cluster.ssh("login", "n1", "cat /proc/self/cgroup", user="alice", check=True)
    assert cgroup_job(result.stdout) == jobs[-1]


def test_several_jobs_allow_lets_in_unadopted(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    broker_policy("n1", policy={"action_unknown": "allow"})
    _three_jobs(cluster)
    result = cluster.ssh("login", "n1", "cat /proc/self/cgroup", user="alice", check=True)
    assert cgroup_job(result.stdout) is None


def test_several_jobs_deny_refuses_with_the_message(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    broker_policy("n1", policy={"action_unknown": "deny"})
    _three_jobs(cluster)
    log = cluster.broker_log("n1")
    mark = log.mark()
    result = cluster.ssh("login", "n1", "echo IN", user="alice")
    # A per-connection refusal needs the source job, which is asked only after sshd has
    # authenticated the connection: the wrapper refuses, with the message, before the command.
    assert result.returncode == 255
    assert "Access denied by sshd-adopt: unable to determine source job" in result.stderr
    assert "IN" not in result.stdout
    decision = log.wait_for("outcome=deny", mark=mark)
    assert "source is not a Slurm node" in decision and "action_unknown=deny" in decision


def test_broker_down_follows_action_generic_failure(
    cluster: Cluster, broker_restart: None
) -> None:
    del broker_restart
    cluster.submit("alice", ["n2"])
    pid = cluster.broker_pid("n2")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not cluster.broker_socket("n2").exists(), 10, "broker to stop")
    result = cluster.ssh("login", "n2", "echo IN", user="alice")
    assert result.returncode == 255
    # The broker wiped the key entries when it stopped, and the command gate asks the
    # same broker: with it gone, managed users are refused before a session exists
    # (fail closed), root is not.
    assert DENIED in result.stderr
    assert "IN" not in result.stdout
    root = cluster.ssh("login", "n2", "echo IN", user="root")
    assert root.returncode == 0


def test_broken_config_is_named_by_check_and_refused_at_start(cluster: Cluster) -> None:
    del cluster
    path = "/tmp/sshd-adopt-bad.toml"
    with open(path, "w") as handle:
        handle.write('[policy]\naction_unknown = "newset"\n')
    try:
        check = subprocess.run([str(VENV / "bin" / "sshd-adoptd"), "--check", "--config", path],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 2
        assert path in check.stderr
        assert "policy.action_unknown" in check.stderr
        assert "newest" in check.stderr  # the allowed values are listed
        run = subprocess.run([str(VENV / "bin" / "sshd-adoptd"), "--foreground", "--config",
                              path], capture_output=True, text=True, timeout=30)
        assert run.returncode == 2
        assert "policy.action_unknown" in run.stderr
    finally:
        os.unlink(path)


def test_a_process_that_is_not_an_ssh_session_is_refused(cluster: Cluster) -> None:
    cluster.submit("alice", ["n1"])
    log = cluster.broker_log("n1")
    mark = log.mark()
    direct = cluster.exec("n1", WRAPPER, "--timeout=5", user="alice", check=False)
    assert direct.returncode == 255
    assert "not an ssh session" in direct.stderr
    log.wait_for("not an ssh session", mark=mark)
    # A forged "sshd": a copy of bash named sshd in alice's home, running the
    # wrapper as its child. Its executable is not the system sshd.
    fake = cluster.home("alice") / "fakebin"
    cluster.exec("n1", "sh", "-c", f"mkdir -p {fake} && cp /bin/bash {fake}/sshd", user="alice")
    forged = cluster.exec("n1", f"{fake}/sshd", "-c", f"exec -a 'sshd: alice@notty' "
                          f"{fake}/sshd -c '{WRAPPER} --timeout=5; exit $?'",
                          user="alice", check=False)
    assert forged.returncode == 255, forged.stdout + forged.stderr
    assert "not an ssh session" in forged.stderr
    cluster.exec("n1", "rm", "-rf", str(fake))


def test_overrides_from_the_user_can_only_tighten_the_policy(cluster: Cluster) -> None:
    """alice runs the wrapper again from inside her session with forged options."""
    _three_jobs(cluster)
    log = cluster.broker_log("n1")
    mark = log.mark()
    looser = cluster.ssh("login", "n1", f"SSH_ORIGINAL_COMMAND=true {WRAPPER} "
                         "action_unknown=allow --timeout=5", user="alice")
    assert looser.returncode == 0, looser.stderr
    assert "override rejected" in log.wait_for("override rejected", mark=mark)
    stricter = cluster.ssh("login", "n1", f"SSH_ORIGINAL_COMMAND=true {WRAPPER} "
                           "action_unknown=deny --timeout=5", user="alice")
    assert stricter.returncode == 255
    assert UNKNOWN in stricter.stderr


def test_a_session_gets_a_job_tasks_oom_score_not_sshds(cluster: Cluster) -> None:
    """Sites run sshd at oom_score_adj -1000 (the lab: 500, the host lacks
    CAP_SYS_RESOURCE): a session keeping it would be the one process of the job its OOM
    killer cannot choose. sshd-adopt gives the session a job task's 0, the shell and
    the command included; pam_slurm_adopt leaves sshd's value (a documented difference)."""
    cluster.submit("alice", ["n1"])
    sshd = Path(f"/proc/{cluster.daemon_pid('sshd-n1-22')}/oom_score_adj").read_text().strip()
    assert sshd != "0"  # else this test could not fail
    command = "cat /proc/self/oom_score_adj /proc/$PPID/oom_score_adj"
    ours = cluster.ssh("login", "n1", command, user="alice", check=True)
    assert ours.stdout.split() == ["0", "0"], ours.stdout
    pam = cluster.ssh("login", "n1", command, user="alice", port=2222, check=True)
    assert pam.stdout.split() == [sshd, sshd], pam.stdout


def test_an_exempt_group_that_appears_later_exempts_its_members_without_a_reload(
        cluster: Cluster, broker_policy: Callable[..., None]) -> None:
    """[exempt] names a group the directory does not have yet (a directory service that
    comes up after the broker): once it appears with bob in it, bob is exempt -- no
    reload, no restart. Group lookups are cached briefly, a missing name more briefly."""
    broker_policy("n1", exempt={"groups": ["clusteradm", "latecomers"]})
    before = cluster.ssh("login", "n1", "true", user="bob")
    assert before.returncode == 255, before.stderr  # managed, no job: refused

    def userlands(*argv: str) -> None:
        """The host's user database, and the generation's own when it has one."""
        subprocess.run(argv, capture_output=True, check=True)
        if cluster.gen.root is not None:
            subprocess.run(["chroot", str(cluster.gen.root), *argv], capture_output=True,
                           check=True)

    userlands("groupadd", "-g", "2199", "latecomers")
    try:
        userlands("gpasswd", "-a", "bob", "latecomers")
        # bob's groups were looked up (and cached, accounts.TTL) when he was refused.
        wait_until(lambda: cluster.ssh("login", "n1", "true", user="bob").returncode == 0,
                   accounts.TTL + 10, "bob to be exempt once the group exists", interval=1)
        inside = cluster.ssh("login", "n1", "cat /proc/self/cgroup", user="bob", check=True)
        assert remote_cgroup_job(inside.stdout) is None  # exempt: in no job
    finally:
        subprocess.run(["groupdel", "latecomers"], capture_output=True, check=False)
        if cluster.gen.root is not None:
            subprocess.run(["chroot", str(cluster.gen.root), "groupdel", "latecomers"],
                           capture_output=True, check=False)
