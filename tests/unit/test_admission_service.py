"""Admission: key entries kept by the node's jobs, and the AuthorizedKeysCommand gate.

The entries are made in real, root-owned directories under /run (KeyEntries refuses
anything an unprivileged user could write to, which rules out /tmp); the gate's peer
check is replaced, and the user's key file is real and read as the user.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshd_adopt._internal.config import AdmissionSettings, Config
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.node.keyentries import KeyEntries
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.node.sessions import GateContext
from sshd_adopt._internal.services import admission
from sshd_adopt._internal.services.admission import Admission, Keys, Refused, restrict_keys
from sshd_adopt.errors import NotAnSshSession, ProcError
from tests.unit.fakes import (
    ALICE,
    BOB,
    DAVE,
    FakeAccounts,
    FakeJobs,
    FakeSource,
    FakeSteps,
    broker_state,
)

NETNS = "net:[4026531840]"
GATE = Account("sshd-adopt-gate", 65534, 65534, "/nonexistent", "/usr/sbin/nologin")
CONN = Connection(ipaddress.IPv4Address("10.0.0.11"), 22,
                  ipaddress.IPv4Address("10.0.0.12"), 40000)
KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAlice alice@laptop"
KEY2 = 'from="10.0.0.0/8" ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAlice alice@work'
KEYS_TEXT = f"{KEY1}\n# an old key\n\n{KEY2}\n"


@dataclass
class Node:
    """A scratch tree under /run: entry directories and the users' homes."""

    base: Path
    keys_dir: Path
    principals_dir: Path
    alice: Account
    bob: Account
    dave: Account

    def config(self, **changes: object) -> Config:
        settings = AdmissionSettings(keys_dir=str(self.keys_dir),
                                     principals_dir=str(self.principals_dir),
                                     present_file=str(self.present_file))
        return Config(path="/etc/sshd-adopt/sshd-adopt.toml",
                      admission=dataclasses.replace(settings, **changes))  # type: ignore[arg-type]

    @property
    def present_file(self) -> Path:
        return self.base / "present"

    def present(self) -> list[str]:
        """The present list's lines (the keyless profile's PAM gate reads it)."""
        return self.present_file.read_text().splitlines()

    def entries(self) -> KeyEntries:
        return KeyEntries(str(self.keys_dir), str(self.principals_dir),
                          present_file=str(self.present_file))


def _home(base: Path, account: Account, keys: str | None) -> Account:
    """``account`` with a real home under ``base`` (owned by them, as sshd wants it)."""
    home = base / "home" / account.name
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, mode=0o755)
    ssh.chmod(0o700)
    if keys is not None:
        (ssh / "authorized_keys").write_text(keys)
        (ssh / "authorized_keys").chmod(0o600)
        os.chown(ssh / "authorized_keys", account.uid, account.gid)
    os.chown(ssh, account.uid, account.gid)
    os.chown(home, account.uid, account.gid)
    return dataclasses.replace(account, home=str(home))


@pytest.fixture
def node() -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(dir="/run", prefix="sshd-adopt-unit-"))
    try:
        base.chmod(0o755)  # the users must reach their homes below it
        (base / "home").mkdir(mode=0o755)
        keys_dir, principals_dir = base / "keys", base / "principals"
        made = Node(base, keys_dir, principals_dir,
                    alice=_home(base, ALICE, KEYS_TEXT), bob=_home(base, BOB, KEYS_TEXT),
                    dave=_home(base, DAVE, KEYS_TEXT))
        made.entries().prepare()
        yield made
    finally:
        shutil.rmtree(base)


@dataclass
class Gate:
    """An Admission over fakes, and what it asked of them."""

    service: Admission
    jobs: FakeJobs
    source: FakeSource
    peers: list[tuple[int, int, str]]


def make(node: Node, monkeypatch: pytest.MonkeyPatch, *, config: Config | None = None,
         jobs: Mapping[int, tuple[LocalJob, ...]] | None = None, gate_user: bool = True,
         peer_error: Exception | None = None) -> Gate:
    accounts = [node.alice, node.bob, node.dave, *([GATE] if gate_user else [])]
    state = broker_state(config or node.config())
    fake_jobs = FakeJobs(dict(jobs or {}))
    source = FakeSource()
    core = LoginCore(lambda: state, jobs=fake_jobs, source=source, steps=FakeSteps(),
                     accounts=FakeAccounts(*accounts))
    peers: list[tuple[int, int, str]] = []

    def verify(peer_pid: int, peer_uid: int, user: str, *, gate_uid: int,
               executables: frozenset[str], netns: str) -> GateContext:
        assert gate_uid == GATE.uid and netns == NETNS and "/usr/sbin/sshd" in executables
        peers.append((peer_pid, peer_uid, user))
        if peer_error is not None:
            raise peer_error
        monitor = ProcInfo(pid=20, ppid=10, real_uid=0, effective_uid=GATE.uid, real_gid=0,
                           name="sshd", exe="/usr/sbin/sshd",
                           cmdline=(f"sshd: {user} [priv]",), start_time=20.0)
        return GateContext(user=user, uid=2001, monitor=monitor, connection=CONN)

    monkeypatch.setattr(admission, "verify_gate_peer", verify)
    return Gate(Admission(lambda: state, core, NETNS), fake_jobs, source, peers)


def one_job(uid: int, job: int = 7) -> dict[int, tuple[LocalJob, ...]]:
    return {uid: (LocalJob(job, 1000.0),)}


# --------------------------------------------------------------------------- restrict_keys


def test_restrict_keys_prefixes_plain_lines_and_lines_with_options() -> None:
    text = (f"{KEY1}\n  # a comment\n\n{KEY2}\n"
            "ecdsa-sha2-nistp256 AAAAE2 e\nsk-ssh-ed25519@openssh.com AAAAGn sk\n"
            "no-pty,command=\"x\" ssh-ed25519 AAAAC3 forced\n")
    assert restrict_keys(text) == (
        f"restrict {KEY1}\n"
        f"restrict,{KEY2}\n"
        "restrict ecdsa-sha2-nistp256 AAAAE2 e\n"
        "restrict sk-ssh-ed25519@openssh.com AAAAGn sk\n"
        "restrict,no-pty,command=\"x\" ssh-ed25519 AAAAC3 forced\n"
    )


def test_restrict_keys_of_nothing_but_comments_is_empty() -> None:
    assert restrict_keys("") == ""
    assert restrict_keys("# only a comment\n\n   \n") == ""


# --------------------------------------------------------------------------- key entries


def test_first_job_makes_the_entries_and_the_last_ones_end_removes_them(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch)
    gate.service.jobs_changed(ALICE.uid, True)
    link = node.keys_dir / "alice"
    assert os.readlink(link) == f"{node.alice.home}/.ssh/authorized_keys"
    assert (node.principals_dir / "alice").read_text() == "alice\n"
    assert node.entries().admitted() == frozenset({"alice"})
    gate.service.jobs_changed(ALICE.uid, False)
    assert not os.path.lexists(link)
    assert not (node.principals_dir / "alice").exists()
    assert node.entries().admitted() == frozenset()


def test_the_present_list_names_the_users_with_a_job_here(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch)
    gate.service.rebuild(frozenset({DAVE.uid}))
    assert node.present() == ["dave"]
    gate.service.jobs_changed(ALICE.uid, True)
    assert node.present() == ["alice", "dave"]
    assert stat.S_IMODE(node.present_file.stat().st_mode) == 0o644
    assert node.present_file.stat().st_uid == 0
    gate.service.jobs_changed(DAVE.uid, False)
    assert node.present() == ["alice"]
    gate.service.wipe()  # the broker stops: nobody passes the PAM gate (onerr=fail)
    assert not node.present_file.exists()


def test_the_present_list_is_kept_when_keys_come_from_a_command(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key entries then, but hostbased and GSSAPI logins still need the list."""
    gate = make(node, monkeypatch,
                config=node.config(keys_command="/usr/bin/sss_ssh_authorizedkeys %u"))
    gate.service.jobs_changed(ALICE.uid, True)
    assert node.present() == ["alice"]
    assert os.listdir(node.keys_dir) == []


def test_jobs_changed_for_an_unknown_uid_makes_nothing(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    make(node, monkeypatch).service.jobs_changed(4242, True)
    assert os.listdir(node.keys_dir) == [] and os.listdir(node.principals_dir) == []


def test_rebuild_wipes_stale_entries_and_makes_those_of_the_given_uids(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = node.entries()
    entries.admit(node.bob)  # stale: bob's job ended while the broker was down
    (node.keys_dir / ".new-0123").symlink_to("/nowhere")  # a leftover temporary
    gate = make(node, monkeypatch)
    made = gate.service.rebuild(frozenset({ALICE.uid, DAVE.uid, 4242}))
    assert made == 2
    assert sorted(os.listdir(node.keys_dir)) == ["alice", "dave"]
    assert sorted(os.listdir(node.principals_dir)) == ["alice", "dave"]


def test_rebuild_creates_missing_directories(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(node.keys_dir)
    shutil.rmtree(node.principals_dir)
    assert make(node, monkeypatch).service.rebuild(frozenset({ALICE.uid})) == 1
    assert node.entries().admitted() == frozenset({"alice"})


def test_with_a_keys_command_no_entries_are_made(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.entries().admit(node.bob)
    gate = make(node, monkeypatch,
                config=node.config(keys_command="/usr/bin/sss_ssh_authorizedkeys %u"))
    assert not gate.service.uses_entries()
    gate.service.jobs_changed(ALICE.uid, True)
    assert node.entries().admitted() == frozenset({"bob"})
    assert gate.service.rebuild(frozenset({ALICE.uid, BOB.uid})) == 0
    assert os.listdir(node.keys_dir) == [] and os.listdir(node.principals_dir) == []


def test_wipe_removes_every_entry(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch)
    gate.service.rebuild(frozenset({ALICE.uid, BOB.uid}))
    gate.service.wipe()
    assert os.listdir(node.keys_dir) == [] and os.listdir(node.principals_dir) == []


# --------------------------------------------------------------------------- the gate


@pytest.mark.parametrize("error", [NotAnSshSession("not sshd's command"), ProcError("gone")])
def test_refused_when_the_peer_is_not_sshds_command(
        node: Node, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    gate = make(node, monkeypatch, jobs=one_job(ALICE.uid), peer_error=error)
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert outcome == Refused("not sshd's AuthorizedKeysCommand")
    assert gate.peers == [(3333, GATE.uid, "alice")]
    assert gate.jobs.asked == []  # nothing decided for a forged request
    assert node.entries().admitted() == frozenset()


def test_refused_when_the_command_user_does_not_exist(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, jobs=one_job(ALICE.uid), gate_user=False)
    assert gate.service.keys(3333, GATE.uid, "alice") == Refused(
        "the command user does not exist")
    assert gate.peers == []


def test_refused_for_an_unknown_user(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch)
    assert gate.service.keys(3333, GATE.uid, "mallory") == Refused("no such user")
    assert gate.jobs.asked == []


def test_a_user_with_a_job_gets_their_keys_unrestricted(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, jobs=one_job(ALICE.uid))
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert isinstance(outcome, Keys)
    assert outcome.text == KEYS_TEXT
    assert not outcome.restricted
    assert "job 7" in outcome.reason
    # the entry the job table had not made yet: the next login needs no command
    assert node.entries().admitted() == frozenset({"alice"})
    assert gate.source.asked == []


def test_sshd_asking_twice_for_one_login_is_decided_once(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, jobs=one_job(ALICE.uid))
    first = gate.service.keys(3333, GATE.uid, "alice")
    second = gate.service.keys(3334, GATE.uid, "alice")
    assert first == second and isinstance(first, Keys)
    assert gate.jobs.asked == [ALICE.uid]


def test_the_gate_never_asks_the_source_job_even_with_several_jobs(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = {ALICE.uid: (LocalJob(7, 1000.0), LocalJob(8, 2000.0))}
    gate = make(node, monkeypatch, jobs=jobs)
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert isinstance(outcome, Keys) and not outcome.restricted
    assert "asked after authentication" in outcome.reason
    assert gate.source.asked == []
    assert gate.jobs.asked == [ALICE.uid]


def test_a_jobless_bash_user_gets_restricted_keys_to_be_told_why(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, jobs=one_job(BOB.uid))
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert outcome == Keys(f"restrict {KEY1}\nrestrict,{KEY2}\n", True,
                           "user has no jobs on this node; action_no_jobs=deny")
    assert node.entries().admitted() == frozenset()  # no job: no entry


def test_a_jobless_zsh_user_gets_nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch)
    outcome = gate.service.keys(3333, GATE.uid, "dave")
    assert outcome == Refused("user has no jobs on this node; action_no_jobs=deny")


def test_on_deny_refuse_gives_a_jobless_bash_user_nothing(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, config=node.config(on_deny="refuse"))
    assert isinstance(gate.service.keys(3333, GATE.uid, "alice"), Refused)


def test_on_deny_refuse_still_lets_a_user_with_a_job_in(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = make(node, monkeypatch, config=node.config(on_deny="refuse"),
                jobs=one_job(ALICE.uid))
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert isinstance(outcome, Keys) and not outcome.restricted


def test_keys_from_the_sites_command_and_no_entry(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    config = node.config(keys_command="/bin/echo ssh-ed25519 AAAAsite %u")
    gate = make(node, monkeypatch, config=config, jobs=one_job(ALICE.uid))
    outcome = gate.service.keys(3333, GATE.uid, "alice")
    assert isinstance(outcome, Keys)
    assert outcome.text == "ssh-ed25519 AAAAsite alice\n"
    assert not outcome.restricted
    assert node.entries().admitted() == frozenset()
