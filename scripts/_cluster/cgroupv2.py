"""cgroup v2 lab nodes on a hybrid host (the forky generation).

This host mounts every cgroup v1 controller and, beside them, a cgroup2 hierarchy with no
controllers at ``/sys/fs/cgroup/unified``. A v2 generation binds that hierarchy at each
node's ``/sys/fs/cgroup`` (in the node's private mount namespace: ``mount_lines``), writes
Slurm's v2 cgroup.conf (``CGROUP_CONF``) and starts slurmd with a lab-only ``LD_PRELOAD``
library (``shim``), because Slurm's v2 plugin reads ``/proc/1/cgroup``, sees the v1 lines
the kernel lists whatever the mount namespace, and stops with "Hybrid mode is not
supported". The library is built here from ``cgroupv2_shim.c`` with the host's gcc; it is
never installed on a node, never loaded into sshd, the broker or PAM.

Rules kept: no v1 hierarchy of the host is unmounted, remounted or written; the only
cgroups touched are those Slurm makes for the lab's nodes (``<NodeName>_slurmstepd.scope``,
removed by ``lab_cgroups``) and the ``system.slice`` Slurm makes to hold them when empty.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from . import generation as lab
from .host import ensure_host_packages
from .util import LabError, run

#: The host's cgroup2 hierarchy (hybrid layout): what a v2 node sees at /sys/fs/cgroup.
UNIFIED = Path("/sys/fs/cgroup/unified")
#: The lab's own cgroups on that hierarchy: each broker's (the unit's Delegate=yes), and
#: the systemd node's (sysnode.py), ``<generation>-<host>``.
LAB_CGROUPS = UNIFIED / "sshd-adopt-lab"
SHIM_SOURCE = Path(__file__).resolve().parent / "cgroupv2_shim.c"

#: Slurm's cgroup/v2 plugin on the lab's controller-less hierarchy: no controller can be
#: enabled, so nothing is constrained; IgnoreSystemd: there is no systemd to ask for the
#: scope (slurmd makes ``system.slice/<NodeName>_slurmstepd.scope`` itself).
CGROUP_CONF = (
    "CgroupPlugin=cgroup/v2\nCgroupMountpoint=/sys/fs/cgroup\nIgnoreSystemd=yes\n"
    "EnableControllers=no\nConstrainCores=no\nConstrainRAMSpace=no\n"
    "ConstrainSwapSpace=no\nConstrainDevices=no\n"
)


def enabled() -> bool:
    return lab.GEN.cgroup == "v2"


def shim() -> Path:
    """Where the built library is: in the lab state dir (bound at the same path inside)."""
    return lab.VAR / "lib" / "cgroupv2-shim.so"


def ensure_shim() -> str:
    """Build the library unless it is current; return its digest (slurmd's config)."""
    source = SHIM_SOURCE.read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:16]
    stamp = shim().with_suffix(".sha")
    if shim().is_file() and stamp.is_file() and stamp.read_text() == tag:
        return tag
    if not UNIFIED.is_dir():
        raise LabError(f"a cgroup v2 generation needs the host's cgroup2 hierarchy at {UNIFIED}")
    if not shutil.which("gcc"):  # `up -g forky` first on a fresh machine: host PACKAGES
        ensure_host_packages(["gcc", "libc6-dev"])
    shim().parent.mkdir(parents=True, exist_ok=True)
    tmp = shim().with_suffix(".tmp")
    run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(tmp),
         str(SHIM_SOURCE), "-ldl"])
    tmp.replace(shim())
    stamp.write_text(tag)
    return tag


def slurmd_prefix() -> list[str]:
    """What slurmd's argv starts with on a v2 node (env(1) execs: the pid is slurmd's)."""
    return ["env", f"LD_PRELOAD={shim()}"]


def mount_lines(root: str) -> list[str]:
    """In a node's private mount namespace, after /sys is bound into ``root``: the host's
    cgroup2 hierarchy at ``/sys/fs/cgroup``. Its root, not a child (a child has
    cgroup.type, and Slurm would take it for a false root). Hides the v1 mounts in this
    namespace only."""
    return [f"mount --bind {UNIFIED} {root}/sys/fs/cgroup"]


def lab_cgroups(nodenames: list[str]) -> list[Path]:
    """The scopes Slurm made for these nodes on the host's cgroup2 hierarchy."""
    found = []
    for slice_dir in (UNIFIED, *UNIFIED.glob("*.slice")):
        found += [slice_dir / f"{node}_slurmstepd.scope" for node in nodenames
                  if (slice_dir / f"{node}_slurmstepd.scope").is_dir()]
    return found


def _slice_marker() -> Path:
    return lab.VAR / "made-system-slice"


def note_system_slice() -> None:
    """Before slurmd starts: remember whether ``system.slice`` is the lab's to remove
    (it is only when it did not exist before the lab's slurmds made it)."""
    if not (UNIFIED / "system.slice").exists():
        _slice_marker().write_text("system.slice made by the lab's slurmds\n")


def lab_slice() -> Path | None:
    """``system.slice`` if the lab made it (note_system_slice) and it is empty now."""
    path = UNIFIED / "system.slice"
    if not _slice_marker().exists() or not path.is_dir():
        return None
    if any(child.is_dir() for child in path.iterdir()):
        return None
    return path


def forget_system_slice() -> None:
    _slice_marker().unlink(missing_ok=True)
