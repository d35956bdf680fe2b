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
