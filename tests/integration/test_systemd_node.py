"""The shipped unit under a real systemd, and sshd-adopt beside logind (issue #17).

The node s1 (forky: Slurm 26.05, OpenSSH 10.6, systemd as PID 1 of its own namespaces on
a cgroup2 tree of its own; scripts/_cluster/sysnode.py) runs slurmd, munged, sshd and
systemd-logind from their Debian units, with ``pam_systemd`` in sshd's PAM stack
(``UsePAM yes``). sshd-adopt is installed there by ``scripts/install`` and runs from the
installed unit, as an admin would have it. Port 2222 is the real pam_slurm_adopt with
pam_systemd beside it, the set-up Slurm's documentation tells sites to avoid.

One thing differs from a real node: the node has a pid namespace of its own, and the
kernel ignores proc connector subscriptions from there, so the broker runs without process
events (adoption by the wrapper, the sweeper's periodic scans). The connector's privileges
are proven by every other lab broker, which runs with the unit's bounding set
(test_systemd_unit.py).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import (
    UNIT,
    Cluster,
    capability_mask,
    unit_capabilities,
    user_pids,
    wait_until,
)

pytestmark = pytest.mark.cluster

HOST = "s1"
PARTITION = ["--partition=systemd"]
PREFIX = "/opt/sshd-adopt"  # scripts/install's default
RUNTIME = "/run/sshd-adopt"
NO_JOBS = "Access denied by sshd-adopt: you have no active jobs on this node"
#: After this long in a session, logind has done whatever it does with it.
SETTLE = 10


def show(node: Cluster, *props: str, unit: str = "sshd-adoptd") -> dict[str, str]:
    out = node.sysnode("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(node: Cluster, unit: str = "sshd-adoptd") -> str:
    return node.sysnode("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


def unified_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.startswith("0::")), "")


def exists_in_node(node: Cluster, path: str) -> bool:
    return node.sysnode("test", "-e", path, check=False).returncode == 0


def remote_pids(user: str, command: str) -> list[int]:
    """Host pids of ``user``'s processes running exactly ``command`` (not the ssh client)."""
    return user_pids(user, command, exact=True)


def in_job(node: Cluster, pid: int, job: int) -> bool:
    try:
        line = unified_line(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return False
    return f"/{node.job_cgroup_name(HOST, job)}/step_extern/" in line


# ------------------------------------------------------------------ the unit itself


def test_the_installed_unit_is_the_shipped_one_and_starts_through_notify(
        sysnode: Cluster) -> None:
    """scripts/install put the shipped unit in place (only @PREFIX@ filled in);
    ``systemctl restart`` reaches active/running when the broker sends READY=1, with its
    STATUS= line; the broker holds exactly the unit's capabilities, no new privileges, a
    seccomp filter, and runs in the unit's own cgroup."""
    installed = sysnode.sysnode("cat", "/etc/systemd/system/sshd-adoptd.service").stdout
    assert installed == UNIT.read_text().replace("@PREFIX@", PREFIX)
    sysnode.sysnode("systemctl", "restart", "sshd-adoptd", timeout=30)
    props = show(sysnode, "Type", "ActiveState", "SubState", "StatusText", "MainPID",
                 "ControlGroup", "ExecMainStartTimestampMonotonic",
                 "ActiveEnterTimestampMonotonic")
    assert (props["Type"], props["ActiveState"], props["SubState"]) == (
        "notify", "active", "running"), props
    assert props["StatusText"].startswith(f"node {HOST};"), props["StatusText"]
    ready_ms = (int(props["ActiveEnterTimestampMonotonic"])
                - int(props["ExecMainStartTimestampMonotonic"])) / 1000
    print(f"exec to READY=1: {ready_ms:.0f} ms")
    status = dict(line.split(":", 1) for line in sysnode.sysnode(
        "cat", f"/proc/{props['MainPID']}/status").stdout.splitlines() if ":" in line)
    wanted = capability_mask(unit_capabilities())
    held = {k: int(status[k], 16) for k in ("CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb")}
    assert held == {"CapBnd": wanted, "CapPrm": wanted, "CapEff": wanted, "CapInh": 0,
                    "CapAmb": 0}, {k: hex(v) for k, v in held.items()}
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    cgroup = sysnode.sysnode("cat", f"/proc/{props['MainPID']}/cgroup").stdout
    assert unified_line(cgroup) == f"0::{props['ControlGroup']}"
    assert "EPERM" not in journal(sysnode) and "Operation not permitted" not in journal(
        sysnode)


def test_stop_removes_the_runtime_directory_and_admission_with_it(sysnode: Cluster) -> None:
    """With a job, alice has a key entry; ``systemctl stop`` removes /run/sshd-adopt and
    every entry in it, so she cannot log in (fail closed) while root still can; ``start``
    lets her in again."""
    sysnode.submit("alice", [HOST], extra_args=PARTITION)
    wait_until(lambda: exists_in_node(sysnode, f"{RUNTIME}/keys/alice"), 10,
               "alice's key entry")
    try:
        sysnode.sysnode("systemctl", "stop", "sshd-adoptd", timeout=30)
        assert show(sysnode, "ActiveState")["ActiveState"] == "inactive"
        assert not exists_in_node(sysnode, RUNTIME)
        refused = sysnode.ssh("login", HOST, "echo IN", user="alice")
        assert refused.returncode == 255 and "IN" not in refused.stdout, refused
        assert "Permission denied (publickey)" in refused.stderr
        root = sysnode.ssh("login", HOST, "echo ROOT-IN", user="root")
        assert root.stdout.strip() == "ROOT-IN", root
    finally:
        sysnode.sysnode("systemctl", "start", "sshd-adoptd", timeout=30)
    again = sysnode.ssh("login", HOST, "echo IN", user="alice")
    assert again.stdout.strip() == "IN", again


def test_kill_9_is_restarted_and_nothing_stays_open_meanwhile(sysnode: Cluster) -> None:
    """SIGKILL to the broker: systemd ends the rest of the unit's cgroup, removes the
    runtime directory (no key entry admits anyone while no broker runs), and restarts it
    after RestartSec=1s; no process of the old broker survives."""
    before = show(sysnode, "MainPID", "NRestarts", "ControlGroup")
    old = sysnode.sysnode("sh", "-c", "cat /sys/fs/cgroup" + before["ControlGroup"]
                          + "/cgroup.procs /sys/fs/cgroup" + before["ControlGroup"]
                          + "/*/*/cgroup.procs 2>/dev/null").stdout.split()
    assert before["MainPID"] in old and len(old) >= 2, old  # the broker and its guardian
    watch = sysnode.sysnode("sh", "-c", f"kill -9 {before['MainPID']}; "
                            "for i in $(seq 300); do "
                            f"[ -e {RUNTIME} ] || {{ echo GONE; exit 0; }}; sleep 0.01; done",
                            timeout=30)
    assert watch.stdout.strip() == "GONE", "the runtime directory outlived the broker"

    def restarted() -> bool:
        now = show(sysnode, "ActiveState", "SubState", "NRestarts", "MainPID")
        return (now["ActiveState"], now["SubState"]) == ("active", "running") and \
            int(now["NRestarts"]) == int(before["NRestarts"]) + 1
    wait_until(restarted, 15, "the broker to be restarted")
    after = show(sysnode, "MainPID", "Result")
    assert after["MainPID"] != before["MainPID"]
    alive = [pid for pid in old if sysnode.sysnode("kill", "-0", pid, check=False)
             .returncode == 0 and pid not in sysnode.sysnode(
                 "sh", "-c", "cat /sys/fs/cgroup" + before["ControlGroup"]
                 + "/cgroup.procs /sys/fs/cgroup" + before["ControlGroup"]
                 + "/*/*/cgroup.procs 2>/dev/null").stdout.split()]
    assert not alive, f"processes of the killed broker still running: {alive}"
    assert "status=9/KILL" in journal(sysnode)
    assert exists_in_node(sysnode, f"{RUNTIME}/broker.sock")


# ------------------------------------------------------------------ beside logind


PROBE = (f"sleep {SETTLE}; grep ^0:: /proc/self/cgroup; echo XDG=$XDG_RUNTIME_DIR; "
         "loginctl show-session \"$XDG_SESSION_ID\" --property=Name --property=Remote "
         "--property=State --property=Scope")


def _session_facts(out: str) -> dict[str, str]:
    facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    facts["cgroup"] = unified_line(out)
    return facts


def test_sshd_adopt_session_stays_in_the_job_and_keeps_its_logind_session(
        sysnode: Cluster) -> None:
    """Port 22 with pam_systemd in the stack: after 10 s the session is still in the job's
    extern step, has XDG_RUNTIME_DIR and a live remote logind session of alice's."""
    job = sysnode.submit("alice", [HOST], extra_args=PARTITION)
    out = sysnode.ssh("login", HOST, PROBE, user="alice", timeout=60)
    assert out.returncode == 0, out
    facts = _session_facts(out.stdout)
    assert f"/{sysnode.job_cgroup_name(HOST, job)}/step_extern/" in facts["cgroup"], facts
    assert facts["XDG"] == f"/run/user/{Cluster.uid('alice')}", facts
    assert (facts.get("Name"), facts.get("Remote"), facts.get("State")) == (
        "alice", "yes", "active"), facts
    # logind made a session scope; the session's processes are no longer in it.
    assert re.fullmatch(r"session-\w+\.scope", facts.get("Scope", "")), facts


def test_pam_slurm_adopt_session_is_taken_out_of_the_job_by_logind(sysnode: Cluster) -> None:
    """Port 2222, the same PAM stack with pam_slurm_adopt in its account phase: adopted
    there, then pam_systemd (session phase) moves the session into logind's scope, out of
    the job: why Slurm's documentation tells sites to disable pam_systemd."""
    job = sysnode.submit("alice", [HOST], extra_args=PARTITION)
    out = sysnode.ssh("login", HOST, PROBE, user="alice", port=2222, timeout=60)
    assert out.returncode == 0, out
    facts = _session_facts(out.stdout)
    assert sysnode.job_cgroup_name(HOST, job) not in facts["cgroup"], facts
    assert re.search(r"/user-\d+\.slice/session-\w+\.scope$", facts["cgroup"]), facts
    assert facts["XDG"] == f"/run/user/{Cluster.uid('alice')}", facts
    adopted = sysnode.sysnode("journalctl", "--no-pager", "-o", "cat", "-t",
                              "pam_slurm_adopt").stdout
    assert re.search(rf"Process \d+ adopted into job {job}\b", adopted), adopted


def test_a_session_dies_with_its_job(sysnode: Cluster) -> None:
    job = sysnode.submit("alice", [HOST], extra_args=PARTITION)
    client = sysnode.spawn("login", "ssh", HOST, "sleep 4711", user="alice")
    try:
        wait_until(lambda: bool(remote_pids("alice", "sleep 4711")), 15, "alice's session")
        pid = remote_pids("alice", "sleep 4711")[0]
        assert in_job(sysnode, pid, job)
        sysnode.cancel(job)
        wait_until(lambda: not psutil.pid_exists(pid), 15, "the session to die with the job")
        client.wait(timeout=15)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)


def test_users_without_a_job_are_refused_with_the_reason(sysnode: Cluster) -> None:
    out = sysnode.ssh("login", HOST, "echo IN", user="bob")
    assert out.returncode != 0 and "IN" not in out.stdout, out
    assert NO_JOBS in out.stderr, out.stderr


# ------------------------------------------------------------------ rc-file escapes


GUARD = '[ -n "$SSH_CONNECTION" ] && [ -z "$ATTACK_DONE" ] && [ -e ~/.lab/attack ]'


@contextlib.contextmanager
def zoe_escapes(node: Cluster, marker: str) -> Iterator[subprocess.Popen[str]]:
    """zoe's ~/.zshenv (zsh reads it before the ForceCommand) execs ``sleep MARKER``
    instead of the wrapper: a session that never asks the broker."""
    home = Cluster.home("zoe")
    zshenv, armed = home / ".zshenv", home / ".lab" / "attack"
    node.exec("login", "mkdir", "-p", str(armed.parent), user="zoe")
    zshenv.write_text(f"if {GUARD}; then export ATTACK_DONE=1; exec zsh -c 'sleep {marker}'; "
                      "fi\n")
    node.exec("login", "touch", str(armed), user="zoe")
    client = node.spawn("login", "ssh", HOST, "echo WRAPPER-RAN", user="zoe")
    try:
        yield client
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
        armed.unlink(missing_ok=True)
        zshenv.unlink(missing_ok=True)
        subprocess.run(["pkill", "-KILL", "-u", "zoe", "-fx", f"sleep {marker}"], check=False)


def test_an_rc_file_escape_is_adopted_by_the_sweeper(sysnode: Cluster) -> None:
    job = sysnode.submit("zoe", [HOST], extra_args=PARTITION)
    with zoe_escapes(sysnode, "4712"):
        wait_until(lambda: bool(remote_pids("zoe", "sleep 4712")), 15, "zoe's escape")
        pid = remote_pids("zoe", "sleep 4712")[0]
        wait_until(lambda: in_job(sysnode, pid, job), 10, "the sweeper to adopt the escape")
        sysnode.cancel(job)
        wait_until(lambda: not psutil.pid_exists(pid), 15, "the escape to die with the job")
    assert re.search(rf"sweeper: user=zoe .*adopted into job {job}", journal(sysnode))


def test_an_escape_whose_job_ended_is_ended_by_the_sweeper(sysnode: Cluster) -> None:
    """The sweeper's signals under the unit (CAP_KILL): the escape is left outside the job
    for a while (sweeper.grace 6 s), the job ends meanwhile, and the sweeper, finding a
    connection of a user with no job here, ends it with SIGTERM."""
    config = "/etc/sshd-adopt/sshd-adopt.toml"
    sysnode.sysnode("cp", "-p", config, f"{config}.test-saved")
    sysnode.sysnode("sed", "-i", r"s/^\[sweeper\]$/[sweeper]\ngrace = 6.0/", config)
    sysnode.sysnode("systemctl", "reload", "sshd-adoptd")
    try:
        job = sysnode.submit("zoe", [HOST], extra_args=PARTITION)
        with zoe_escapes(sysnode, "4713") as client:
            wait_until(lambda: bool(remote_pids("zoe", "sleep 4713")), 15, "zoe's escape")
            pid = remote_pids("zoe", "sleep 4713")[0]
            assert not in_job(sysnode, pid, job)
            sysnode.cancel(job)
            assert psutil.pid_exists(pid)  # the job's end does not reach it
            wait_until(lambda: not psutil.pid_exists(pid), 20, "the sweeper to end the escape")
            client.wait(timeout=15)
    finally:
        sysnode.sysnode("mv", f"{config}.test-saved", config)
        sysnode.sysnode("systemctl", "reload", "sshd-adoptd")
    log = journal(sysnode)
    assert re.search(r"sweeper: user=zoe .*may not be here", log), log[-3000:]
    assert "Operation not permitted" not in log


def test_the_node_boots_clean(sysnode: Cluster) -> None:
    """No unit failed; every daemon of the node runs from its unit."""
    assert sysnode.sysnode("systemctl", "is-system-running", check=False).stdout.strip() == \
        "running", sysnode.sysnode("systemctl", "--failed", "--no-legend").stdout
    units = ["slurmd", "munge", "ssh", "ssh-psa", "sshd-adoptd", "systemd-logind", "dbus"]
    states = sysnode.sysnode("systemctl", "is-active", *units, check=False).stdout.split()
    assert states == ["active"] * len(units), dict(zip(units, states, strict=False))
