"""The auth-time gate: may this user enter this node through this connection?

sshd runs ``sshd-adopt-keys %u`` as its ``AuthorizedKeysCommand``, as the
unprivileged ``AuthorizedKeysCommandUser``, forked by the connection's root
``[priv]`` monitor while the user is still authenticating. That is the only
stage of a login the user cannot influence (no rc file, no environment, no
forced command has run yet), and it also covers connections that never run a
command (``ssh -N -L``). The client sends the user name, nothing else.

What the broker checks before answering (observed on OpenSSH 9.2, UsePAM no,
while the command runs)::

    sshd listener            real uid 0, exe = system sshd
    └─ sshd: alice [priv]    real uid 0, *effective* uid = the gate user
       └─ sshd-adopt-keys    real and effective uid = the gate user  (the peer)

* the peer runs as the configured gate user (so an ordinary user cannot ask),
  and descends, through at most a few gate-user processes, from a root
  process that is a genuine system sshd titled ``sshd: <user> [priv]`` whose
  effective uid is the gate user's (it is running the command right now) and
  whose parent is a root sshd (the listener);
* the monitor lives in this broker's network namespace (several nodes' sshds
  can share one kernel, as in the lab: a node answers only for itself);
* the user named in the request is the monitor's user.

Then the same decision as for an adoption (no jobs → deny, …), without the
callerid RPC: the client has proved nothing yet, and that RPC sends a
credential to another host, so a user with several jobs may enter and the
source job is asked after authentication. Nothing is adopted either: anyone can
start an authentication as any user, so adopting here would let anyone charge
(or kill processes into) someone else's job. Adoption happens after
authentication, by the wrapper or the sweeper.

If the user may enter, the reply carries their keys from the site's source:
a chained command run with the gate user's privileges (never as root), or the
``authorized_keys`` files read by the broker with sshd's StrictModes rules.
sshd runs the command twice per publickey login (key query, then signature),
so a decision is cached per monitor for a few seconds.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sshd_adopt._internal import protocol
from sshd_adopt._internal.config import GateSettings
from sshd_adopt._internal.core import decision as dec
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.procfs import ProcInfo
from sshd_adopt._internal.services.adoption import BrokerState, Peer, Where, decide_connection
from sshd_adopt.errors import Error, NotAnSshSession, ProcError

#: How many gate-user processes may sit between the monitor and the peer
#: (a site's shell wrapper around ``sshd-adopt-keys``, ``timeout``, ...).
MAX_GATE_CHAIN = 3
#: How long one monitor's decision is reused (sshd asks twice per login).
DECISION_TTL = 10.0
_MAX_CACHE = 4096
_TITLE_PREFIXES = ("sshd: ", "sshd-session: ", "sshd-auth: ")


@dataclass(frozen=True)
class GateContext:
    """The verified connection a "keys" request belongs to."""

    user: str
    uid: int
    monitor: ProcInfo
    connection: Connection | None


def own_netns() -> str:
    """This process's network namespace, e.g. ``net:[4026531840]``."""
    return os.readlink("/proc/self/ns/net")


def netns_of(pid: int) -> str | None:
    """The network namespace of ``pid`` (None if it vanished)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _genuine_sshd(info: ProcInfo, executables: frozenset[str], role: str) -> None:
    if info.real_uid != 0:
        raise NotAnSshSession(f"{role} {info.pid} does not run as root")
    if info.exe is None or info.exe.endswith(" (deleted)") or info.exe not in executables:
        raise NotAnSshSession(f"{role} {info.pid}: {info.exe!r} is not a system sshd")


def verify_gate_peer(
    peer: Peer, user: str, *, gate_uid: int, executables: frozenset[str], netns: str
) -> GateContext:
    """Check that ``peer`` is sshd's AuthorizedKeysCommand for ``user`` on this node.

    Raises NotAnSshSession with the reason, or ProcError if a process vanished.
    """
    if peer.uid != gate_uid:
        raise NotAnSshSession(f"peer uid {peer.uid} is not the gate user's ({gate_uid})")
    try:
        entry = pwd.getpwnam(user)
    except KeyError as err:
        raise NotAnSshSession(f"user {user!r} has no passwd entry") from err
    current = procfs.proc_info(peer.pid)
    if current.real_uid != gate_uid or current.effective_uid != gate_uid:
        raise NotAnSshSession(f"peer {peer.pid} does not run as the gate user")
    if current.exe in executables:
        raise NotAnSshSession(f"peer {peer.pid} is itself an sshd")
    for _ in range(MAX_GATE_CHAIN + 1):
        parent = procfs.proc_info(current.ppid)
        if parent.real_uid == 0:
            break
        if parent.real_uid != gate_uid:
            raise NotAnSshSession(f"ancestor {parent.pid} of {peer.pid} is not the gate user's")
        current = parent
    else:
        raise NotAnSshSession(f"no root sshd within {MAX_GATE_CHAIN} ancestors of {peer.pid}")
    monitor = parent
    _genuine_sshd(monitor, executables, "monitor")
    title = " ".join(monitor.cmdline).strip()  # setproctitle pads with spaces
    if not any(title == f"{prefix}{user} [priv]" for prefix in _TITLE_PREFIXES):
        raise NotAnSshSession(f"monitor {monitor.pid} is titled {title!r}, not {user} [priv]")
    # While sshd runs the command, the monitor's effective uid is the command
    # user's: a monitor that is not doing that right now did not start us.
    if monitor.effective_uid != gate_uid:
        raise NotAnSshSession(f"monitor {monitor.pid} is not running an AuthorizedKeysCommand")
    listener = procfs.proc_info(monitor.ppid)
    _genuine_sshd(listener, executables, "listener")
    if netns_of(monitor.pid) != netns:
        raise NotAnSshSession(f"monitor {monitor.pid} belongs to another node (network namespace)")
    connection = procfs.connection_of(monitor.pid)
    if not procfs.still_running(monitor.pid, monitor.start_time):
        raise NotAnSshSession(f"monitor {monitor.pid} changed while being verified")
    return GateContext(user=user, uid=entry.pw_uid, monitor=monitor, connection=connection)


class GateService:
    """Serve "keys" requests; one per broker, called from worker threads."""

    def __init__(self, state: Callable[[], BrokerState]) -> None:
        self._state = state
        self._netns = own_netns()
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, float, str], tuple[float, bool, str]] = {}

    def handle_keys(self, peer: Peer, user: str) -> dict[str, str]:
        """Answer one ``sshd-adopt-keys``: the user's keys, or a refusal (no keys)."""
        started = time.monotonic()
        state = self._state()
        gate = state.config.gate
        log = logger()
        try:
            gate_uid = pwd.getpwnam(gate.user).pw_uid
        except KeyError:
            log.error("gate: gate user %r does not exist; refusing every key request", gate.user)
            return protocol.reply(protocol.DENIED, message="gate user missing")
        try:
            ctx = verify_gate_peer(
                peer, user, gate_uid=gate_uid,
                executables=frozenset(state.config.slurm.sshd_executables), netns=self._netns,
            )
        except (NotAnSshSession, ProcError) as err:
            log.warning("gate: refused keys request from pid %d uid %d for %r: %s",
                        peer.pid, peer.uid, user, err)
            return protocol.reply(protocol.DENIED, message="not sshd's AuthorizedKeysCommand")
        allowed, reason = self._may_enter(state, ctx)
        elapsed = (time.monotonic() - started) * 1000
        if not allowed and gate.on_deny == "refuse":
            log.info("gate: user=%s from=%s monitor=%d outcome=deny reason=%r time=%.1fms",
                     user, ctx.connection or "?", ctx.monitor.pid, reason, elapsed)
            return protocol.reply(protocol.DENIED, message=reason)
        try:
            keys = read_keys(ctx, gate, gate_uid)
        except Error as err:
            log.error("gate: user=%s: no keys: %s", user, err)
            return protocol.reply(protocol.FAILED, message=str(err))
        outcome = "keys"
        if not allowed:
            # on_deny=restrict: let authentication succeed with keys that allow
            # nothing but the forced command, so the wrapper can tell the user
            # why (sshd shows no text from an AuthorizedKeysCommand).
            keys = restrict_keys(keys)
            outcome = "restricted-keys"
        log.info("gate: user=%s from=%s monitor=%d outcome=%s reason=%r keys=%d time=%.1fms",
                 user, ctx.connection or "?", ctx.monitor.pid, outcome, reason,
                 sum(1 for line in keys.splitlines() if line.strip()),
                 (time.monotonic() - started) * 1000)
        return protocol.reply(protocol.KEYS, keys=keys)

    def _may_enter(self, state: BrokerState, ctx: GateContext) -> tuple[bool, str]:
        """The adoption decision without the adoption; cached per monitor."""
        key = (ctx.monitor.pid, ctx.monitor.start_time, ctx.user)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1], hit[2] + " (cached)"
        allowed, reason = self._decide(state, ctx)
        with self._lock:
            if len(self._cache) >= _MAX_CACHE:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= _MAX_CACHE:
                    self._cache.clear()
            self._cache[key] = (now + DECISION_TTL, allowed, reason)
        return allowed, reason

    def _decide(self, state: BrokerState, ctx: GateContext) -> tuple[bool, str]:
        if ctx.uid == 0:
            return True, "root is never refused"
        if state.config.exempt.covers(pwd.getpwnam(ctx.user)):
            return True, "exempt user"
        options = state.config.options
        # Before authentication nothing leaves the node: no callerid. A user
        # with several jobs here may enter; which job (or a per-connection
        # refusal) is decided after authentication.
        _, decision = decide_connection(
            state, options, Where.of(state, options), user=ctx.user, uid=ctx.uid,
            connection=ctx.connection, ask_source=False,
        )
        if isinstance(decision, dec.Deny):
            return False, decision.reason
        if isinstance(decision, dec.AskCallerId):
            return True, f"{decision.reason}; the source job is asked after authentication"
        return True, decision.reason


# --------------------------------------------------------------------------- key sources


def restrict_keys(keys: str) -> str:
    """Put ``restrict`` in front of every key line (authorized_keys(5) options).

    A line that already has options gets ``restrict,`` prepended: options are
    additive and ``restrict`` turns off forwarding, the agent, X11, the pty
    and ~/.ssh/rc, whatever else the line permits. Comments and blank lines
    are dropped.
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



def read_keys(ctx: GateContext, gate: GateSettings, gate_uid: int) -> str:
    """The user's keys from the configured source, bounded in size and time."""
    if gate.keys_command.strip():
        return run_keys_command(gate, ctx.user, gate_uid)
    entry = pwd.getpwnam(ctx.user)
    texts: list[str] = []
    budget = gate.max_keys_bytes
    for pattern in gate.keys_files:
        path = pattern.replace("%h", entry.pw_dir).replace("%u", ctx.user).replace("%%", "%")
        if not path.startswith("/"):
            path = os.path.join(entry.pw_dir, path)
        text = read_authorized_keys(path, entry, budget)
        if text:
            texts.append(text if text.endswith("\n") else text + "\n")
            budget -= len(text)
    return "".join(texts)


def run_keys_command(gate: GateSettings, user: str, gate_uid: int) -> str:
    """Run the site's key command with the gate user's privileges, bounded by ``gate.timeout``.

    Never as root: the command is typically a directory-service client
    (``sss_ssh_authorizedkeys``) that parses data from the network.
    """
    argv = [word.replace("%u", user) for word in shlex.split(gate.keys_command)]
    if not argv or not argv[0].startswith("/"):
        raise Error(f"gate.keys_command {gate.keys_command!r} must start with an absolute path")
    gate_gid = pwd.getpwuid(gate_uid).pw_gid
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=gate.timeout,
            user=gate_uid, group=gate_gid, extra_groups=[], check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}, cwd="/",
        )
    except subprocess.TimeoutExpired as err:
        raise Error(f"keys command timed out after {gate.timeout:g}s") from err
    except OSError as err:
        raise Error(f"keys command failed to start: {err}") from err
    if proc.returncode != 0:
        raise Error(f"keys command exited with status {proc.returncode}")
    if len(proc.stdout) > gate.max_keys_bytes:
        raise Error(f"keys command printed more than {gate.max_keys_bytes} bytes")
    return proc.stdout.decode("utf-8", "replace").replace("\0", "")


def _insecure(info: os.stat_result, uid: int) -> bool:
    """sshd's StrictModes test for one path component."""
    return (info.st_uid not in (0, uid)) or bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def read_authorized_keys(path: str, entry: pwd.struct_passwd, limit: int) -> str:
    """Read one authorized_keys file as root with sshd's StrictModes rules ("" if absent).

    The file must be a regular file (no symlink at its last component),
    owned by the user or root and not group/world-writable, and so must every
    directory from it up to the user's home. A root-owned file must also be
    world-readable, so that the root broker never hands out a file the user
    could not read (a symlinked directory pointing at /etc/shadow, say).
    """
    uid = entry.pw_uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as err:
        logger().warning("gate: %s: not read: %s", path, err)
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            logger().warning("gate: %s: not a regular file", path)
            return ""
        if _insecure(info, uid) or (info.st_uid == 0 and not info.st_mode & stat.S_IROTH):
            logger().warning("gate: %s: bad ownership or modes (StrictModes)", path)
            return ""
        real = os.path.realpath(path)
        home = os.path.realpath(entry.pw_dir)
        directory = os.path.dirname(real)
        while True:
            if _insecure(os.stat(directory), uid):
                logger().warning("gate: %s: bad ownership or modes of %s (StrictModes)",
                                 path, directory)
                return ""
            if directory in (home, "/"):
                break
            directory = os.path.dirname(directory)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        logger().warning("gate: %s: larger than %d bytes; ignored", path, limit)
        return ""
    return data.decode("utf-8", "replace").replace("\0", "")
