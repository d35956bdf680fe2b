"""`scripts/cluster` lifecycle: idempotent up/down and recovery after a crash.

Slow (it restarts the whole lab); it always leaves the lab up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.harness import COMPUTE, NSDIR, RUN, Cluster, wait_until

STATE = RUN / "state.json"


def daemon_pids() -> dict[str, int]:
    data = json.loads(STATE.read_text())
    return {name: int(entry["pid"]) for name, entry in data["daemons"].items()}


def root_addresses() -> str:
    return subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True,
                          check=True).stdout


def lab_cgroups() -> list[Path]:
    return [p for n in COMPUTE for p in Path("/sys/fs/cgroup").glob(f"*/slurm_{n}")]


def test_up_twice_is_a_noop(cluster: Cluster) -> None:
    cluster.run_script("up")
    before = daemon_pids()
    started = time.monotonic()
    cluster.run_script("up")
    assert time.monotonic() - started < 20
    assert daemon_pids() == before
    assert cluster.run_script("status").returncode == 0


def test_down_twice_leaves_the_host_as_found(cluster: Cluster) -> None:
    addresses = root_addresses()
    cluster.run_script("up")
    job = cluster.submit("alice", ["n1", "n2"])
    pids = daemon_pids()
    cluster.run_script("down")
    cluster.run_script("down")
    assert not any(Path(f"/proc/{pid}").exists() and
                   Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
                   for pid in pids.values())
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(NSDIR) not in mounts
    assert not RUN.exists()
    assert lab_cgroups() == []
    assert root_addresses() == addresses
    assert cluster.run_script("status", check=False).returncode != 0
    cluster.run_script("up")
    assert job not in cluster.jobs()  # a fresh lab starts with an empty queue


def test_up_recovers_after_slurmctld_is_killed(cluster: Cluster) -> None:
    cluster.run_script("up")
    pids = daemon_pids()
    os.kill(pids["slurmctld"], signal.SIGKILL)
    wait_until(lambda: cluster.run_script("status", check=False).returncode != 0, 10,
               "status to notice the dead slurmctld")
    cluster.run_script("up")
    after = daemon_pids()
    assert after["slurmctld"] != pids["slurmctld"]
    # The slurmds are restarted on purpose (clean credential caches); the rest is untouched.
    kept = [k for k in pids if k != "slurmctld" and not k.startswith("slurmd-")]
    assert {k: after[k] for k in kept} == {k: pids[k] for k in kept}
    job = cluster.submit("alice", ["n1", "n2", "n3"])
    cluster.cancel(job)


def test_up_recovers_after_a_crash_of_everything(cluster: Cluster) -> None:
    """SIGKILL every daemon (stale pid files and sockets stay behind), then `up`.

    A SIGKILLed slurmctld may lose the newest job (state is saved in the background) and
    hand its id out again; `up` must kill the orphaned stepd so that the new job can run.
    """
    cluster.run_script("up")
    job = cluster.submit("bob", ["n3"])
    for pid in daemon_pids().values():
        os.kill(pid, signal.SIGKILL)
    cluster.run_script("up")
    assert cluster.run_script("status").returncode == 0
    if job in cluster.jobs():  # slurmctld had saved it: it is still running
        cluster.wait_running(job)
        cluster.cancel(job)
    else:
        assert not cluster.stepd_answers(cluster.stepd_socket("n3", job))
    for nodes in (["n3"], ["n1", "n2", "n3"]):
        new = cluster.submit("alice", nodes)
        cluster.cancel(new)
