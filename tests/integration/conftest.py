"""Fixtures for tests of sshd-adopt itself on the lab cluster."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal.authmethods import (
    PAM_SERVICE,
    PAM_SERVICE_SINCE,
    dropin_with_methods,
    openssh_version,
    parse_methods,
    sshd_pam_with_gate,
)
from tests.harness import REPO, Cluster, wait_until


@pytest.fixture(scope="module")
def sysnode(cluster: Cluster) -> Iterator[Cluster]:
    """The compute node s1 booted with systemd as its init, sshd-adopt installed in it by
    scripts/install and started from its unit (``scripts/cluster sysnode up``); powered off
    after the module. Cgroup v2 generations only: systemd sees nothing but cgroup2."""
    if cluster.gen.cgroup != "v2":
        pytest.skip("the systemd node runs on a cgroup v2 generation only (forky)")
    cluster.run_script("sysnode", "up", timeout=900)
    # The first connection to a freshly booted s1 has been seen to time out (twice in
    # the CI run of 2026-11-30, both right after a boot that followed another module's
    # s1 by a minute): tests start once root's login goes through.
    wait_until(lambda: cluster.ssh("login", "s1", "true", user="root",
                                   timeout=20).returncode == 0, 90, "s1's sshd to take logins")
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.run_script("sysnode", "down", timeout=120)


def pam_gate_service(cluster: Cluster) -> str:
    """The PAM service that gates the keyless profile, as scripts/install decides it: its
    own where the generation's sshd takes PAMServiceName in a Match block (OpenSSH 9.8
    and later), else ``sshd`` (the gate block in /etc/pam.d/sshd)."""
    found = cluster.exec("n1", "/usr/sbin/sshd", "-V", check=False)
    version = openssh_version(found.stderr + found.stdout)
    return PAM_SERVICE if version is not None and version >= PAM_SERVICE_SINCE else "sshd"


@pytest.fixture(scope="module")
def job_container(cluster: Cluster) -> Iterator[Cluster]:
    """The lab with Slurm's tmpfs job container on for the module (every job cancelled
    first), off again afterwards (``Cluster.set_job_container``)."""
    cluster.cancel_all()
    cluster.set_job_container(True)
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.set_job_container(False)


@pytest.fixture(scope="module")
def auth_methods_lab(cluster: Cluster,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Every node's port-22 sshd with the drop-in as ``scripts/install --auth-methods
    hostbased,gssapi-with-mic`` writes it (``scripts/cluster up`` with
    SSHD_ADOPT_LAB_DROPIN: the sshds restart, new pids, so no broker keeps an earlier
    answer of theirs); the shipped drop-in again after the module."""
    shipped = REPO / "sshd_config.d" / "sshd-adopt.conf"
    dropin = tmp_path_factory.mktemp("dropin") / "sshd-adopt.conf"
    service = pam_gate_service(cluster)
    dropin.write_text(dropin_with_methods(shipped.read_text(),
                                          parse_methods("hostbased,gssapi-with-mic"),
                                          pam_service=service))
    os.environ["SSHD_ADOPT_LAB_DROPIN"] = str(dropin)
    try:
        cluster.run_script("up", timeout=600)
        if service == "sshd":  # the lab's copy of pam.d (`up` puts the original back)
            sshd_pam = cluster.var / "etc" / "pam.d" / "sshd"
            sshd_pam.write_text(sshd_pam_with_gate(sshd_pam.read_text(), shipped.read_text(),
                                                   "/run/sshd-adopt/present"))
        yield cluster
    finally:
        del os.environ["SSHD_ADOPT_LAB_DROPIN"]
        cluster.cancel_all()
        cluster.run_script("up", timeout=600)


#: The lab's Kerberos passwords (scripts/_cluster/kerberos.py: password()).
KERBEROS_USERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def kerberos_tickets(cluster: Cluster) -> Iterator[None]:
    """alice, bob and carol hold tickets of the lab's realm (kinit on the login host; the
    ticket caches in /tmp are seen by every lab host of the generation)."""
    for user in KERBEROS_USERS:
        cluster.exec("login", "kinit", user, user=user, input=f"{user}-lab-krb5\n")
    try:
        yield
    finally:
        for user in KERBEROS_USERS:
            cluster.exec("login", "kdestroy", user=user, check=False)


def reload_broker(cluster: Cluster, node: str) -> None:
    """SIGHUP the broker and wait until it logged the reload."""
    log = cluster.broker_log(node)
    mark = log.mark()
    os.kill(cluster.broker_pid(node), signal.SIGHUP)
    log.wait_for("reloaded", mark=mark, timeout=10)


@pytest.fixture
def broker_policy(cluster: Cluster) -> Iterator[Callable[..., None]]:
    """Change a node broker's configuration for one test, then restore it.

    ``broker_policy("n1", policy={"action_unknown": "allow"})`` appends keys to
    the lab config's sections and reloads the broker with SIGHUP, as an admin
    would. The original file is put back (and reloaded) after the test.
    """
    saved: dict[str, str] = {}

    def apply(node: str, **sections: dict[str, object]) -> None:
        path = cluster.broker_config(node)
        original = saved.setdefault(node, path.read_text())
        _write_atomically(path, with_settings(original, sections))
        reload_broker(cluster, node)

    yield apply
    for node, text in saved.items():
        _write_atomically(cluster.broker_config(node), text)
        reload_broker(cluster, node)


def with_settings(text: str, sections: dict[str, dict[str, object]]) -> str:
    """``text`` (TOML) with ``key = value`` set in the given sections: an existing key's line
    is replaced (TOML forbids duplicates), a missing key or section is added, and a value of
    None removes the key."""
    lines = text.splitlines()
    for section, values in sections.items():
        header = f"[{section}]"
        if header not in (line.strip() for line in lines):
            lines += ["", header]
        start = next(i for i, line in enumerate(lines) if line.strip() == header) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("[")),
                   len(lines))
        for key, value in values.items():
            entry = f"{key} = {json.dumps(value)}"
            found = [i for i in range(start, end)
                     if lines[i].split("=", 1)[0].strip() == key]
            if value is None:  # remove the key: the broker's default applies
                for i in reversed(found):
                    del lines[i]
                    end -= 1
            elif found:
                lines[found[0]] = entry
            else:
                lines.insert(start, entry)
                end += 1
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, as an editor does: the broker never reads a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def broker_restart(cluster: Cluster) -> Iterator[None]:
    """Make sure every broker is running again after a test that stops one."""
    yield
    cluster.run_script("up", timeout=300)
    for node in ("n1", "n2", "n3"):
        wait_until(cluster.broker_socket(node).exists, 15, f"broker socket on {node}")
    time.sleep(0.2)
