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
                 "NodeName", "spool dir", "sshd (root)", "broker", "process events"):
        assert seen[name] == "OK", document["checks"]


def test_doctor_lists_the_users_job_on_this_node(cluster: Cluster) -> None:
    job = cluster.submit("alice", [NODE])
    _, document = doctor(cluster, "--user", "alice")
    dry = document["dry_run"]
    assert dry["user"] == "alice"
    assert [j["job_id"] for j in dry["jobs"]] == [job]
    assert dry["decision"].startswith(f"adopt into job {job}")
    assert statuses(document)["dry run (alice)"] == "OK"
    # The lab's drop-in, as shipped: alice can only log in with a key.
    methods = next(c for c in document["checks"] if c["name"] == "auth methods (alice)")
    assert methods["status"] == "OK" and "publickey" in methods["detail"], methods


def test_doctor_text_output_names_the_job(cluster: Cluster) -> None:
    job = cluster.submit("alice", [NODE])
    proc = cluster.exec(
        NODE, "env", f"PYTHONPATH={REPO}", str(VENV / "bin" / "python"), "-m",
        "sshd_adopt.cli.doctor", "--config", str(VAR / "etc" / NODE / "sshd-adopt.toml"),
        "--user", "alice", check=False,
    )
    assert f"job {job}" in proc.stdout
    assert "OK    PrologFlags" in proc.stdout


def doctor_as_installed(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    """The doctor as an admin runs it on a node: no ``--config`` (it asks the running
    broker which file it loaded)."""
    proc = cluster.exec(
        NODE, "env", f"PYTHONPATH={REPO}", str(VENV / "bin" / "python"), "-m",
        "sshd_adopt.cli.doctor", "--sshd-config", str(VAR / "etc" / NODE / "sshd_config-22"),
        "--json", check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def config_check(document: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in document["checks"] if c["name"] == "config")


def test_doctor_checks_the_config_the_running_broker_loaded(cluster: Cluster) -> None:
    path = cluster.broker_config(NODE)
    _, document = doctor_as_installed(cluster)
    found = config_check(document)
    assert found["status"] == "OK", found
    assert str(path) in found["detail"] and "the running broker's" in found["detail"], found


def test_doctor_fails_the_running_brokers_config_when_it_is_broken(cluster: Cluster) -> None:
    """The file the broker loaded was broken since (an admin's edit): the doctor checks that
    file, not the default path, and names the file and the key."""
    path = cluster.broker_config(NODE)
    original = path.read_text()
    try:
        path.write_text("no_such_setting = 1\n" + original)
        status, document = doctor_as_installed(cluster)
        found = config_check(document)
        assert status == 1 and found["status"] == "FAIL", found
        assert str(path) in found["detail"] and "no_such_setting" in found["detail"], found
    finally:
        path.write_text(original)
