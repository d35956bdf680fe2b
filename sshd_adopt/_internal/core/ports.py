"""What the login core asks of the node, as small typed interfaces.

The core decides; these ports fetch its facts and carry out its adoptions. The broker
plugs in the real implementations (the event-kept job table, the callerid RPC, the
stepd client); unit tests plug in fakes, so the rules are tested in milliseconds
without a node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import CallerIdAnswer, LocalJob
from sshd_adopt._internal.core.outcomes import Adopted


class AccountSource(Protocol):
    """Who a uid or name is, and their groups (NSS, cached: :class:`~.accounts.Accounts`)."""

    def by_uid(self, uid: int) -> Account | None: ...

    def by_name(self, name: str) -> Account | None: ...

    def groups_of(self, account: Account) -> frozenset[int]: ...

    def group_id(self, name: str) -> int | None: ...


class JobSource(Protocol):
    """The jobs with a live extern step on this node."""

    def jobs_of(self, uid: int) -> tuple[LocalJob, ...]:
        """``uid``'s jobs here, sorted by job id (never another user's, never a dead step)."""
        ...


class SourceJob(Protocol):
    """Which job the other end of a connection runs in (the callerid RPC)."""

    def ask(self, account: Account, connection: Connection | None) -> CallerIdAnswer:
        """Ask, as ``account``; never raises: every failure is an outcome."""
        ...


@dataclass(frozen=True)
class Joined:
    """What joining an extern step did: the pids now in it, what the session exports, and
    whether the job has namespaces of its own (its session must then be started inside
    them: :mod:`sshd_adopt._internal.services.spawning`)."""

    adopted: tuple[int, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    namespaces: bool = False


class ExternSteps(Protocol):
    """Adoption into a job's extern step, through its slurmstepd."""

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool) -> Joined:
        """Add ``pids`` (the first must succeed) to ``job``'s extern step.

        Raises :class:`~sshd_adopt.errors.StepdError` when the step is gone, hung, not
        ``uid``'s, or refuses the first pid (a process that is gone is refused too).
        """
        ...


class Tickets(Protocol):
    """Where the wrapper of a connection adopted early finds its answer without asking
    (the broker's ticket desk over :mod:`sshd_adopt._internal.broker.tickets`)."""

    def issue(self, monitor_pid: int, account: Account, outcome: Adopted) -> None:
        """Leave ``outcome`` for the wrapper of ``monitor_pid``'s connection, readable by
        ``account`` alone; never raises."""
        ...

    def revoke(self, monitor_pid: int) -> None:
        """The connection is gone: remove its ticket; never raises."""
        ...
