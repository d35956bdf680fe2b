"""The shipped systemd unit, as far as this machine can prove it without systemd as init.

No lab node boots systemd yet: Slurm's cgroup plugins cannot run under a systemd
container's pure cgroup2 view of this hybrid host (the unit itself was run under a
systemd booted as PID 1 of a namespace container, by hand: docs/testing.md, "A node
booted with systemd"). So in CI the unit is proven in two parts: ``systemd-analyze
verify`` accepts the file as ``scripts/install`` fills it in, and the lab starts every
broker with exactly the unit's privileges (``setpriv``: its CapabilityBoundingSet, no
inheritable capabilities, NoNewPrivileges; ``scripts/_cluster/daemons.py``), so that
every test on the cluster -- adoption, the sweeper's signals, the proc connector, the
keys read as the user, the callerid credential minted as the user -- runs the broker as
the unit would (with one addition, LAB_ONLY below), each in a cgroup of its own as
Delegate=yes gives it. This module checks that the brokers really hold that set and
nothing more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, VENV, Cluster

pytestmark = pytest.mark.cluster

UNIT = REPO / "packaging" / "systemd" / "sshd-adoptd.service"
#: Capability numbers (linux/capability.h) of the names a unit may list.
CAPABILITY_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
}


def unit_capabilities() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError(f"{UNIT}: no CapabilityBoundingSet=")


def test_systemd_analyze_verifies_the_unit_as_installed(tmp_path: Path) -> None:
    """As scripts/install writes it: @PREFIX@ filled in, the man pages it names present."""
    unit = tmp_path / "sshd-adoptd.service"
    unit.write_text(UNIT.read_text().replace("@PREFIX@", str(VENV)))
    for page in (REPO / "docs" / "man").iterdir():
        section = tmp_path / "man" / f"man{page.suffix.lstrip('.')}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, env={**os.environ, "MANPATH": str(tmp_path / "man")},
                          check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


#: The lab's one addition (scripts/_cluster/daemons.py, LAB_ONLY_CAPABILITIES): its nodes
#: are network namespaces, and the broker enters the initial one to subscribe to the proc
#: connector, which the kernel offers there only. A real node's broker runs there already.
LAB_ONLY = ("CAP_SYS_ADMIN",)


def test_the_lab_brokers_hold_exactly_the_units_capabilities(cluster: Cluster) -> None:
    wanted = 0
    for name in [*unit_capabilities(), *LAB_ONLY]:
        wanted |= 1 << CAPABILITY_BITS[name]
    for node in ("n1", "n2", "n3"):
        status = dict(line.split(":", 1) for line in Path(
            f"/proc/{cluster.broker_pid(node)}/status").read_text().splitlines() if ":" in line)
        held = {key: int(status[key], 16) for key in ("CapBnd", "CapPrm", "CapEff", "CapInh")}
        assert held == {"CapBnd": wanted, "CapPrm": wanted, "CapEff": wanted, "CapInh": 0}, (
            node, {k: hex(v) for k, v in held.items()}, hex(wanted))
        assert status["NoNewPrivs"].strip() == "1", node
