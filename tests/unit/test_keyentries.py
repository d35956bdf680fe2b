"""The key entries sshd reads: where they may live, what they point at, how they change.

The entry directories are the admission boundary (whoever can write there can let any
user in), so every rule of :func:`unsafe_reason` is shown with a real directory. Root
is needed: the directories must be root-owned, and /tmp (world-writable) cannot be an
ancestor, so they are made under /run.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.node.keyentries import KeyEntries, UnsafeDirectory, expand, unsafe_reason

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the directories must be root's")
ALICE = Account("alice", 2001, 2001, "/home/alice", "/bin/bash")


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sshd-adopt-unit.", dir="/run"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def entries(base: Path, **changes: str) -> KeyEntries:
    return KeyEntries(str(base / "keys"), str(base / "principals"), **changes)


def test_a_root_owned_directory_is_safe(base: Path) -> None:
    assert unsafe_reason(str(base)) is None


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o1777])
def test_a_directory_group_or_others_can_write_is_unsafe(base: Path, mode: int) -> None:
    base.chmod(mode)
    reason = unsafe_reason(str(base))
    assert reason is not None and "writable by group or others" in reason and str(base) in reason


def test_an_ancestor_others_can_write_makes_it_unsafe(base: Path) -> None:
    inner = base / "keys"
    inner.mkdir(mode=0o755)
    base.chmod(0o777)
    reason = unsafe_reason(str(inner))
    assert reason is not None and reason.startswith(f"{base} ")


def test_a_directory_of_another_owner_is_unsafe(base: Path) -> None:
    os.chown(base, 2001, 0)
    reason = unsafe_reason(str(base))
    assert reason is not None and "owned by uid 2001" in reason


def test_a_symlinked_directory_is_unsafe(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o755)
    (base / "link").symlink_to(real)
    reason = unsafe_reason(str(base / "link"))
    assert reason is not None and "symlink" in reason


def test_prepare_makes_the_directories_root_0755(base: Path) -> None:
    kept = entries(base)
    kept.prepare()
    for name in ("keys", "principals"):
        info = (base / name).stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o755)
    assert kept.problems() == []


def test_prepare_refuses_a_writable_directory_naming_it(base: Path) -> None:
    (base / "keys").mkdir(mode=0o755)
    (base / "keys").chmod(0o777)
    with pytest.raises(UnsafeDirectory, match=f"key entry directory {base}/keys"):
        entries(base).prepare()
    assert any(f"{base}/keys" in p for p in entries(base).problems())


def test_an_entry_points_at_the_users_key_file_from_passwd(base: Path) -> None:
    kept = entries(base)
    kept.prepare()
    assert kept.admit(ALICE)
    assert os.readlink(base / "keys" / "alice") == "/home/alice/.ssh/authorized_keys"
    assert (base / "principals" / "alice").read_text() == "alice\n"
    assert kept.admitted() == frozenset({"alice"})


def test_site_patterns_expand_like_sshds(base: Path) -> None:
    kept = entries(base, keys_file="/etc/ssh/keys/%u.pub", principals_file="%h/.principals")
    kept.prepare()
    kept.admit(ALICE)
    assert os.readlink(base / "keys" / "alice") == "/etc/ssh/keys/alice.pub"
    assert os.readlink(base / "principals" / "alice") == "/home/alice/.principals"
    assert expand("%%u-%u", ALICE) == "/home/alice/%u-alice"


@pytest.mark.parametrize("name", ["../etc", ".new-x", "", "a/b", "x" * 65])
def test_a_name_that_could_be_a_path_or_a_temporary_gets_no_entry(base: Path, name: str) -> None:
    kept = entries(base)
    kept.prepare()
    assert not kept.admit(Account(name, 3000, 3000, "/home/x", "/bin/bash"))
    assert os.listdir(base / "keys") == []


def test_revoke_and_wipe_remove_entries_and_leftovers(base: Path) -> None:
    kept = entries(base)
    kept.prepare()
    kept.admit(ALICE)
    kept.admit(Account("bob", 2002, 2002, "/home/bob", "/bin/bash"))
    (base / "keys" / ".new-leftover").symlink_to("/nowhere")
    kept.revoke("alice")
    assert kept.admitted() == frozenset({"bob"})
    assert not (base / "principals" / "alice").exists()
    assert kept.wipe() == 1
    assert os.listdir(base / "keys") == [] and os.listdir(base / "principals") == []


def test_admitting_again_replaces_a_changed_target_atomically(base: Path) -> None:
    kept = entries(base)
    kept.prepare()
    kept.admit(ALICE)
    moved = Account("alice", 2001, 2001, "/srv/home/alice", "/bin/bash")
    kept.admit(moved)
    assert os.readlink(base / "keys" / "alice") == "/srv/home/alice/.ssh/authorized_keys"
    assert sorted(os.listdir(base / "keys")) == ["alice"]  # no temporary left behind
