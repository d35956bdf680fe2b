"""Which processes are wholly in a job: a fake /proc (procfs.PROCFS) with cgroup files."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshd_adopt._internal.node import cgroups, procfs

IN_JOB = ("7:freezer:/slurm_n1/uid_2001/job_7/step_extern\n"
          "4:memory:/slurm_n1/uid_2001/job_7/step_extern\n0::/\n")
#: Forked while the stepd moved its parent: in the freezer cgroup already, not in memory.
PARTLY = "7:freezer:/slurm_n1/uid_2001/job_7/step_extern\n4:memory:/\n0::/\n"
OUTSIDE = "7:freezer:/\n4:memory:/\n0::/\n"
MONITOR = 100


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(procfs, "PROCFS", str(tmp_path))
    return tmp_path


def process(proc: Path, pid: int, cgroup: str) -> int:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cgroup").write_text(cgroup)
    return pid


def test_a_process_in_the_job_in_only_some_hierarchies_is_outside(proc: Path) -> None:
    process(proc, MONITOR, IN_JOB)
    whole, partly, outside = (process(proc, 101, IN_JOB), process(proc, 102, PARTLY),
                              process(proc, 103, OUTSIDE))
    assert cgroups.extern_job_of(partly, "n1") == 7  # which is why this is needed
    assert cgroups.outside_of(7, MONITOR, [whole, partly, outside], "n1") == [partly, outside]


def test_a_vanished_process_is_left_out(proc: Path) -> None:
    process(proc, MONITOR, IN_JOB)
    assert cgroups.outside_of(7, MONITOR, [999], "n1") == []


def test_without_a_reference_in_the_job_the_job_path_decides(proc: Path) -> None:
    process(proc, MONITOR, OUTSIDE)  # not (yet) in the job: no lines to compare with
    assert cgroups.outside_of(7, MONITOR, [process(proc, 102, PARTLY),
                                           process(proc, 103, OUTSIDE)], "n1") == [103]


@pytest.mark.parametrize(("line", "job"), [
    ("4:memory:/slurm_n1/uid_2001/job_7/step_extern", 7),  # v1, several slurmds per host
    ("4:memory:/slurm/uid_2001/job_7/step_extern", 7),  # v1, one slurmd per host
    ("4:memory:/slurm_n1/uid_2001/job_7/step_extern/task_special", 7),
    ("0::/system.slice/n1_slurmstepd.scope/job_7/step_extern/user/task_special", 7),  # v2
    ("0::/system.slice/slurmstepd.scope/job_7/step_extern/slurm", 7),
    ("0::/slurmstepd.scope/job_7/step_extern", 7),  # v2 in a cgroup namespace
    # Another node's job on the same kernel (the lab; multi-slurmd nodes):
    ("4:memory:/slurm_n2/uid_2001/job_7/step_extern", None),
    ("4:memory:/slurm_n11/uid_2001/job_7/step_extern", None),
    ("0::/system.slice/n2_slurmstepd.scope/job_7/step_extern/user/task_special", None),
    ("0::/system.slice/xn1_slurmstepd.scope/job_7/step_extern", None),
    # Not the extern step, or a look-alike a user made in their delegated subtree:
    ("4:memory:/slurm_n1/uid_2001/job_7/step_batch", None),
    ("0::/system.slice/n1_slurmstepd.scope/job_7/step_0/user/task_0", None),
    ("0::/user.slice/user-2001.slice/user@2001.service/n1_slurmstepd.scope/job_7/step_extern",
     None),
    ("0::/user.slice/user-2001.slice/user@2001.service/app.slice/slurm_n1/uid_2001/job_7/"
     "step_extern", None),
    ("4:memory:/jobs/slurm_n1/uid_2001/job_7/step_extern", None),
    ("0::/", None),
])
def test_only_this_nodes_extern_step_counts(proc: Path, line: str, job: int | None) -> None:
    pid = process(proc, 200, f"12:pids:/\n{line}\n")
    assert cgroups.extern_job_of(pid, "n1") == job


SLUID = "sFQDM8MTQH8E00"  # as Slurm 26.05 named a job's cgroup in the forky lab


@pytest.mark.parametrize(("line", "job"), [
    (f"0::/system.slice/n1_slurmstepd.scope/{SLUID}/step_extern/user/task_special", 7),
    (f"0::/system.slice/slurmstepd.scope/{SLUID}/step_extern/slurm", 7),
    # a SLUID the node's stepds never told (another node's job, or none at all)
    ("0::/system.slice/n1_slurmstepd.scope/sFQDM8MTQH8E01/step_extern", None),
    (f"0::/system.slice/n2_slurmstepd.scope/{SLUID}/step_extern", None),
    (f"0::/system.slice/n1_slurmstepd.scope/{SLUID}/step_batch/user", None),
    # not a SLUID: lower case, I/L/O/U are not in Crockford's alphabet, length
    ("0::/system.slice/n1_slurmstepd.scope/sfqdm8mtqh8e00/step_extern", None),
    ("0::/system.slice/n1_slurmstepd.scope/sFQDM8MTQH8EI0/step_extern", None),
    ("0::/system.slice/n1_slurmstepd.scope/sFQDM8MTQH8E0/step_extern", None),
    # v1 never names jobs by SLUID
    (f"4:memory:/slurm_n1/uid_2001/{SLUID}/step_extern", None),
])
def test_a_sluid_named_job_is_resolved_by_the_caller(proc: Path, line: str,
                                                     job: int | None) -> None:
    asked: list[str] = []

    def named(name: str) -> int | None:
        asked.append(name)
        return 7 if name == SLUID else None

    pid = process(proc, 200, f"12:pids:/\n{line}\n")
    assert cgroups.extern_job_of(pid, "n1", named) == job
    assert cgroups.extern_job_of(pid, "n1") is None  # nobody to ask: in no known job
    assert all(name.startswith("s") and len(name) == 14 for name in asked)


def test_outside_of_resolves_sluids(proc: Path) -> None:
    in_job = f"0::/system.slice/n1_slurmstepd.scope/{SLUID}/step_extern/user/task_special\n"
    process(proc, MONITOR, in_job)
    named = {SLUID: 7}.get
    inside = process(proc, 101, in_job)
    outside = process(proc, 102, "0::/\n")
    assert cgroups.outside_of(7, MONITOR, [inside, outside], "n1", named) == [outside]


def test_outside_of_compares_only_this_nodes_job_lines(proc: Path) -> None:
    """A reference also in another node's job 7 (impossible, but a line that merely looks
    like one) does not widen what "in the job" asks of the others."""
    process(proc, MONITOR, IN_JOB + "9:pids:/slurm_n2/uid_2001/job_7/step_extern\n")
    assert cgroups.outside_of(7, MONITOR, [process(proc, 101, IN_JOB)], "n1") == []
