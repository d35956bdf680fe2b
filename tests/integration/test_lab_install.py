"""The lab installs exactly the checkout it is run from, whatever the file times.

setuptools copies a module into ``build/`` only when the source is newer than the copy
already there. A lab that kept ``build/`` between installs therefore reported success
when installing a checkout with older file times (a ``git checkout`` of an older commit,
an ``rsync -a`` of another tree) and left the previous code in the venv, so CI could test
something other than the commit it was given.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO, Cluster

pytestmark = pytest.mark.cluster

LONG_AGO = 1_000_000_000  # 2001-09-09: older than any build/ a previous install left


def _copy_checkout(dest: Path) -> Path:
    subprocess.run(["rsync", "-a", "--exclude", ".git", "--exclude", "__pycache__",
                    "--exclude", "build", "--exclude", "*.egg-info", f"{REPO}/", f"{dest}/"],
                   check=True)
    return dest


def _installed_init(cluster: Cluster) -> str:
    found = list(cluster.venv_host.glob("lib/python3*/site-packages/sshd_adopt/__init__.py"))
    assert len(found) == 1, found
    return found[0].read_text()


def _reinstall_from(cluster: Cluster, checkout: Path) -> None:
    proc = subprocess.run([str(checkout / "scripts" / "cluster"), "--generation",
                           cluster.generation, "reinstall"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def restore_lab(cluster: Cluster) -> Iterator[None]:
    yield None
    _reinstall_from(cluster, REPO)


def test_an_older_checkout_installed_after_a_newer_one_replaces_it(
        cluster: Cluster, tmp_path: Path, restore_lab: None) -> None:
    marker = f"# lab-install-probe {uuid.uuid4().hex}\n"
    newer = _copy_checkout(tmp_path / "newer")
    init = newer / "sshd_adopt" / "__init__.py"
    init.write_text(init.read_text() + marker)
    _reinstall_from(cluster, newer)
    assert marker in _installed_init(cluster)

    older = _copy_checkout(tmp_path / "older")
    for path in older.rglob("*"):
        os.utime(path, (LONG_AGO, LONG_AGO), follow_symlinks=False)
    _reinstall_from(cluster, older)
    installed = _installed_init(cluster)
    assert marker not in installed
    assert installed == (older / "sshd_adopt" / "__init__.py").read_text()


def test_a_venv_changed_behind_the_labs_back_is_reinstalled_by_up(
        cluster: Cluster, restore_lab: None) -> None:
    """Whatever changed the installed package (another checkout's install, a hand edit),
    ``up`` notices that it is not this checkout's code and installs it again."""
    found = list(cluster.venv_host.glob("lib/python3*/site-packages/sshd_adopt/__init__.py"))
    assert len(found) == 1, found
    found[0].write_text(found[0].read_text() + "# changed behind the lab's back\n")
    proc = cluster.run_script("up")
    assert "reinstalling" in proc.stdout + proc.stderr
    assert _installed_init(cluster) == (REPO / "sshd_adopt" / "__init__.py").read_text()
