"""The broker-kept entries sshd reads: one per user who may enter this node now.

The managed ``Match`` block says ``AuthorizedKeysFile <keys dir>/%u`` and
``AuthorizedPrincipalsFile <principals dir>/%u``. An entry exists exactly while its
user may enter: the key entry is a symlink to the user's own key file (the target
from passwd, never from the user), which sshd opens itself, as the user, with its own
StrictModes checks; the principals entry is a root-owned file naming the user (what
sshd accepts by default), or a symlink to the site's principals file. No entry: sshd
finds no key and no principal, and falls through to the AuthorizedKeysCommand.

sshd checks the *target's* directories only (``safe_path`` works on the real path), so
the entry directories themselves are the boundary: root-owned, every directory up to
``/`` not writable by group or others, or anyone could plant an entry. The broker
refuses to start otherwise (:class:`UnsafeDirectory` names the directory), and doctor
checks it. Entries are created atomically (a temporary name, then ``rename``), and all
are wiped when the broker starts and stops, and by its guardian when it dies.

Beside them, the present list (``present_file``): the names of the users with a job
here now, one per line, for the keyless profile's PAM service (``pam_listfile`` in
sshd's account phase: a login by hostbased or GSSAPI authentication meets no entry).
It is replaced whole at each change and removed with the entries: no file, nobody
passes (``onerr=fail``).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import uuid
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal.core.accounts import Account
from sshd_adopt.errors import Error

_TEMP_PREFIX: Final = ".new-"
#: Names an entry may have: a user name that cannot be a temporary file or a path.
_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@$-]{0,63}")


class UnsafeDirectory(Error):
    """An entry directory (or one above it) is not root's alone: entries could be planted."""


def expand(pattern: str, account: Account) -> str:
    """``%h``, ``%u`` and ``%%`` in an sshd-style path, relative paths from the home."""
    path = (pattern.replace("%%", "\0").replace("%h", account.home)
            .replace("%u", account.name).replace("\0", "%"))
    return path if path.startswith("/") else os.path.join(account.home, path)


def unsafe_reason(directory: str) -> str | None:
    """Why ``directory`` cannot hold entries (None when it can): owner, modes, symlinks.

    Every component from ``/`` down must be a root-owned directory, not a symlink, and
    not writable by group or others.
    """
    path = os.path.abspath(directory)
    parts = [p for p in path.split("/") if p]
    current = "/"
    for part in [None, *parts]:
        if part is not None:
            current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except OSError as err:
            return f"{current}: {err.strerror}"
        if stat.S_ISLNK(info.st_mode):
            return f"{current} is a symlink"
        if not stat.S_ISDIR(info.st_mode):
            return f"{current} is not a directory"
        if info.st_uid != 0:
            return f"{current} is owned by uid {info.st_uid}, not root"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{current} is writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o})")
    return None


@dataclass(frozen=True)
class KeyEntries:
    """The two entry directories and what an entry points at.

    ``keys_file`` and ``principals_file`` are sshd-style patterns (``%h``, ``%u``;
    relative to the home). An empty ``principals_file`` means the entry names the user
    (sshd's own rule without an AuthorizedPrincipalsFile). ``present_file``: the present
    list's path (empty: none is kept).
    """

    keys_dir: str
    principals_dir: str
    keys_file: str = ".ssh/authorized_keys"
    principals_file: str = ""
    present_file: str = ""

    def prepare(self) -> None:
        """Create the directories if missing (0755, root) and check them.

        Raises :class:`UnsafeDirectory` naming the directory at fault.
        """
        for directory in (self.keys_dir, self.principals_dir):
            parent = os.path.dirname(os.path.abspath(directory))
            os.makedirs(parent, mode=0o755, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                if unsafe_reason(parent) is None:
                    os.mkdir(directory, 0o755)
            problem = unsafe_reason(directory)
            if problem is not None:
                raise UnsafeDirectory(
                    f"key entry directory {directory} is not root's alone: {problem} "
                    "(anyone who can write there could let any user in); make it and every "
                    "directory above it root-owned and not group- or world-writable "
                    "(chown root:root, chmod 0755)")

    def problems(self) -> list[str]:
        """What is wrong with the directories now, one line each (for doctor)."""
        return [f"{d}: {why}" for d in (self.keys_dir, self.principals_dir)
                if (why := unsafe_reason(d)) is not None]

    def admit(self, account: Account) -> bool:
        """Create (or refresh) ``account``'s entries; False for a name that cannot have one."""
        if not _NAME.fullmatch(account.name):
            return False
        _replace_with_link(self.keys_dir, account.name, expand(self.keys_file, account))
        if self.principals_file:
            _replace_with_link(self.principals_dir, account.name,
                               expand(self.principals_file, account))
        else:
            _replace_with_file(self.principals_dir, account.name, f"{account.name}\n")
        return True

    def revoke(self, name: str) -> None:
        """Remove ``name``'s entries (nothing happens when there are none)."""
        if _NAME.fullmatch(name):
            for directory in (self.keys_dir, self.principals_dir):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))

    def admitted(self) -> frozenset[str]:
        """The names that have a key entry now."""
        try:
            names = os.listdir(self.keys_dir)
        except FileNotFoundError:
            return frozenset()
        return frozenset(name for name in names if _NAME.fullmatch(name))

    def write_present(self, names: frozenset[str]) -> None:
        """Replace the present list with ``names`` (those that can be entries; sorted)."""
        if not self.present_file:
            return
        directory, name = os.path.split(self.present_file)
        text = "".join(f"{n}\n" for n in sorted(names) if _NAME.fullmatch(n))
        _replace_with_file(directory, name, text, force=True)

    def wipe(self) -> int:
        """Remove every entry (and leftover temporaries) and the present list; returns how
        many keys entries went."""
        if self.present_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.present_file)
        removed = 0
        for directory in (self.keys_dir, self.principals_dir):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    if not os.path.isdir(path) or os.path.islink(path):
                        os.unlink(path)
                        removed += directory == self.keys_dir and not name.startswith(
                            _TEMP_PREFIX)
        return removed


def _temp(directory: str) -> str:
    return os.path.join(directory, f"{_TEMP_PREFIX}{uuid.uuid4().hex}")


def _replace_with_link(directory: str, name: str, target: str) -> None:
    final = os.path.join(directory, name)
    with contextlib.suppress(OSError):
        if os.readlink(final) == target:
            return
    temp = _temp(directory)
    os.symlink(target, temp)
    try:
        os.replace(temp, final)
    except OSError:
        os.unlink(temp)
        raise


def _replace_with_file(directory: str, name: str, text: str, *, force: bool = False) -> None:
    final = os.path.join(directory, name)
    with contextlib.suppress(OSError), open(final, encoding="utf-8") as existing:
        if not force and not os.path.islink(final) and existing.read(4096) == text:
            return
    temp = _temp(directory)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    try:
        os.replace(temp, final)
    except OSError:
        os.unlink(temp)
        raise
