"""The broker's server: a unix socket, SO_PEERCRED, one dispatch table, bounded everything.

The server speaks the wire format (:mod:`sshd_adopt._internal.protocol`): it reads one
bounded request, looks its kind up in :data:`REQUESTS` (what may be asked, how long
the answer may take, how large it may be), runs the service on a worker thread, and
turns the service's typed outcome into the reply (:mod:`.replies`, which also writes
the replies of connections adopted early as session tickets). As in
OpenSSH's monitor, a kind of request that is not in the table is refused.

asyncio owns the socket so that a thousand idle or slow clients cost a thousand small
coroutines, not a thousand threads; every read has a deadline and a size bound, every
client counts against a global and a per-uid limit, and one hung stepd or slow client
can only ever hold its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sshd_adopt import __version__
from sshd_adopt._internal import protocol
from sshd_adopt._internal.broker.node import Node
from sshd_adopt._internal.broker.replies import render_adoption, render_keys, render_spawn
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.services.adoption import Peer
from sshd_adopt._internal.services.spawning import Checked, Refused, Spawned, SpawnOutcome
from sshd_adopt.errors import BrokerProtocolError, Error

_PEERCRED = struct.Struct("3i")
#: While slurm.conf cannot be read, how often it is read again (seconds).
SLURM_RETRY_EVERY = 5.0
#: The longest wait between two tries to resolve node names that did not (seconds).
SLURM_RETRY_MAX = 300.0


def _warn_unresolved(state: BrokerState) -> None:
    """One warning naming the nodes whose names did not resolve (a few of them)."""
    if state.slurm is not None and state.slurm.unresolved:
        names = state.slurm.unresolved
        logger().warning("%d node name(s) of slurm.conf did not resolve (%s%s): connections "
                         "from them count as not from a Slurm node (no callerid) until they "
                         "do; tried again", len(names), ", ".join(names[:5]),
                         ", ..." if len(names) > 5 else "")


@dataclass(frozen=True)
class Request:
    """One kind of request: who serves it, within how long, and how large its reply may be."""

    serve: Callable[[Node, Peer, dict[str, str]], dict[str, str]]
    deadline: Callable[[BrokerState], float]
    reply_limit: int = protocol.MAX_FRAME


def _adopt(node: Node, peer: Peer, arguments: dict[str, str]) -> dict[str, str]:
    return render_adoption(node.state(), node.adoption.request(peer, arguments))


def _keys(node: Node, peer: Peer, arguments: dict[str, str]) -> dict[str, str]:
    return render_keys(node.admission.keys(peer.pid, peer.uid, arguments[protocol.KEYS_USER]))


def _ping(node: Node, _peer: Peer, _arguments: dict[str, str]) -> dict[str, str]:
    state = node.state()
    return protocol.reply("pong", version=__version__, node=state.nodename or "",
                          config=state.config.path, events=node.events())


#: Every request the broker answers with one reply. "adopt": the wrapper asks for its
#: session; "keys": sshd's AuthorizedKeysCommand asks whether a user may enter; "ping":
#: doctor and readiness checks. ("spawn" is a conversation, not a reply:
#: :meth:`Broker._spawn`.)
REQUESTS: dict[str, Request] = {
    "adopt": Request(_adopt, lambda s: s.config.broker.decision_deadline),
    # The key source has its own bound (admission.timeout) on top of the decision's.
    "keys": Request(_keys, lambda s: s.config.broker.decision_deadline
                    + s.config.admission.timeout, protocol.MAX_REPLY_FRAME),
    "ping": Request(_ping, lambda s: s.config.broker.request_timeout),
}


#: Requests that are a conversation rather than one reply: "spawn" (the wrapper of a
#: session whose job has namespaces; :meth:`Broker._spawn`).
CONVERSATIONS: frozenset[str] = frozenset({"spawn"})


class Broker:
    """The running broker: owns the socket, the worker pool and the node's parts."""

    def __init__(self, load_state: Callable[[], BrokerState]) -> None:
        self._load_state = load_state
        self._state = load_state()
        self._pool = ThreadPoolExecutor(max_workers=self._state.config.broker.workers,
                                        thread_name_prefix="worker")
        self.node = Node(lambda: self._state, self._pool)
        self._clients: Counter[int] = Counter()
        self._total = 0
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None
        self._ready: Callable[[str], None] | None = None  # also takes status updates
        self._completing: asyncio.Task[None] | None = None

    @property
    def state(self) -> BrokerState:
        """The configuration and Slurm facts in force."""
        return self._state

    def reload(self) -> None:
        """SIGHUP: re-read config and Slurm facts; keep the old ones if the new are bad."""
        try:
            new = self._load_state()
        except Error as err:
            logger().error("reload failed, keeping the previous configuration: %s", err)
            return
        old = self._state
        self._state = new
        self.node.reloaded(old)
        if new.slurm_problem:
            logger().error("configuration reloaded; Slurm problem: %s", new.slurm_problem)
        else:
            logger().info("configuration and Slurm facts reloaded")
        _warn_unresolved(new)
        self._tell_status()
        self._keep_completing()

    def _keep_completing(self) -> None:
        """Start :meth:`_complete_slurm_facts` again if the facts are incomplete and it has
        ended (a reload brought back unresolved names); only inside the event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._completing is None or self._completing.done():
            self._completing = loop.create_task(self._complete_slurm_facts())

    def _tell_status(self) -> None:
        if self._ready is not None:
            with contextlib.suppress(OSError):
                self._ready(self.status())

    def retry_slurm(self) -> bool:
        """Read the configuration and slurm.conf again while the Slurm facts are incomplete.

        Incomplete: slurm.conf could not be read (a configless node's copy appears when
        slurmd has fetched it, and the unit does not wait for slurmd, since sshd would
        wait too; meanwhile root and exempt users get in, others
        ``action_generic_failure``), or some nodes' names did not resolve (DNS not up
        yet at boot: a connection from such a node counts as not from a Slurm node, so
        callerid is not asked). The new facts replace the old only when they are more
        complete (logged like a reload); otherwise nothing changes and nothing is logged
        above debug. Returns True once nothing is missing.
        """
        old = self._state
        if old.slurm is not None and not old.slurm.unresolved:
            return True
        try:
            new = self._load_state()
        except Error as err:
            logger().debug("Slurm facts still incomplete; configuration: %s", err)
            return False
        if new.slurm is None:
            logger().debug("Slurm facts still missing: %s", new.slurm_problem)
            return False
        if old.slurm is not None and len(new.slurm.unresolved) >= len(old.slurm.unresolved):
            logger().debug("node names still unresolved: %s", ", ".join(new.slurm.unresolved))
            return False
        self._state = new
        self.node.reloaded(old)
        if old.slurm is None:
            logger().info("Slurm facts found (node %s, slurm %s)%s", new.nodename or "?",
                          new.slurm.version, f"; Slurm problem: {new.slurm_problem}"
                          if new.slurm_problem else "")
        else:
            logger().info("%d more node name(s) resolved",
                          len(old.slurm.unresolved) - len(new.slurm.unresolved))
        _warn_unresolved(new)
        self._tell_status()
        return not new.slurm.unresolved

    async def _complete_slurm_facts(self) -> None:
        """:meth:`retry_slurm` until nothing is missing: every 5 s while slurm.conf is
        unread, then, for names that do not resolve, backing off to every 5 minutes (a
        decommissioned node left in slurm.conf must not cost a lookup every 5 s)."""
        loop = asyncio.get_running_loop()
        delay = SLURM_RETRY_EVERY
        while not await loop.run_in_executor(self._pool, self.retry_slurm):
            await asyncio.sleep(delay)
            if self._state.slurm is not None:
                delay = min(delay * 2, SLURM_RETRY_MAX)

    def start_workers(self, timeout: float = 5.0) -> None:
        """Start all ``broker.workers`` worker threads now, not as load first needs them.

        ``ThreadPoolExecutor`` adds a thread whenever work arrives and none is idle, so
        the broker's thread count would follow the largest burst it has met; started
        at once, its footprint after a burst is what it was before. Each of the first
        tasks waits on a barrier until every thread is there. Waits at most ``timeout``
        seconds (a pool that cannot start threads then grows as before).
        """
        workers = self._state.config.broker.workers
        gate = threading.Barrier(workers + 1, timeout=timeout)

        def wait() -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                gate.wait()

        for _ in range(workers):
            self._pool.submit(wait)
        wait()

    def status(self) -> str:
        """One line for ``systemctl status``: the node, the events source, any Slurm problem."""
        state = self._state
        line = f"node {state.nodename or '?'}; process events: {self.node.events()}"
        if state.slurm is not None and state.slurm.unresolved:
            line += f"; {len(state.slurm.unresolved)} node name(s) unresolved"
        return f"{line}; Slurm problem: {state.slurm_problem}" if state.slurm_problem else line

    async def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Listen until SIGTERM/SIGINT, then finish the requests in flight and return.

        The key entries are rebuilt from the node's jobs before the socket accepts
        anything, and wiped when the broker stops. ``ready`` is called with
        :meth:`status` once the socket listens (systemd's READY=1 and STATUS=), and again
        with the new status after a reload or when missing Slurm facts are found.
        """
        settings = self._state.config.broker
        path = settings.socket_path
        _prepare_socket_path(path)
        self.start_workers()
        self.node.start()
        try:
            server = await asyncio.start_unix_server(self._on_client, path=path)
        except BaseException:
            self.node.stop()
            raise
        os.chmod(path, settings.socket_mode)
        if settings.socket_group is not None:
            import grp  # noqa: PLC0415  (rarely used; keep start-up lean)

            os.chown(path, 0, grp.getgrnam(settings.socket_group).gr_gid)
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        slurm = self._state.slurm
        logger().info(
            "sshd-adoptd %s listening on %s (node %s, slurm %s, config %s)%s",
            __version__, path, slurm.nodename if slurm else "?",
            slurm.version if slurm else "?", self._state.config.path,
            f"; slurm problem: {self._state.slurm_problem}" if self._state.slurm_problem else "",
        )
        if ready is not None:
            ready(self.status())
            self._ready = ready
        _warn_unresolved(self._state)
        self._keep_completing()
        try:
            await self._stopping.wait()
        finally:
            if self._completing is not None:
                self._completing.cancel()
            # Stop accepting first, then answer what is in flight, and only then stop the
            # node's threads: they may be mid-decision, and joining them must not block the
            # event loop that is answering those requests.
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if self._in_flight:
                logger().info("finishing %d request(s) in flight", len(self._in_flight))
                await asyncio.wait(self._in_flight, timeout=settings.decision_deadline + 1)
            await asyncio.to_thread(self.node.stop)
            self._pool.shutdown(wait=False, cancel_futures=True)
            logger().info("sshd-adoptd stopped")

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one connection: authenticate, bound, dispatch, answer, close."""
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        peer = Peer(pid=pid, uid=uid, gid=gid)
        settings = self._state.config.broker
        admitted = False
        try:
            if self._total >= settings.max_connections or (
                uid != 0 and self._clients[uid] >= settings.max_per_uid
            ):
                logger().warning(
                    "refusing connection from pid %d uid %d: too many connections", pid, uid
                )
                return
            admitted = True
            self._total += 1
            self._clients[uid] += 1
            op, arguments = await self._read_request(reader)
            if op in CONVERSATIONS:
                await self._spawn(writer, sock, peer, arguments)
                return
            reply, limit = await self._answer(op, arguments, peer)
            writer.write(protocol.encode(reply, limit=limit))
            await asyncio.wait_for(writer.drain(), timeout=settings.request_timeout)
        except asyncio.IncompleteReadError:
            logger().debug("client pid %d uid %d closed before a whole request", pid, uid)
        except (TimeoutError, ConnectionError, BrokerProtocolError) as err:
            logger().warning("dropped client pid %d uid %d: %s", pid, uid, err or "timeout")
        except Exception:  # a bug: the client gets no answer (it fails closed), we go on
            logger().exception("request of pid %d uid %d failed", pid, uid)
        finally:
            if admitted:
                self._total -= 1
                self._clients[uid] -= 1
                if not self._clients[uid]:
                    del self._clients[uid]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._in_flight.discard(task)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
        """Read and parse one bounded request: its kind and arguments."""
        timeout = self._state.config.broker.request_timeout
        deadline = time.monotonic() + timeout
        header = await asyncio.wait_for(reader.readexactly(4), timeout=timeout)
        length = protocol.frame_length(header)
        try:
            body = await asyncio.wait_for(reader.readexactly(length),
                                          timeout=max(0.01, deadline - time.monotonic()))
        except asyncio.IncompleteReadError as err:
            raise BrokerProtocolError("frame cut short") from err
        return protocol.parse_request(body)

    async def _spawn(self, writer: asyncio.StreamWriter, sock: socket.socket, peer: Peer,
                     arguments: dict[str, str]) -> None:
        """A "spawn" conversation (:mod:`sshd_adopt._internal.services.spawning`): check
        the request, start the session's helper and hand it the connection; the helper
        asks the wrapper for its streams (the broker never takes them) and reports the
        session's end. Only a refusal (or "no namespaces: run it yourself") is answered
        here."""
        settings = self._state.config.broker
        loop = asyncio.get_running_loop()
        spawner = self.node.spawner
        started = time.monotonic()
        # Whatever the wrapper sends from now on is the helper's to read.
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)  # a socket's: reads and writes
        transport.pause_reading()
        checked = await asyncio.wait_for(loop.run_in_executor(
            self._pool, spawner.check, peer.pid, peer.uid, peer.gid, arguments),
            timeout=settings.decision_deadline)
        if not isinstance(checked, Checked):
            writer.write(protocol.encode(render_spawn(checked)))
            await asyncio.wait_for(writer.drain(), timeout=settings.request_timeout)
            return
        # The wrapper is answered by the decision deadline; the spawner hands nothing to a
        # helper after it, and each of its steps has its own bound (stepd, helper).
        deadline = started + settings.decision_deadline
        conn = socket.socket(fileno=os.dup(sock.fileno()))
        work = loop.run_in_executor(self._pool, functools.partial(
            spawner.start, checked, conn, deadline=deadline))
        try:
            outcome = await asyncio.wait_for(
                asyncio.shield(work), timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            logger().error("spawn request of pid %d uid %d exceeded its %.1fs deadline",
                           peer.pid, peer.uid, settings.decision_deadline)
            work.add_done_callback(self._reap_late_spawn)
            outcome = Refused("the broker timed out")
        if isinstance(outcome, Spawned):
            if outcome.process is not None:
                self._reap_later(outcome.process)
            return
        writer.write(protocol.encode(render_spawn(outcome)))
        await asyncio.wait_for(writer.drain(), timeout=settings.request_timeout)

    def _reap_late_spawn(self, work: asyncio.Future[SpawnOutcome]) -> None:
        """A spawn that finished after its wrapper was told no (it hands nothing to a
        helper after the deadline; one that got its orders just before finds the wrapper
        gone and hangs up); a helper of the broker's own is reaped."""
        if work.cancelled():
            return
        if work.exception() is not None:
            logger().error("late spawn failed: %s", work.exception())
            return
        outcome = work.result()
        if isinstance(outcome, Spawned) and outcome.process is not None:
            self._reap_later(outcome.process)

    @staticmethod
    def _reap_later(process: subprocess.Popen[bytes]) -> None:
        """Collect a session helper's exit status when it ends (it is this process's child)."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError:  # gone already
            process.poll()
            return

        def reap() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            process.poll()

        loop.add_reader(pidfd, reap)

    async def _answer(self, op: str, arguments: dict[str, str],
                      peer: Peer) -> tuple[dict[str, str], int]:
        """Compute one request's reply (and the reply's size bound)."""
        state = self._state
        request = REQUESTS.get(op)
        if request is None:  # parse_request knows no more kinds than the table
            raise BrokerProtocolError(f"request {op!r} is not served")
        bound = request.deadline(state)
        work = asyncio.get_running_loop().run_in_executor(
            self._pool, request.serve, self.node, peer, arguments)
        try:
            return await asyncio.wait_for(work, timeout=bound), request.reply_limit
        except TimeoutError:
            logger().error("%s request of pid %d uid %d exceeded its %.1fs deadline",
                           op, peer.pid, peer.uid, bound)
            return (protocol.reply(protocol.FAILED, message="sshd-adopt: the broker timed out"),
                    request.reply_limit)


def _prepare_socket_path(path: str) -> None:
    """Create the socket's directory and clear a stale socket, refusing to evict a live broker."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    info = os.lstat(directory)
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Error(f"{directory}: must be owned by root and not group/world-writable")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise Error(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as err:
        if err.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise Error(f"{path}: cannot check for a running broker: {err}") from err
        os.unlink(path)  # stale: nobody listens
    else:
        raise Error(f"{path}: another sshd-adoptd is already listening")
    finally:
        probe.close()
