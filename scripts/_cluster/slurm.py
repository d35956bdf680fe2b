"""What the lab asks of Slurm: the queue, node states, the trivial job, crash recovery.

``nodes_idle`` and ``trivial_job`` (``srun -N3 hostname`` as alice) are how ``up`` knows
the cluster works. After slurmctld crashed, ``reset_slurmds_after_crash`` stops the
slurmds, kills the steps of jobs slurmctld forgot (``reap_orphan_steps``: their ids will
be handed out again) and clears the slurmds' credential caches.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from . import generation as lab
from .daemons import stop_entries
from .generation import COMPUTE, sname
from .namespaces import in_host
from .processes import kill_and_wait, lab_processes, proc_start_time
from .util import LabError, say, wait_for

#: cgroup v1 controllers whose hierarchies hold Slurm's job cgroups (slurm_<NodeName>/...).
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


def squeue_ids() -> list[str]:
    proc = in_host("ctl", "squeue", "-h", "-o", "%i", check=False)
    return proc.stdout.split() if proc.returncode == 0 else []


def node_states() -> dict[str, str]:
    proc = in_host("ctl", "sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
    return {
        parts[0]: parts[1] for parts in (line.split() for line in proc.stdout.splitlines())
        if len(parts) >= 2
    }


def nodes_idle() -> bool:
    """All compute nodes respond and are usable (idle, or running jobs)."""
    states = node_states()
    return all(states.get(sname(n), "?") in ("idle", "mixed", "allocated") for n in COMPUTE)


def ensure_nodes_up() -> None:
    """Resume nodes that slurmctld marked DOWN while their slurmd was being restarted."""
    for node, st in node_states().items():
        if node in {sname(n) for n in COMPUTE} and st.rstrip("*") in ("down", "drained",
                                                                          "draining"):
            in_host("ctl", "scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)


def dirs_deepest_first(top: Path) -> list[Path]:
    """``top`` and every directory below it, children before parents (for rmdir)."""
    below = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    return [*below, top]


def job_cgroup_dirs(node: str, job: int) -> list[Path]:
    return [p for ctrl in CGROUP_CONTROLLERS
            for p in Path(f"/sys/fs/cgroup/{ctrl}/slurm_{node}").glob(f"uid_*/job_{job}")]


def reap_orphan_steps() -> None:
    """Kill slurmstepds (and their processes) of jobs slurmctld does not know.

    A SIGKILLed slurmctld loses the jobs it had not saved yet and then hands out their ids
    again; a surviving stepd of the old job with the same id blocks the new job for good
    ("Waiting for job N's prolog"). Run right after slurmctld was restarted.
    """
    proc = in_host("ctl", "squeue", "-h", "-o", "%i %T", check=False)
    if proc.returncode != 0:
        return
    # A job slurmctld recovered as PENDING (saved before it was allocated) has no business
    # having stepds either.
    known = {
        int(parts[0]) for parts in (line.split() for line in proc.stdout.splitlines())
        if len(parts) == 2 and parts[0].isdigit() and parts[1] != "PENDING"
    }
    orphans: set[tuple[str, int]] = set()
    for node in map(sname, COMPUTE):
        spool = lab.VAR / f"slurmd-{node}"
        for sock in spool.glob(f"{node}_*.*"):
            job_text = sock.name.split("_", 1)[1].split(".", 1)[0]
            if job_text.isdigit() and int(job_text) not in known:
                orphans.add((node, int(job_text)))
        # Batch script dirs (job%05u) of killed batch stepds: a reused id fails with
        # "couldn't open .../slurm_script: File exists".
        for batch_dir in spool.glob("job[0-9]*"):
            job_text = batch_dir.name[3:]
            if job_text.isdigit() and int(job_text) not in known:
                orphans.add((node, int(job_text)))
    if not orphans:
        return
    say(f"killing orphaned steps of unknown jobs: {sorted(orphans)}")
    prefixes = tuple(f"slurmstepd: [{job}." for _node, job in orphans)
    victims: list[tuple[int, int]] = []
    for node, job in orphans:
        for directory in job_cgroup_dirs(node, job):
            for procs in directory.rglob("cgroup.procs"):
                for pid_text in procs.read_text().split():
                    start = proc_start_time(int(pid_text))
                    if start is not None:
                        victims.append((int(pid_text), start))
    for pid, start in lab_processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(prefixes):
            victims.append((pid, start))
    kill_and_wait(victims, grace=0)
    for node, job in orphans:
        spool = lab.VAR / f"slurmd-{node}"
        for leftover in [*spool.glob(f"{node}_{job}.*"), *spool.glob(f"hwloc_topo_{job}.*")]:
            leftover.unlink(missing_ok=True)
        shutil.rmtree(spool / f"job{job:05d}", ignore_errors=True)
        for top in job_cgroup_dirs(node, job):
            for path in dirs_deepest_first(top):
                with contextlib.suppress(OSError):
                    path.rmdir()


def reset_slurmds_after_crash(state: dict[str, dict[str, object]]) -> None:
    """After slurmctld died: stop the slurmds, kill steps of jobs it forgot, clear the
    slurmds' credential caches; phase 3 of `up` then starts the slurmds afresh."""
    say("slurmctld had crashed: restarting the slurmds with clean credential caches")
    stop_entries([state.pop(n) for n in list(state) if n.startswith("slurmd-")])
    reap_orphan_steps()
    for node in COMPUTE:
        for cache in (lab.VAR / f"slurmd-{sname(node)}").glob("cred_state*"):
            cache.unlink(missing_ok=True)


def trivial_job(attempts: int = 3) -> None:
    for attempt in range(attempts):
        proc = in_host("login", "setpriv", "--reuid=alice", "--regid=alice", "--init-groups",
                       "--reset-env", "--", "srun", "-N3", "-t", "1", "--chdir=/tmp",
                       "hostname", check=False, timeout=90)
        names = sorted(proc.stdout.split())
        if proc.returncode == 0 and names == list(COMPUTE):
            return
        if attempt + 1 < attempts:  # e.g. a node that re-registered a moment ago
            say(f"trivial job failed (rc={proc.returncode}), retrying")
            time.sleep(2)
            wait_for(nodes_idle, 20, 0.5)
    raise LabError(f"trivial job `srun -N3 hostname` as alice failed (rc={proc.returncode}):"
                   f"\n{proc.stdout}{proc.stderr}")
