"""The shipped systemd unit's privileges on every lab broker, and the file itself.

Most lab nodes start their daemons by hand, so the lab starts every broker with exactly
the unit's privileges (``setpriv``: its CapabilityBoundingSet, no inheritable
capabilities, NoNewPrivileges; ``scripts/_cluster/daemons.py``), so that every test on
the cluster -- adoption, the sweeper's signals, the proc connector, the keys read as the
user, the callerid credential minted as the user -- runs the broker as the unit would
(with one addition, LAB_ONLY below), each in a cgroup of its own as Delegate=yes gives
it. This module checks that the brokers really hold that set and nothing more, and that
``systemd-analyze verify`` accepts the file as ``scripts/install`` fills it in. The unit
itself runs under a real systemd on forky's node s1: test_systemd_node.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import REPO, UNIT, VENV, Cluster, capability_mask, unit_capabilities

pytestmark = pytest.mark.cluster

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
    wanted = capability_mask([*unit_capabilities(), *LAB_ONLY])
    for node in ("n1", "n2", "n3"):
        status = dict(line.split(":", 1) for line in Path(
            f"/proc/{cluster.broker_pid(node)}/status").read_text().splitlines() if ":" in line)
        held = {key: int(status[key], 16) for key in ("CapBnd", "CapPrm", "CapEff", "CapInh")}
        assert held == {"CapBnd": wanted, "CapPrm": wanted, "CapEff": wanted, "CapInh": 0}, (
            node, {k: hex(v) for k, v in held.items()}, hex(wanted))
        assert status["NoNewPrivs"].strip() == "1", node
