"""Fakes of the node for unit tests of the login core and the services.

The services reach the node only through the ports of ``core/ports.py`` and a handful of
node modules; these stand-ins answer from tables a test fills in, and record what was
asked of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sshd_adopt._internal.config import Config
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import CallerIdAnswer, CallerIdOutcome, LocalJob
from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.slurm.facts import SlurmFacts
from sshd_adopt.errors import StepdError

ALICE = Account("alice", 2001, 2001, "/home/alice", "/bin/bash")
BOB = Account("bob", 2002, 2002, "/home/bob", "/bin/bash")
DAVE = Account("dave", 2004, 2004, "/home/dave", "/usr/bin/zsh")
CAROL = Account("carol", 2003, 2003, "/home/carol", "/bin/bash")
ROOT = Account("root", 0, 0, "/root", "/bin/bash")


def slurm_facts(**changes: object) -> SlurmFacts:
    """Facts of a plain node n1 with its spool dir in /var/spool/slurmd."""
    facts = SlurmFacts(
        conf_path="/etc/slurm/slurm.conf", cluster_name="lab", nodename="n1",
        node_hostname="n1", node_addr="10.0.0.11", spool_dir="/var/spool/slurmd",
        slurmd_port=6818, slurm_user="slurm", slurm_user_uid=64030,
        prolog_flags=frozenset({"contain"}), proctrack_type="proctrack/cgroup",
        task_plugins=("task/cgroup",), version="22.05.8", protocol_version=0x2600)
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def broker_state(config: Config | None = None, *, slurm: SlurmFacts | bool | None = True,
                 ) -> BrokerState:
    """A broker state: default configuration, node n1 (``slurm=False``: slurm.conf unread)."""
    facts = slurm_facts() if slurm is True else None if slurm is False else slurm
    return BrokerState(config or Config(path="/etc/sshd-adopt/sshd-adopt.toml"),
                       facts if isinstance(facts, SlurmFacts) else None)


class FakeAccounts:
    """Accounts from a table; groups by account name."""

    def __init__(self, *accounts: Account, groups: Mapping[str, set[int]] | None = None,
                 group_ids: Mapping[str, int] | None = None) -> None:
        self.table = {a.name: a for a in accounts}
        self.groups = {name: set(gids) for name, gids in (groups or {}).items()}
        self.group_ids = dict(group_ids or {})

    def by_uid(self, uid: int) -> Account | None:
        return next((a for a in self.table.values() if a.uid == uid), None)

    def by_name(self, name: str) -> Account | None:
        return self.table.get(name)

    def groups_of(self, account: Account) -> frozenset[int]:
        return frozenset(self.groups.get(account.name, set()) | {account.gid})

    def group_id(self, name: str) -> int | None:
        return self.group_ids.get(name)


@dataclass
class FakeJobs:
    """The node's extern steps: uid -> jobs."""

    by_uid: dict[int, tuple[LocalJob, ...]] = field(default_factory=dict)
    asked: list[int] = field(default_factory=list)

    def jobs_of(self, uid: int) -> tuple[LocalJob, ...]:
        self.asked.append(uid)
        return self.by_uid.get(uid, ())


@dataclass
class FakeSource:
    """The callerid RPC: one answer for every connection; records who asked."""

    answer: CallerIdAnswer = field(
        default_factory=lambda: CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "native"))
    asked: list[tuple[str, Connection | None]] = field(default_factory=list)

    def ask(self, account: Account, connection: Connection | None) -> CallerIdAnswer:
        self.asked.append((account.name, connection))
        return self.answer


@dataclass
class FakeSteps:
    """Extern steps: job -> owner uid; jobs in ``broken`` fail like a gone stepd."""

    owners: dict[int, int] = field(default_factory=dict)
    broken: set[int] = field(default_factory=set)
    joined: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list)
    x11: dict[int, str] = field(default_factory=dict)

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool) -> Joined:
        if job in self.broken:
            raise StepdError(f"job {job}: stepd gone")
        if self.owners.get(job) != uid:
            raise StepdError(f"job {job} belongs to uid {self.owners.get(job)}, not {uid}")
        self.joined.append((job, uid, tuple(pids)))
        env = {"SLURM_JOB_ID": str(job)}
        if want_x11 and job in self.x11:
            env["DISPLAY"] = self.x11[job]
        return Joined(tuple(pids), env)
