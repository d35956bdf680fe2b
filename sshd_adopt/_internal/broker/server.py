"""The broker's server loop: a unix socket, SO_PEERCRED, bounded everything.

asyncio owns the socket so that a thousand idle or slow clients cost a
thousand small coroutines, not a thousand threads; the blocking work of a
request (/proc, stepd sockets, the callerid RPC) runs in a bounded thread
pool. Every read has a deadline and a size bound, every client is counted
against a global and a per-uid limit, and one hung stepd or slow client can
only ever hold its own request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sshd_adopt import __version__
from sshd_adopt._internal import protocol
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.services.admission import GateService
from sshd_adopt._internal.services.adoption import AdoptionService, BrokerState, Peer
from sshd_adopt._internal.services.sweeper import Sweeper
from sshd_adopt.errors import BrokerProtocolError, Error

_PEERCRED = struct.Struct("3i")


class Broker:
    """The running broker: owns the listening socket, the worker pool and the state."""

    def __init__(self, load_state: Callable[[], BrokerState]) -> None:
        self._load_state = load_state
        self._state = load_state()
        settings = self._state.config.broker
        self._pool = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="adopt"
        )
        self._service = AdoptionService(lambda: self._state)
        self._gate = GateService(lambda: self._state)
        self._sweeper = Sweeper(lambda: self._state, self._service)
        self._clients: Counter[int] = Counter()
        self._total = 0
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None

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
        self._state = new
        if new.slurm_problem:
            logger().error("configuration reloaded; Slurm problem: %s", new.slurm_problem)
        else:
            logger().info("configuration and Slurm facts reloaded")

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Listen until SIGTERM/SIGINT, then finish the requests in flight and return."""
        settings = self._state.config.broker
        path = settings.socket_path
        _prepare_socket_path(path)
        server = await asyncio.start_unix_server(self._on_client, path=path)
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
            "sshd-adoptd %s listening on %s (node %s, slurm %s)%s",
            __version__,
            path,
            slurm.nodename if slurm else "?",
            slurm.version if slurm else "?",
            f"; slurm problem: {self._state.slurm_problem}" if self._state.slurm_problem else "",
        )
        if self._state.config.sweeper.enabled:
            self._sweeper.start()
        if ready is not None:
            ready()
        try:
            await self._stopping.wait()
        finally:
            # Stop accepting first, then answer what is in flight, and only then stop the
            # sweeper: its thread may be mid-decision, and joining it must not block the
            # event loop that is answering those requests.
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if self._in_flight:
                logger().info("finishing %d request(s) in flight", len(self._in_flight))
                await asyncio.wait(self._in_flight, timeout=settings.decision_deadline + 1)
            await asyncio.to_thread(self._sweeper.stop)
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
            reply = await self._answer(reader, peer)
            if reply is not None:
                writer.write(protocol.encode(reply, limit=protocol.MAX_REPLY_FRAME))
                await asyncio.wait_for(writer.drain(), timeout=settings.request_timeout)
        except (TimeoutError, ConnectionError, BrokerProtocolError) as err:
            logger().warning("dropped client pid %d uid %d: %s", pid, uid, err or "timeout")
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

    async def _answer(self, reader: asyncio.StreamReader, peer: Peer) -> dict[str, str] | None:
        """Read one bounded request and compute its reply."""
        settings = self._state.config.broker
        deadline = time.monotonic() + settings.request_timeout
        header = await asyncio.wait_for(reader.readexactly(4), timeout=settings.request_timeout)
        length = protocol.frame_length(header)
        remaining = max(0.01, deadline - time.monotonic())
        try:
            body = await asyncio.wait_for(reader.readexactly(length), timeout=remaining)
        except asyncio.IncompleteReadError as err:
            raise BrokerProtocolError("frame cut short") from err
        op, overrides = protocol.parse_request(body)
        if op == "ping":
            slurm = self._state.slurm
            return protocol.reply(
                "pong", version=__version__, node=(slurm.nodename or "") if slurm else ""
            )
        if op == "adopt":
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(
                self._pool, self._service.handle_adopt, peer, overrides
            )
            try:
                return await asyncio.wait_for(future, timeout=settings.decision_deadline)
            except TimeoutError:
                logger().error(
                    "request of pid %d uid %d exceeded the %.1fs decision deadline",
                    peer.pid, peer.uid, settings.decision_deadline,
                )
                return protocol.reply(protocol.FAILED, message="sshd-adopt: the broker timed out")
        if op == "keys":
            # The gate's key source has its own bound (gate.timeout) on top
            # of the decision's; sshd itself would wait forever.
            bound = settings.decision_deadline + self._state.config.gate.timeout
            loop = asyncio.get_running_loop()
            keys = loop.run_in_executor(
                self._pool, self._gate.handle_keys, peer, overrides[protocol.KEYS_USER]
            )
            try:
                return await asyncio.wait_for(keys, timeout=bound)
            except TimeoutError:
                logger().error("gate: keys request of pid %d exceeded %.1fs", peer.pid, bound)
                return protocol.reply(protocol.FAILED, message="the broker timed out")
        logger().warning("request %r from pid %d is not served yet", op, peer.pid)
        return protocol.reply(protocol.FAILED, message=f"request {op!r} is not supported yet")


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
