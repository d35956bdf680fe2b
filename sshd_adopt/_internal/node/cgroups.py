"""What /proc says about a process's cgroups and OOM score.

Membership is read, never written: processes enter a job only through its slurmstepd
(:mod:`sshd_adopt._internal.slurm.extern`). Paths follow Slurm's layouts
(``src/plugins/cgroup/v1``, ``src/plugins/cgroup/v2``), and only **this node's** count:

* cgroup v1: ``/slurm/uid_<u>/job_<j>/step_extern``, or ``/slurm_<NodeName>/...`` when
  Slurm is built for several slurmds per host (Debian's packages are);
* cgroup v2 (the ``0::`` line): ``.../slurmstepd.scope/job_<j>/step_extern/...``, or
  ``<NodeName>_slurmstepd.scope`` with several slurmds per host. From 26.05 the job's
  directory is named by its SLUID (``sEKNKTV3WPV500``) unless cgroup.conf says
  ``CgroupJobIdPaths=yes`` (``cgroup_p_step_create``); the caller resolves such a name
  to a job id (:data:`JobNamer`: the job table asks each stepd its SLUID once).

Several slurmds on one kernel (the lab, multi-slurmd nodes) share the hierarchies, so a
path naming another node's prefix or scope is another node's job, never this one's.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from typing import Final, TypeAlias

from sshd_adopt._internal.node import fsids, procfs
from sshd_adopt.errors import NoSuchProcess, ProcError

#: What a job's tasks get: slurmstepd resets them to 0 before exec
#: (``_pre_task_child_privileged``: ``set_oom_adj(0)``, 22.05 → 26.05).
TASK_OOM_SCORE_ADJ: Final = 0

#: The job id of a job cgroup named by its SLUID on this node, or None if unknown.
JobNamer: TypeAlias = Callable[[str], int | None]


def no_sluids(_name: str) -> int | None:
    """A :data:`JobNamer` for callers that know no SLUIDs (every SLUID-named job: None)."""
    return None


def extern_job_of(pid: int, nodename: str, named: JobNamer = no_sluids) -> int | None:
    """The job whose extern step ``pid`` is in on this node, or None.

    Read from ``/proc/<pid>/cgroup``, any hierarchy (v1 lines or the v2 ``0::`` line);
    a SLUID-named job directory is resolved by ``named``. Other nodes' jobs never
    count, nor look-alike paths a user made. A process that vanished is in no job.
    """
    return _job_named(_cgroup_lines(pid) or (), _extern_path(nodename), named)


def _job_named(lines: Iterable[str], pattern: re.Pattern[str], named: JobNamer) -> int | None:
    """The job of the first of ``lines`` (``/proc/<pid>/cgroup``) that is in an extern step."""
    for line in lines:
        found = pattern.search(line.split(":", 2)[-1])
        if found:
            number = found.group("v1job") or found.group("v2job")
            return int(number) if number is not None else named(found.group("sluid"))
    return None


@functools.lru_cache(maxsize=8)
def _extern_path(nodename: str) -> re.Pattern[str]:
    """A job's extern step of node ``nodename``, v1 or v2 (see the module's description).

    Anchored at the hierarchy's root: Slurm makes its v1 tree there, and its v2 scope
    beside slurmd, one slice deep (``system.slice``). A user may make cgroups of their
    own, deeper, in a subtree systemd delegates to them (``user@<uid>.service``): a path
    that merely ends like a job's there is not in any job.
    """
    node = re.escape(nodename)
    return re.compile(
        rf"^/(?:(?:slurm|slurm_{node})/uid_\d+/job_(?P<v1job>\d+)"
        rf"|(?:[^/]+\.slice/)?(?:{node}_)?slurmstepd\.scope"
        rf"/(?:job_(?P<v2job>\d+)|(?P<sluid>s[0-9A-HJKMNP-TV-Z]{{13}})))"
        rf"/step_extern(?:/|$)")


def outside_of(job: int, reference: int, pids: Iterable[int], nodename: str,
               named: JobNamer = no_sluids) -> list[int]:
    """Those of ``pids`` that are not wholly where ``reference`` is in ``job``.

    ``reference`` is a process slurmstepd has just moved into the job's extern step (the
    connection's monitor). The stepd moves a process one hierarchy after another (cgroup
    v1: freezer, cpuset, memory, ...): a child forked meanwhile is in the job in some
    hierarchies and not in others, and would escape the job's memory limit while
    ``extern_job_of`` finds it "in the job". So a process counts as in only when every
    line of ``reference``'s ``/proc/<pid>/cgroup`` that names the job is in its own too.
    A process that vanished is left out; without a usable reference, ``extern_job_of``
    decides.
    """
    pattern = _extern_path(nodename)
    wanted = {line for line in (_cgroup_lines(reference) or ())
              if _job_named((line,), pattern, named) == job}
    missing = []
    for pid in pids:
        lines = _cgroup_lines(pid)
        if lines is None:
            continue
        if not wanted:
            if _job_named(lines, pattern, named) != job:  # this file read once, not twice
                missing.append(pid)
        elif not wanted <= set(lines):
            missing.append(pid)
    return missing


def _cgroup_lines(pid: int) -> list[str] | None:
    try:
        with open(f"{procfs.PROCFS}/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            return handle.read(65536).splitlines()
    except OSError:
        return None


def oom_score_adj(pid: int) -> int:
    """``/proc/<pid>/oom_score_adj``; raises NoSuchProcess or ProcError."""
    try:
        with open(f"{procfs.PROCFS}/{pid}/oom_score_adj", encoding="ascii") as handle:
            return int(handle.read(32).strip())
    except FileNotFoundError as err:
        raise NoSuchProcess(f"process {pid} is gone") from err
    except (OSError, ValueError) as err:
        raise ProcError(f"process {pid}: oom_score_adj: {err}") from err


def set_oom_score_adj(pid: int, value: int) -> None:
    """Write ``/proc/<pid>/oom_score_adj``. Raises NoSuchProcess or ProcError.

    The file belongs to the process's user once it exec'd something dumpable, so it is
    written as its owner (:func:`~sshd_adopt._internal.node.fsids.call_as`): root needs
    no CAP_DAC_OVERRIDE. Raising the value needs nothing more; lowering it below the
    process's minimum would need CAP_SYS_RESOURCE (``proc_oom_score_adj_write``).
    """
    path = f"{procfs.PROCFS}/{pid}/oom_score_adj"

    def write() -> None:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(str(value))

    try:
        owner = os.stat(path)
        if owner.st_uid == 0:
            write()
        else:
            fsids.call_as(owner.st_uid, owner.st_gid, write, timeout=1.0,
                          what=f"writing {path}")
    except FileNotFoundError as err:
        raise NoSuchProcess(f"process {pid} is gone") from err
    except (OSError, fsids.FsidsError) as err:
        raise ProcError(f"process {pid}: oom_score_adj: {err}") from err
