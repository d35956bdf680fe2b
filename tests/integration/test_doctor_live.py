"""``sshd-adopt doctor`` on a real compute node of the lab (n1).

The doctor runs inside n1's namespaces from the repository's source (PYTHONPATH), with the
lab venv's interpreter and dependencies, against the lab's broker configuration and the
port-22 sshd configuration, so it reads the lab's real slurm.conf and stepd sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness import REPO, VAR, VENV, Cluster

pytestmark = pytest.mark.cluster

NODE = "n1"


def doctor(cluster: Cluster, *args: str) -> tuple[int, dict[str, Any]]:
    proc = cluster.exec(
        NODE, "env", f"PYTHONPATH={REPO}", str(VENV / "bin" / "python"), "-m",
        "sshd_adopt.cli.doctor", "--config", str(VAR / "etc" / NODE / "sshd-adopt.toml"),
        "--sshd-config", str(VAR / "etc" / NODE / "sshd_config-22"), "--json", *args,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def statuses(document: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in document["checks"]}


def test_doctor_reports_slurm_prerequisites_ok(cluster: Cluster) -> None:
    _, document = doctor(cluster)
    seen = statuses(document)
    for name in ("config", "slurm.conf", "PrologFlags", "ProctrackType", "TaskPlugin",
                 "NodeName", "spool dir", "sshd (root)"):
        assert seen[name] == "OK", document["checks"]


def test_doctor_lists_the_users_job_on_this_node(cluster: Cluster) -> None:
    job = cluster.submit("alice", [NODE])
    _, document = doctor(cluster, "--user", "alice")
    dry = document["dry_run"]
    assert dry["user"] == "alice"
    assert [j["job_id"] for j in dry["jobs"]] == [job]
    assert dry["decision"].startswith(f"adopt into job {job}")
    assert statuses(document)["dry run (alice)"] == "OK"


def test_doctor_text_output_names_the_job(cluster: Cluster) -> None:
    job = cluster.submit("alice", [NODE])
    proc = cluster.exec(
        NODE, "env", f"PYTHONPATH={REPO}", str(VENV / "bin" / "python"), "-m",
        "sshd_adopt.cli.doctor", "--config", str(VAR / "etc" / NODE / "sshd-adopt.toml"),
        "--user", "alice", check=False,
    )
    assert f"job {job}" in proc.stdout
    assert "OK    PrologFlags" in proc.stdout
