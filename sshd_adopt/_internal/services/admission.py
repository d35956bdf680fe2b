"""Admission at authentication: who may enter this node, decided before any session exists.

Two ways in, both decided here:

**Key entries (the default, no process).** The managed ``Match`` block's
``AuthorizedKeysFile``/``AuthorizedPrincipalsFile`` name per-user entries that exist
exactly while the user may enter (:mod:`sshd_adopt._internal.node.keyentries`): sshd
reads the user's own key file itself, as the user. :class:`Admission` keeps them by
the job table's changes (a user's first job here creates them, the last one's end
removes them) and rebuilds them from scratch at every start.

**The command gate (the fallback).** ``sshd-adopt-keys %u``, sshd's
AuthorizedKeysCommand, runs when no entry matched: a job that started a moment ago, a
site whose keys come from a command (``sss_ssh_authorizedkeys``), a user who is to be
told why not. :meth:`Admission.keys` verifies that the peer really is sshd's command
for that user on this node (:func:`~sshd_adopt._internal.node.sessions.verify_gate_peer`),
decides with the login core -- without the callerid RPC: nothing leaves the node
before sshd has authenticated the connection, so a user with several jobs may enter
and the job, or a per-connection refusal, is decided afterwards -- and answers with
the user's keys (read as the user, or from the site's command run as the command
user), with ``restrict``-ed keys so that the wrapper can say why (users whose shell
runs no code of theirs before it), or with nothing (refused at authentication).

Nothing is adopted here: anyone can start an authentication as anyone.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sshd_adopt._internal import run
from sshd_adopt._internal.cache import TtlCache
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.login import LoginCore
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node.keyentries import KeyEntries, expand
from sshd_adopt._internal.node.keyfiles import KeyFileError, read_as_user
from sshd_adopt._internal.node.sessions import GateContext, verify_gate_peer
from sshd_adopt.errors import Error, NotAnSshSession, ProcError

#: How long one monitor's verdict is reused (sshd runs the command twice per login).
VERDICT_TTL = 10.0


@dataclass(frozen=True)
class Keys:
    """Let the user authenticate with these keys (``restricted``: only to be told why not)."""

    text: str
    restricted: bool
    reason: str


@dataclass(frozen=True)
class Refused:
    """No keys: authentication fails ("Permission denied (publickey)")."""

    reason: str


KeysOutcome = Keys | Refused


def entries_of(state: BrokerState) -> KeyEntries:
    """The entry directories and targets the configuration names."""
    admission = state.config.admission
    return KeyEntries(admission.keys_dir, admission.principals_dir, admission.keys_file,
                      admission.principals_file, admission.present_file)


def restrict_keys(keys: str) -> str:
    """Put ``restrict`` in front of every key line (authorized_keys(5) options).

    A line that already has options gets ``restrict,`` prepended: options are
    additive and ``restrict`` turns off forwarding, the agent, X11, the pty and
    ``~/.ssh/rc``, whatever else the line permits. Comments and blank lines go.
    """
    lines = []
    for line in keys.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        first = text.split(None, 1)[0]
        if first.startswith(("ssh-", "ecdsa-", "sk-")):
            lines.append(f"restrict {text}")
        else:
            lines.append(f"restrict,{text}")
    return "\n".join(lines) + ("\n" if lines else "")


class Admission:
    """Key entries kept by the node's jobs, and the command gate (thread-safe)."""

    def __init__(self, state: Callable[[], BrokerState], core: LoginCore, netns: str) -> None:
        self._state = state
        self._core = core
        self._netns = netns
        self._verdicts: TtlCache[tuple[int, float, str], tuple[bool, str]] = TtlCache(VERDICT_TTL)
        self._lock = threading.Lock()
        self._present: frozenset[str] = frozenset()  # users with a job here (present list)

    # ------------------------------------------------------------------ key entries

    def uses_entries(self) -> bool:
        """Whether users are admitted by entries (not when keys come from a command)."""
        return not self._state().config.admission.keys_command.strip()

    def jobs_changed(self, uid: int, has_jobs: bool) -> None:
        """The job table's news: ``uid`` got its first job here, or lost its last."""
        account = self._core.accounts.by_uid(uid)
        if account is None:
            return
        entries = entries_of(self._state())
        name = account.name
        self._update_present(entries, lambda present: present | {name} if has_jobs
                             else present - {name})
        if not self.uses_entries():
            return
        try:
            if has_jobs:
                if entries.admit(account):
                    logger().info("admission: %s may enter (first job here): entry made",
                                  account.name)
            else:
                entries.revoke(account.name)
                logger().info("admission: %s may no longer enter (no job here): entry removed",
                              account.name)
        except OSError as err:
            logger().error("admission: entry of %s: %s", account.name, err)

    def rebuild(self, uids: frozenset[int]) -> int:
        """Wipe every entry and make those of ``uids`` again; returns how many were made."""
        entries = entries_of(self._state())
        entries.prepare()
        entries.wipe()
        accounts = [a for uid in sorted(uids) if (a := self._core.accounts.by_uid(uid))]
        self._update_present(entries, lambda _: frozenset(a.name for a in accounts))
        if not self.uses_entries():
            return 0
        return sum(1 for account in accounts if entries.admit(account))

    def _update_present(self, entries: KeyEntries,
                        change: Callable[[frozenset[str]], frozenset[str]]) -> None:
        """Change the present list and write it (one writer at a time: the file written
        last holds the newest list)."""
        with self._lock:
            self._present = change(self._present)
            try:
                entries.write_present(self._present)
            except OSError as err:
                logger().error("admission: present list %s: %s", entries.present_file, err)

    def wipe(self) -> None:
        """Remove every entry and the present list (the broker is stopping: nobody may
        enter by them)."""
        with self._lock:
            self._present = frozenset()
            entries_of(self._state()).wipe()

    # ------------------------------------------------------------------ the command gate

    def keys(self, peer_pid: int, peer_uid: int, user: str) -> KeysOutcome:
        """Answer one ``sshd-adopt-keys USER``: the keys to accept, or none."""
        started = time.monotonic()
        state = self._state()
        settings = state.config.admission
        command_user = self._core.accounts.by_name(settings.command_user)
        if command_user is None:
            logger().error("gate: AuthorizedKeysCommandUser %r does not exist; refusing "
                           "every key request", settings.command_user)
            return Refused("the command user does not exist")
        try:
            ctx = verify_gate_peer(peer_pid, peer_uid, user, gate_uid=command_user.uid,
                                   executables=frozenset(state.config.sshd.executables),
                                   netns=self._netns)
        except (NotAnSshSession, ProcError) as err:
            logger().warning("gate: refused keys request from pid %d uid %d for %r: %s",
                             peer_pid, peer_uid, user, err)
            return Refused("not sshd's AuthorizedKeysCommand")
        account = self._core.accounts.by_name(user)
        if account is None:
            return Refused("no such user")
        allowed, reason = self._verdicts.get_or_compute(
            (ctx.monitor.pid, ctx.monitor.start_time, user), lambda: self._may_enter(account, ctx))
        outcome = self._answer(account, ctx, command_user, allowed, reason)
        logger().info(
            "gate: user=%s from=%s monitor=%d outcome=%s reason=%r keys=%d time=%.1fms",
            user, ctx.connection or "?", ctx.monitor.pid,
            "refuse" if isinstance(outcome, Refused) else
            "restricted-keys" if outcome.restricted else "keys",
            outcome.reason, 0 if isinstance(outcome, Refused) else
            sum(1 for line in outcome.text.splitlines() if line.strip()),
            (time.monotonic() - started) * 1000)
        return outcome

    def _may_enter(self, account: Account, ctx: GateContext) -> tuple[bool, str]:
        """The login core's decision, without the source job (nothing leaves before auth)."""
        state = self._state()
        facts, decision = self._core.gather(account, ctx.connection, state.config.options,
                                            ask_source=False)
        if isinstance(decision, dec.Deny):
            return False, decision.reason
        if facts.jobs and self.uses_entries():
            # A job the entries have not caught up with yet (it started a moment ago):
            # the next login of this user needs no command.
            try:
                entries_of(state).admit(account)
            except OSError as err:
                logger().error("admission: entry of %s: %s", account.name, err)
        if isinstance(decision, dec.AskCallerId):
            return True, f"{decision.reason}; the source job is asked after authentication"
        return True, decision.reason

    def _answer(self, account: Account, ctx: GateContext, command_user: Account,
                allowed: bool, reason: str) -> KeysOutcome:
        settings = self._state().config.admission
        tell = settings.on_deny == "message" and (
            os.path.basename(account.shell) in settings.message_shells)
        if not allowed and not tell:
            return Refused(reason)
        try:
            keys = self._read_keys(account, command_user)
        except Error as err:
            logger().error("gate: user=%s: no keys: %s", account.name, err)
            return Refused(f"no keys: {err}")
        if allowed:
            return Keys(keys, False, reason)
        return Keys(restrict_keys(keys), True, reason)

    def _read_keys(self, account: Account, command_user: Account) -> str:
        """The user's keys: the site's command (as the command user), else their key file."""
        settings = self._state().config.admission
        if settings.keys_command.strip():
            return run_keys_command(settings.keys_command, account.name, command_user,
                                    timeout=settings.timeout, limit=settings.max_keys_bytes)
        try:
            return read_as_user(account, expand(settings.keys_file, account),
                                limit=settings.max_keys_bytes, timeout=settings.timeout)
        except KeyFileError as err:
            logger().warning("gate: %s", err)
            return ""


def run_keys_command(command: str, user: str, as_user: Account, *, timeout: float,
                     limit: int) -> str:
    """Run the site's keys command as ``as_user`` (never root), bounded in time and size.

    The command is typically a directory-service client (``sss_ssh_authorizedkeys``)
    parsing data from the network. Raises :class:`~sshd_adopt.errors.Error` on failure.
    """
    argv = [word.replace("%u", user) for word in shlex.split(command)]
    if not argv or not argv[0].startswith("/"):
        raise Error(f"admission.keys_command {command!r} must start with an absolute path")
    try:
        done = run.run(argv, timeout=timeout, max_output=limit,
                       as_user=run.Identity(as_user.uid, as_user.gid))
    except run.ToolError as err:
        raise Error(f"keys command: {err}") from err
    if done.returncode != 0:
        raise Error(f"keys command exited with status {done.returncode}")
    return done.text().replace("\0", "")
