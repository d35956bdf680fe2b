"""A small, bounded client for the slurmstepd unix-socket protocol.

Why not libslurm: the broker needs five requests (reference §2.5), and
libslurm's ``stepd_connect`` reads ``SLURM_CONF`` from the environment, picks
the protocol version of whatever library happens to be installed and blocks
without a deadline on a hung stepd. Here every byte is explicit and every
socket operation has a deadline, so one hung or crashed stepd can never stall
a login for longer than the caller's ``timeout``.

Wire format (reference §2.3, §2.5; identical 22.05 → 26.05): all integers are
native-endian int32/uint32, no length prefix, no authentication beyond the
peer credentials the stepd reads with SO_PEERCRED at accept time.

* handshake: C→S int32 version; S→C int32 the stepd's own version, or -1 and
  close if ours is below its minimum. A 24.11 stepd refuses 22.05's 9728 while
  a 22.05 stepd accepts any version ≥ 20.11 (no upper bound), so we send the
  newest version we speak and keep the peer's reply (2411-lab §5).
* then requests on the same connection: int32 code, payload, reply.

Failure classes, chosen for what the caller should do next:

* :class:`StepdUnavailable`: the step is gone, ending, crashed or hung
  (ECONNREFUSED on a stale socket left by a segfaulted 24.11.5 stepd, ENOENT,
  a timeout, or a close without reply such as 24.11.6+'s answer to
  ADD_EXTERN_PID on an ending step). Skip the job.
* :class:`StepdProtocolError`: the stepd answered something we do not
  understand (refused version, short read, absurd length). Log loudly.
* :class:`StepdRequestFailed`: the stepd understood and said no (rc != 0).
"""

from __future__ import annotations

import array
import errno
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final, Self

from sshd_adopt.errors import StepdError, StepdProtocolError, StepdUnavailable

#: Step id of the extern step (SLURM_EXTERN_CONT, 0xFFFFFFFC = 4294967292).
EXTERN_STEP: Final = 0xFFFFFFFC
#: Step id of the batch step (SLURM_BATCH_SCRIPT), for reference and tests.
BATCH_STEP: Final = 0xFFFFFFFB

#: step_msg_t value new in 25.11 (code 1 was unused before): the job's SLUID, a uint64 in
#: the host's byte order (``_handle_sluid`` in ``src/slurmd/slurmstepd/req.c``, 25.11 and
#: 26.05), open to any peer. Only sent to stepds whose version is at least
#: :data:`SLUID_PROTOCOL`.
REQUEST_SLUID: Final = 1

# step_msg_t values (reference §2.2; identical 22.05 → 26.05 for these codes).
REQUEST_STATE: Final = 5
REQUEST_DAEMON_PID: Final = 9
REQUEST_STEP_UID: Final = 20
REQUEST_ADD_EXTERN_PID: Final = 22
REQUEST_X11_DISPLAY: Final = 23
#: The job container's mount namespace as one descriptor (22.05 to 25.05; later releases
#: keep it for the mount namespace alone): an int32 (0: none, -1: error, else a number
#: of the stepd's), then one byte carrying the descriptor (SCM_RIGHTS). Any peer may ask
#: before 25.11 (``_handle_get_ns_fd`` in ``src/slurmd/slurmstepd/req.c``).
REQUEST_GET_NS_FD: Final = 26
#: Every namespace of the job (25.11 on): an int32 count, then per namespace an int32
#: ``CLONE_NEW*`` type and one byte carrying its descriptor, in the order PID, user,
#: mount; only the job's owner, root or SlurmUser may ask (``_handle_get_ns_fds``).
REQUEST_GET_NS_FDS: Final = 28

#: SLURM_PROTOCOL_VERSION of each release ((N << 8), reference §2.3).
PROTOCOL_VERSIONS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "22.05": 0x2600,
        "23.02": 0x2700,
        "23.11": 0x2800,
        "24.05": 0x2900,
        "24.11": 0x2A00,
        "25.05": 0x2B00,
        "25.11": 0x2C00,
        "26.05": 0x2D00,
    }
)
#: What we send in the handshake. Stepds check only a lower bound, so the
#: newest version is accepted by every release from 22.05 on (2411-lab §5).
NEWEST_PROTOCOL: Final = max(PROTOCOL_VERSIONS.values())
#: The first release whose stepds answer REQUEST_SLUID.
SLUID_PROTOCOL: Final = PROTOCOL_VERSIONS["25.11"]
#: The first release whose stepds answer REQUEST_GET_NS_FDS.
NS_FDS_PROTOCOL: Final = PROTOCOL_VERSIONS["25.11"]
#: Namespace types as the stepd names them (linux/sched.h).
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
#: Most namespaces a job has (namespace/linux: PID, user, mount).
MAX_NAMESPACES: Final = 3
#: Crockford's base32, in which Slurm prints a SLUID (``src/common/sluid.c``).
_CROCKFORD32: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_UINT64: Final = struct.Struct("=Q")

#: Longest unix socket path the kernel accepts (sun_path is 108 bytes incl. NUL).
MAX_SOCKET_PATH: Final = 107
#: Upper bound on the X11 xauthority path length we accept from a stepd. The
#: stepd sends a file name; anything longer is garbage or hostile.
MAX_XAUTH_LEN: Final = 4096

_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")
_TWO_INTS = struct.Struct("=ii")


class StepdRequestFailed(StepdError):
    """The stepd processed a request and answered with a non-zero return code."""

    def __init__(self, path: str, request: str, rc: int) -> None:
        self.path = path
        self.request = request
        self.rc = rc
        super().__init__(f"{path}: {request} failed with rc={rc}")


class StepdConnection:
    """One connection to one slurmstepd, with a deadline on every operation.

    Use :meth:`open` as a context manager::

        with StepdConnection.open(path, timeout=2.0) as stepd:
            uid = stepd.step_uid()

    ``timeout`` bounds each public call (connect + handshake, and each
    request) as a whole, not each ``recv``: a stepd trickling one byte per
    second cannot stretch a call beyond it. Not thread-safe; use one
    connection per thread.
    """

    def __init__(self, sock: socket.socket, path: str, timeout: float, protocol_version: int):
        self._sock = sock
        self.path = path
        self.timeout = timeout
        #: The stepd's own SLURM_PROTOCOL_VERSION, as it replied in the handshake.
        self.protocol_version = protocol_version

    # -- life cycle ---------------------------------------------------------

    @classmethod
    def open(cls, path: str, *, timeout: float, version: int = NEWEST_PROTOCOL) -> Self:
        """Connect to the stepd socket at ``path`` and negotiate the protocol version.

        Raises :class:`StepdUnavailable` if the socket is missing, stale
        (ECONNREFUSED), hung (no reply within ``timeout``) or closes at once,
        :class:`StepdProtocolError` if the stepd refuses ``version`` or answers
        garbage, :class:`StepdError` for anything else (e.g. a path too long
        for ``sun_path``).
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        encoded = os.fsencode(path)
        if len(encoded) > MAX_SOCKET_PATH:
            raise StepdError(
                f"{path}: socket path is {len(encoded)} bytes, longer than the "
                f"{MAX_SOCKET_PATH} a unix socket address can hold; shorten SlurmdSpoolDir"
            )
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # connect() on a unix socket blocks when the listen backlog is
            # full (a wedged stepd); the timeout covers that too.
            sock.settimeout(timeout)
            try:
                sock.connect(encoded)
            except TimeoutError as err:
                raise StepdUnavailable(f"{path}: connect timed out after {timeout:g}s") from err
            except OSError as err:
                raise _connect_error(path, err) from err
            conn = cls(sock, path, timeout, 0)
            conn._send(_INT.pack(version), deadline, "handshake")
            reply = conn._recv_int("handshake", deadline, signed=True)
            if reply == -1:
                raise StepdProtocolError(
                    f"{path}: stepd refused protocol version {version} (0x{version:04X})"
                )
            if reply <= 0:
                raise StepdProtocolError(f"{path}: stepd answered the handshake with {reply}")
            conn.protocol_version = reply
        except BaseException:
            sock.close()
            raise
        return conn

    def close(self) -> None:
        """Close the socket (idempotent). The stepd just sees EOF and ends its loop."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests -----------------------------------------------------------

    def step_uid(self) -> int:
        """The uid of the job owner (REQUEST_STEP_UID, allowed for any peer)."""
        deadline = self._start(REQUEST_STEP_UID, b"", "STEP_UID")
        return self._recv_int("STEP_UID", deadline, signed=False)

    def daemon_pid(self) -> int:
        """The pid of the slurmstepd process itself (REQUEST_DAEMON_PID).

        Its start time is when the step really started, which is what
        "newest job" should mean (reference §1.5).
        """
        deadline = self._start(REQUEST_DAEMON_PID, b"", "DAEMON_PID")
        pid = self._recv_int("DAEMON_PID", deadline, signed=True)
        if pid <= 0:
            raise StepdProtocolError(f"{self.path}: DAEMON_PID answered {pid}")
        return pid

    def state(self) -> int:
        """The step state (REQUEST_STATE).

        Values differ by release: 22.05 has RUNNING 2, ENDING 3; 23.02.5+
        inserts CANCELLED 3 so ENDING is 4. Callers compare with care.
        """
        deadline = self._start(REQUEST_STATE, b"", "STATE")
        return self._recv_int("STATE", deadline, signed=True)

    def add_extern_pid(self, pid: int) -> None:
        """Move ``pid`` into the job's extern step (REQUEST_ADD_EXTERN_PID).

        Only uid 0 and SlurmUser may do this, and the stepd does not check
        that ``pid`` belongs to the job's user: the caller must have checked.

        Raises :class:`StepdRequestFailed` with the rc if the stepd says no
        (22.05 answers -1 to an unauthorised peer and stays connected), and
        :class:`StepdUnavailable` if it closes without a reply (24.11.6+ does
        so when the step is ending, and 25.11+ for an unauthorised peer).
        """
        if pid <= 0:
            raise ValueError(f"refusing to adopt pid {pid}")
        deadline = self._start(REQUEST_ADD_EXTERN_PID, _INT.pack(pid), "ADD_EXTERN_PID")
        rc = self._recv_int("ADD_EXTERN_PID", deadline, signed=True)
        if rc != 0:
            raise StepdRequestFailed(self.path, f"ADD_EXTERN_PID {pid}", rc)

    def sluid(self) -> str | None:
        """The job's SLUID as Slurm prints it (``s`` and 13 base32 digits), or None for a
        stepd older than 25.11, which has no such request (REQUEST_SLUID).

        From 26.05, cgroup/v2 names a job's cgroup by it (``<scope>/sEKNKTV3WPV500``
        instead of ``job_123``, unless cgroup.conf says ``CgroupJobIdPaths=yes``).
        """
        if self.protocol_version < SLUID_PROTOCOL:
            return None
        deadline = self._start(REQUEST_SLUID, b"", "SLUID")
        (value,) = _UINT64.unpack(self._recv_exact(8, "SLUID", deadline))
        return sluid_name(value)

    def x11_display(self) -> tuple[int, str | None]:
        """The job's forwarded X11 display and xauthority file (REQUEST_X11_DISPLAY).

        Returns ``(0, None)`` when the job has no X11 forwarding. The reply is
        always read in full (display, length, bytes), unlike libslurm on the
        callerid path, so the connection stays in sync for later requests.
        """
        deadline = self._start(REQUEST_X11_DISPLAY, b"", "X11_DISPLAY")
        display, length = _TWO_INTS.unpack(self._recv_exact(8, "X11_DISPLAY", deadline))
        if length < 0 or length > MAX_XAUTH_LEN:
            raise StepdProtocolError(
                f"{self.path}: X11_DISPLAY announced an xauthority of {length} bytes "
                f"(accepted: 0..{MAX_XAUTH_LEN})"
            )
        if length == 0:
            return display, None
        raw = self._recv_exact(length, "X11_DISPLAY xauthority", deadline).split(b"\0", 1)[0]
        return display, (os.fsdecode(raw) if raw else None)

    def namespace_fds(self) -> list[tuple[int, int]]:
        """The job's namespaces, ``(CLONE_NEW* type, descriptor)`` in the order to join
        them; empty when the job has none. The caller owns (and closes) the descriptors.

        Asks REQUEST_GET_NS_FDS of stepds from 25.11 on, REQUEST_GET_NS_FD before.
        Raises :class:`StepdRequestFailed` when the stepd says it could not open the
        namespace, :class:`StepdProtocolError` for a count, type or message out of
        bounds, :class:`StepdUnavailable` when it goes silent (26.05.3 can announce a
        descriptor it then fails to send: the deadline ends the wait).
        """
        if self.protocol_version < NS_FDS_PROTOCOL:
            deadline = self._start(REQUEST_GET_NS_FD, b"", "GET_NS_FD")
            number = self._recv_int("GET_NS_FD", deadline, signed=True)
            if number == 0:
                return []
            if number < 0:  # the stepd could not open the job's namespace
                raise StepdRequestFailed(self.path, "GET_NS_FD", number)
            return [(CLONE_NEWNS, self._recv_fd("GET_NS_FD", deadline))]
        deadline = self._start(REQUEST_GET_NS_FDS, b"", "GET_NS_FDS")
        count = self._recv_int("GET_NS_FDS", deadline, signed=True)
        if not 0 <= count <= MAX_NAMESPACES:
            raise StepdProtocolError(f"{self.path}: GET_NS_FDS announced {count} namespaces "
                                     f"(accepted: 0..{MAX_NAMESPACES})")
        found: list[tuple[int, int]] = []
        try:
            for _ in range(count):
                kind = self._recv_int("GET_NS_FDS", deadline, signed=False)
                if kind not in (CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWNS) or \
                        any(kind == known for known, _ in found):
                    raise StepdProtocolError(
                        f"{self.path}: GET_NS_FDS: namespace type 0x{kind:08x} unknown or "
                        "repeated")
                found.append((kind, self._recv_fd("GET_NS_FDS", deadline)))
        except BaseException:
            for _, fd in found:
                os.close(fd)
            raise
        return found

    # -- framing ------------------------------------------------------------

    def _recv_fd(self, what: str, deadline: float) -> int:
        """One descriptor, carried by a message of one byte (``send_fd_over_socket`` in
        ``src/common/fd.c``). Read with a one-byte buffer, so the byte that carries it is
        never consumed by a plain read (the kernel would drop the descriptor)."""
        fds = array.array("i")
        try:
            self._sock.settimeout(self._remaining(deadline, what))
            # recvmsg, not socket.recv_fds: that one drops its flags before Python 3.12,
            # and the descriptor must arrive close-on-exec (the broker starts processes).
            data, ancillary, flags, _ = self._sock.recvmsg(
                1, socket.CMSG_SPACE(2 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        except TimeoutError as err:
            raise StepdUnavailable(
                f"{self.path}: {what}: no descriptor within {self.timeout:g}s") from err
        except OSError as err:
            raise StepdError(f"{self.path}: {what}: receive failed: {err}") from err
        if len(fds) != 1 or flags & socket.MSG_CTRUNC or len(data) != 1:
            for fd in fds:
                os.close(fd)
            if not data:
                raise StepdUnavailable(
                    f"{self.path}: {what}: stepd closed the connection before the descriptor")
            raise StepdProtocolError(
                f"{self.path}: {what}: expected one descriptor with one byte, got "
                f"{len(fds)} with {len(data)}")
        return fds[0]

    def _start(self, code: int, payload: bytes, what: str) -> float:
        """Send one request code plus payload; return the deadline for its reply."""
        deadline = time.monotonic() + self.timeout
        self._send(_INT.pack(code) + payload, deadline, what)
        return deadline

    def _remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepdUnavailable(f"{self.path}: {what}: no answer within {self.timeout:g}s")
        return left

    def _send(self, data: bytes, deadline: float, what: str) -> None:
        try:
            self._sock.settimeout(self._remaining(deadline, what))
            self._sock.sendall(data)
        except TimeoutError as err:
            raise StepdUnavailable(
                f"{self.path}: {what}: send timed out after {self.timeout:g}s"
            ) from err
        except (BrokenPipeError, ConnectionResetError) as err:
            raise StepdUnavailable(f"{self.path}: {what}: stepd closed the connection") from err
        except OSError as err:
            raise StepdError(f"{self.path}: {what}: send failed: {err}") from err

    def _recv_exact(self, size: int, what: str, deadline: float) -> bytes:
        """Read exactly ``size`` bytes before ``deadline``.

        EOF before the first byte means the stepd closed without replying
        (:class:`StepdUnavailable`); EOF in the middle is a short read
        (:class:`StepdProtocolError`).
        """
        buf = bytearray()
        while len(buf) < size:
            try:
                self._sock.settimeout(self._remaining(deadline, what))
                chunk = self._sock.recv(size - len(buf))
            except TimeoutError as err:
                raise StepdUnavailable(
                    f"{self.path}: {what}: no answer within {self.timeout:g}s"
                ) from err
            except ConnectionResetError as err:
                # The stepd closed with our request still unread (24.11.6+
                # on ADD_EXTERN_PID for an ending step): same as no reply.
                raise StepdUnavailable(
                    f"{self.path}: {what}: stepd closed the connection without replying (reset)"
                ) from err
            except OSError as err:
                raise StepdError(f"{self.path}: {what}: receive failed: {err}") from err
            if not chunk:
                if not buf:
                    raise StepdUnavailable(
                        f"{self.path}: {what}: stepd closed the connection without replying"
                    )
                raise StepdProtocolError(
                    f"{self.path}: {what}: short read, {len(buf)} of {size} bytes"
                )
            buf += chunk
        return bytes(buf)

    def _recv_int(self, what: str, deadline: float, *, signed: bool) -> int:
        data = self._recv_exact(4, what, deadline)
        value: int = (_INT if signed else _UINT).unpack(data)[0]
        return value


def sluid_name(value: int) -> str:
    """A SLUID (uint64) in Slurm's printed form: ``s`` then 13 base32 digits, most
    significant first (``print_sluid`` in ``src/common/sluid.c``)."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"a SLUID is a uint64, not {value!r}")
    return "s" + "".join(_CROCKFORD32[(value >> (5 * i)) & 0x1F] for i in reversed(range(13)))


def _connect_error(path: str, err: OSError) -> StepdError:
    """Map a connect() failure to what it means for the step."""
    if err.errno == errno.ECONNREFUSED:
        return StepdUnavailable(f"{path}: connection refused (stale socket: the stepd is gone)")
    if err.errno == errno.ENOENT:
        return StepdUnavailable(f"{path}: no such socket (the step has ended)")
    if err.errno in (errno.EAGAIN, errno.ENOTSOCK, errno.ECONNRESET):
        return StepdUnavailable(f"{path}: cannot connect: {err.strerror}")
    return StepdError(f"{path}: cannot connect: {err.strerror or err}")


@dataclass(frozen=True)
class StepSocket:
    """A stepd socket found in the spool directory (not yet known to be alive)."""

    job_id: int
    step_id: int
    path: str


def socket_name_pattern(nodename: str) -> re.Pattern[str]:
    """The regex for ``<nodename>_<job>.<step>[.<het_comp>]`` socket names.

    Upstream inserts the node name into the regex unescaped (reference §2.1),
    so a name such as ``n.1`` would also match ``nx1_...``; we escape it. Only
    ASCII digits count, and the optional het component needs its dot.
    """
    return re.compile(rf"^{re.escape(nodename)}_([0-9]+)\.([0-9]+)(\.[0-9]+)?$", re.ASCII)


def list_extern_steps(spool_dir: str, nodename: str) -> list[StepSocket]:
    """The extern-step sockets of ``nodename`` in ``spool_dir``, sorted by job id.

    Only entries that are themselves sockets count (``lstat``, so a symlink
    planted in the spool dir is ignored). The list may include stale sockets
    of crashed stepds: they are only found out when connecting. A missing
    spool dir means no steps (slurmd has not run yet), not an error.
    """
    pattern = socket_name_pattern(nodename)
    found: list[StepSocket] = []
    try:
        entries = os.scandir(spool_dir)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise StepdError(f"{spool_dir}: cannot list the slurmd spool dir: {err}") from err
    with entries:
        for entry in entries:
            match = pattern.match(entry.name)
            if match is None or int(match.group(2)) != EXTERN_STEP:
                continue
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue  # vanished between readdir and lstat: the step ended
            if stat.S_ISSOCK(mode):
                found.append(StepSocket(int(match.group(1)), EXTERN_STEP, entry.path))
    found.sort(key=lambda s: (s.job_id, s.path))
    return found


def extern_socket_path(spool_dir: str, nodename: str, job_id: int) -> str:
    """Where the extern step socket of ``job_id`` lives (reference §2.1)."""
    return os.path.join(spool_dir, f"{nodename}_{job_id}.{EXTERN_STEP}")


__all__ = [
    "BATCH_STEP",
    "EXTERN_STEP",
    "MAX_SOCKET_PATH",
    "MAX_XAUTH_LEN",
    "NEWEST_PROTOCOL",
    "PROTOCOL_VERSIONS",
    "REQUEST_ADD_EXTERN_PID",
    "REQUEST_DAEMON_PID",
    "REQUEST_SLUID",
    "REQUEST_STATE",
    "REQUEST_STEP_UID",
    "REQUEST_X11_DISPLAY",
    "SLUID_PROTOCOL",
    "StepSocket",
    "StepdConnection",
    "StepdRequestFailed",
    "extern_socket_path",
    "list_extern_steps",
    "sluid_name",
    "socket_name_pattern",
]
