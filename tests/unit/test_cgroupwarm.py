"""Warming the cgroup-migration path: where the two cgroups go, and the moves (on the
host's own cgroup v2 hierarchy, where creating our own child cgroups is allowed)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from sshd_adopt._internal.node import cgroupwarm

MOUNTINFO = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
36 25 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
"""


def test_the_v2_mount_and_own_cgroup_are_read_from_proc() -> None:
    assert cgroupwarm.cgroup2_mount(MOUNTINFO) == "/sys/fs/cgroup/unified"
    assert cgroupwarm.cgroup2_mount(MOUNTINFO.splitlines()[2]) is None
    assert cgroupwarm.own_cgroup2("4:memory:/x\n0::/system.slice/sshd-adoptd.service\n") == (
        "/system.slice/sshd-adoptd.service")
    assert cgroupwarm.own_cgroup2("4:memory:/x\n") is None


def test_a_later_mount_of_the_hierarchy_hides_the_earlier_one() -> None:
    """A container's mount namespace (the forky lab's nodes): the host's hybrid mounts came
    along with /sys, then the cgroup2 hierarchy was bound over /sys/fs/cgroup itself; its
    old /sys/fs/cgroup/unified entry is still listed but no longer reachable. A bind of a
    child cgroup (mount root not ``/``) is not the hierarchy's root."""
    bound = MOUNTINFO + ("40 22 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - "
                         "cgroup2 cgroup2 rw\n")
    assert cgroupwarm.cgroup2_mount(bound) == "/sys/fs/cgroup"
    child = MOUNTINFO + ("41 22 0:30 /system.slice /mnt/x rw - cgroup2 cgroup2 rw\n")
    assert cgroupwarm.cgroup2_mount(child) == "/sys/fs/cgroup/unified"


def _v2_root() -> Path | None:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        mount = cgroupwarm.cgroup2_mount(handle.read())
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        own = cgroupwarm.own_cgroup2(handle.read())
    if mount is None or own != "/" or os.geteuid() != 0:
        return None
    return Path(mount)


@pytest.mark.skipif(_v2_root() is None, reason="needs root at the root of a cgroup v2 hierarchy")
def test_the_warmer_moves_its_process_between_its_own_two_cgroups() -> None:
    root = _v2_root()
    assert root is not None
    base = root / f"sshd-adopt-unit-{uuid.uuid4().hex[:8]}"
    helper = subprocess.Popen(["sleep", "60"])
    warmer: cgroupwarm.MigrationWarmer | None = None
    try:
        warmer = cgroupwarm.MigrationWarmer(str(base), helper.pid)
        assert str(helper.pid) in (base / "a" / "cgroup.procs").read_text().split()
        warmer.warm()
        assert str(helper.pid) in (base / "b" / "cgroup.procs").read_text().split()
        warmer.warm()  # within MIN_INTERVAL: not repeated
        assert str(helper.pid) in (base / "b" / "cgroup.procs").read_text().split()
    finally:
        helper.kill()
        helper.wait()
        if warmer is not None:
            warmer.close()
    assert not base.exists()
