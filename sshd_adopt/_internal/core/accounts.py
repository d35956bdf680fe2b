"""Who a uid or a user name is, and their groups: NSS lookups, cached briefly.

Every login asks the passwd and group databases several times (the session's user,
their groups for the exempt rule, their shell for the refusal message). Behind NSS
may be sssd or LDAP, a round trip each time, so answers are kept for a short while
(:data:`TTL`), and a name that does not exist is asked again soon
(:data:`NEGATIVE_TTL`): a directory-service group or user that appears after the
broker started is seen without a reload.
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal.cache import TtlCache

#: Seconds an answer is reused.
TTL: Final = 30.0
#: Seconds a "no such user/group" is reused.
NEGATIVE_TTL: Final = 2.0


@dataclass(frozen=True)
class Account:
    """A user as the passwd database describes them."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> Account:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                   entry.pw_shell or "/bin/sh")


def _ttl(value: object) -> float:
    return NEGATIVE_TTL if value is None else TTL


class Accounts:
    """Cached passwd/group lookups (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._by_uid: TtlCache[int, Account | None] = TtlCache(TTL, clock=clock)
        self._by_name: TtlCache[str, Account | None] = TtlCache(TTL, clock=clock)
        self._groups: TtlCache[tuple[str, int], frozenset[int]] = TtlCache(TTL, clock=clock)
        self._group_ids: TtlCache[str, int | None] = TtlCache(TTL, clock=clock)

    def by_uid(self, uid: int) -> Account | None:
        """The account of ``uid``, or None when passwd has no entry for it."""
        return self._by_uid.get_or_compute(uid, lambda: _lookup(lambda: pwd.getpwuid(uid)),
                                           ttl=_ttl)

    def by_name(self, name: str) -> Account | None:
        """The account named ``name``, or None."""
        return self._by_name.get_or_compute(name, lambda: _lookup(lambda: pwd.getpwnam(name)),
                                            ttl=_ttl)

    def groups_of(self, account: Account) -> frozenset[int]:
        """Every gid ``account`` is a member of, its primary group included."""
        return self._groups.get_or_compute(
            (account.name, account.gid),
            lambda: frozenset(os.getgrouplist(account.name, account.gid)))

    def group_id(self, name: str) -> int | None:
        """The gid of group ``name``, or None when there is no such group (yet)."""
        def lookup() -> int | None:
            try:
                return grp.getgrnam(name).gr_gid
            except KeyError:
                return None

        return self._group_ids.get_or_compute(name, lookup, ttl=_ttl)


def _lookup(entry: Callable[[], pwd.struct_passwd]) -> Account | None:
    try:
        return Account.of(entry())
    except (KeyError, OverflowError, TypeError):
        return None
