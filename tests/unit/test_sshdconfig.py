"""ManagedQuery's answer for one connection, from a recorded ``sshd -T`` output: managed,
the ways in without a key, and whether the user's PAM service gates them (then the broker
neither dooms nor holds such logins: sshd refuses a user without a job itself)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from sshd_adopt._internal import run
from sshd_adopt._internal.node import sshdconfig
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.node.sshdconfig import ManagedQuery
from tests.harness import REPO

LISTENER = ProcInfo(pid=10, ppid=1, real_uid=0, effective_uid=0, real_gid=0, name="sshd",
                    exe="/usr/sbin/sshd",
                    cmdline=("sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups",),
                    start_time=1.0)
PRESENT = "/run/sshd-adopt/present"
KEYLESS = ("forcecommand /opt/sshd-adopt/bin/sshd-adopt\n"
           "authenticationmethods publickey hostbased\n"
           "pubkeyauthentication yes\nhostbasedauthentication yes\n")


def answer_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sshd_t: str,
               pam: dict[str, str]) -> sshdconfig.SshdAnswer:
    for name, text in pam.items():
        (tmp_path / name).write_text(text)

    def fake_run(argv: Sequence[str], *, timeout: float) -> run.Finished:
        assert list(argv[:2]) == ["/usr/sbin/sshd", "-T"]
        return run.Finished(tuple(argv), 0, sshd_t.encode(), b"", 0.01)

    monkeypatch.setattr(run, "run", fake_run)
    query = ManagedQuery(present_file=lambda: PRESENT, pam_dir=str(tmp_path))
    return query.query(LISTENER, "alice", None)


def test_the_shipped_service_gates_the_keyless_ways(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    found = answer_for(monkeypatch, tmp_path,
                       KEYLESS + "usepam yes\npamservicename sshd-adopt\n",
                       {"sshd-adopt": (REPO / "pam.d" / "sshd-adopt").read_text()})
    assert found.managed and found.keyless == ("hostbased",) and found.gated


@pytest.mark.parametrize("sshd_t, pam", [
    ("usepam no\npamservicename sshd-adopt\n", {}),  # PAM off: no account phase
    ("usepam yes\npamservicename sshd-adopt\n", {}),  # the service's file is missing
    ("usepam yes\n", {"sshd": "@include common-account\n"}),  # sshd's own file, no gate
])
def test_no_gate_without_pam_or_without_the_check(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, sshd_t: str,
                                                  pam: dict[str, str]) -> None:
    assert not answer_for(monkeypatch, tmp_path, KEYLESS + sshd_t, pam).gated


def test_before_openssh_9_8_the_block_in_sshds_own_file_gates(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """OpenSSH 9.2 prints no pamservicename: the service is sshd."""
    block = (f"account [success=2 default=ignore] pam_listfile.so item=user sense=allow "
             f"file={PRESENT} onerr=fail\n")
    assert answer_for(monkeypatch, tmp_path, KEYLESS + "usepam yes\n",
                      {"sshd": "@include common-auth\n" + block}).gated
