"""scripts/install for real, into temporary directories: dry run, install, idempotence, uninstall.

Needs root (the script refuses otherwise) and PyPI for the project's dependencies; no lab
cluster. It lives with the integration tests because it installs a real venv, but it
touches no job, so the module overrides the conftest's job-cancelling autouse fixture:
running it must not cancel jobs of cluster tests running next to it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshd_adopt._internal.authmethods import GATE_BEGIN, without_pam_gate
from tests.harness import REPO

SCRIPT = REPO / "scripts" / "install"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="scripts/install needs root")


@pytest.fixture(autouse=True)
def _cluster_clean_jobs() -> Iterator[None]:
    """Shadow tests/conftest.py's fixture of the same name: no jobs to cancel here."""
    yield


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def prefix(self) -> Path:
        return self.root / "opt" / "sshd-adopt"

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "sshd-adopt"

    @property
    def sshd_dir(self) -> Path:
        return self.root / "etc" / "ssh" / "sshd_config.d"

    @property
    def systemd_dir(self) -> Path:
        return self.root / "etc" / "systemd" / "system"

    @property
    def pam_dir(self) -> Path:
        return self.root / "etc" / "pam.d"

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = [str(SCRIPT), "--prefix", str(self.prefix), "--etc-dir", str(self.etc),
                "--sshd-config-dir", str(self.sshd_dir), "--systemd-dir", str(self.systemd_dir),
                "--pam-dir", str(self.pam_dir), "--skip-gate-user", *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root`` outside the venv's bulk: (mode, mtime_ns, content digest)."""
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        state[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("install"))
    (layout.root / "etc" / "systemd").mkdir(parents=True)  # "this host has systemd"
    layout.pam_dir.mkdir(parents=True)
    shutil.copy2("/etc/pam.d/sshd", layout.pam_dir / "sshd")  # Debian's, as on a node
    layout.run()
    return layout


def test_dry_run_on_a_fresh_host_changes_nothing(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "etc" / "systemd").mkdir(parents=True)
    before = snapshot(tmp_path)
    out = layout.run("--dry-run").stdout
    assert snapshot(tmp_path) == before
    for planned in ("would create a venv", "would pip install", "would write the configuration",
                    "would write the sshd drop-in", "would write the systemd unit"):
        assert planned in out


def test_install_writes_the_files(installed: Layout) -> None:
    dropin = (installed.sshd_dir / "sshd-adopt.conf").read_text()
    assert f"ForceCommand {installed.prefix}/bin/sshd-adopt\n" in dropin
    assert "@PREFIX@" not in dropin
    unit = (installed.systemd_dir / "sshd-adoptd.service").read_text()
    assert f"ExecStart={installed.prefix}/bin/sshd-adoptd --foreground" in unit
    # The session spawner: a root-only socket, one helper per connection, from the venv.
    socket_unit = (installed.systemd_dir / "sshd-adopt-spawn.socket").read_text()
    assert "ListenStream=/run/sshd-adopt-spawn/spawn.sock\n" in socket_unit
    assert "SocketMode=0600\n" in socket_unit and "Accept=yes\n" in socket_unit
    spawn = (installed.systemd_dir / "sshd-adopt-spawn@.service").read_text()
    assert (f"ExecStart={installed.prefix}/bin/python3 -I -m "
            "sshd_adopt._internal.node.nsexec\n") in spawn
    assert (installed.prefix / "bin" / "python3").exists()
    config = installed.etc / "sshd-adopt.toml"
    assert config.read_text() == (REPO / "etc" / "sshd-adopt.toml.example").read_text()
    for path in (config, installed.sshd_dir / "sshd-adopt.conf", installed.prefix / "bin"):
        st = path.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, path


def test_second_run_changes_nothing(installed: Layout) -> None:
    before = snapshot(installed.root)
    out = installed.run().stdout
    assert "install: 0 change(s)" in out
    assert snapshot(installed.root) == before
    # A dry run of an installed host plans nothing either.
    assert "install: 0 change(s) planned (dry run)" in installed.run("--dry-run").stdout


def test_existing_config_is_kept_and_a_changed_dropin_backed_up(installed: Layout) -> None:
    config = installed.etc / "sshd-adopt.toml"
    config.write_text('[policy]\naction_unknown = "deny"\n')
    dropin = installed.sshd_dir / "sshd-adopt.conf"
    dropin.write_text("# edited by hand\n")
    installed.run()
    assert config.read_text() == '[policy]\naction_unknown = "deny"\n'
    backups = list(installed.sshd_dir.glob("sshd-adopt.conf.*.bak"))
    assert [b.read_text() for b in backups] == ["# edited by hand\n"]
    assert "ForceCommand" in dropin.read_text()
    # sshd's "Include sshd_config.d/*.conf" must not read the backup.
    assert not any(b.name.endswith(".conf") for b in backups)


def test_auth_methods_rewrite_the_dropin_and_sshd_accepts_it(installed: Layout,
                                                            tmp_path: Path) -> None:
    """--auth-methods hostbased: the drop-in lets managed users in by hostbased too, and
    this host's sshd accepts it (the installer's own `sshd -t` of the drop-in alone)."""
    dropin = installed.sshd_dir / "sshd-adopt.conf"
    out = installed.run("--auth-methods", "hostbased").stdout
    text = dropin.read_text()
    assert "    AuthenticationMethods publickey hostbased\n" in text
    assert "    HostbasedAuthentication yes\n" in text
    assert "    GSSAPIAuthentication no\n" in text
    assert "sshd -t -f" in out and "FAILED" not in out, out
    # This host's OpenSSH (Debian 12: 9.2) takes no PAMServiceName in a Match block: the
    # gate goes into sshd's own PAM file (backed up first), for the Match Group's users.
    debian = Path("/etc/pam.d/sshd").read_text()
    sshd_pam = (installed.pam_dir / "sshd").read_text()
    assert "PAMServiceName" not in text and "\nUsePAM yes\nMatch Group " in text
    assert not (installed.pam_dir / "sshd-adopt").exists()
    assert without_pam_gate(sshd_pam) == debian and GATE_BEGIN in sshd_pam
    assert "pam_succeed_if.so quiet user notingroup slurmusers" in sshd_pam
    assert "file=/run/sshd-adopt/present onerr=fail" in sshd_pam
    assert [p.read_text() for p in installed.pam_dir.glob("sshd.*.bak")] == [debian]
    check = tmp_path / "sshd_config"
    check.write_text(f"Include {dropin}\n")
    managed = subprocess.run(["sshd", "-T", "-f", str(check), "-C",
                              "user=alice,host=n1,addr=10.0.0.1"],
                             capture_output=True, text=True, check=True).stdout
    assert "authenticationmethods publickey hostbased" in managed
    installed.run()  # back to the shipped drop-in (the old one is backed up), no gate
    assert "    AuthenticationMethods publickey\n" in dropin.read_text()
    assert (installed.pam_dir / "sshd").read_text() == debian
    refused = subprocess.run([str(SCRIPT), "--auth-methods", "password", "--dry-run"],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "unknown authentication method(s) password" in \
        refused.stderr


def test_installed_commands_work(installed: Layout, tmp_path: Path) -> None:
    bin_dir = installed.prefix / "bin"
    help_text = subprocess.run([str(bin_dir / "sshd-adopt"), "--help"], capture_output=True,
                               text=True, timeout=30, check=True).stdout
    assert "ForceCommand" in help_text
    slurm_conf = tmp_path / "slurm.conf"
    slurm_conf.write_text("ClusterName=t\nPrologFlags=Contain\nProctrackType=proctrack/cgroup\n"
                          "TaskPlugin=task/cgroup\nNodeName=t1 CPUs=1\n")
    config = tmp_path / "sshd-adopt.toml"
    config.write_text(f'[policy]\nnodename = "t1"\n[slurm]\nconf_path = "{slurm_conf}"\n')
    check = subprocess.run([str(bin_dir / "sshd-adoptd"), "--check", "--config", str(config)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "node:      t1" in check.stdout


def test_uninstall_removes_what_it_installed(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    (tmp_path / "etc" / "systemd").mkdir(parents=True)
    layout.run()
    before = snapshot(tmp_path)
    layout.run("--uninstall", "--dry-run")
    assert snapshot(tmp_path) == before
    layout.run("--uninstall")
    assert not layout.prefix.exists()
    assert not (layout.sshd_dir / "sshd-adopt.conf").exists()
    assert not (layout.systemd_dir / "sshd-adoptd.service").exists()
    assert not list(layout.systemd_dir.glob("sshd-adopt-spawn*"))
    assert (layout.etc / "sshd-adopt.toml").exists()  # kept without --purge
    layout.run("--uninstall", "--purge")
    assert not layout.etc.exists()
