"""Ask the source host's slurmd which job owns the client end of an ssh connection.

This is pam_slurm_adopt's ``slurm_network_callerid()`` (reference §3), with
one difference that is the point of the module: **one total deadline**.
libslurm connects with TCPTimeout (2 s by default) and then waits
MessageTimeout (10 s) for the answer, so a source host that drops packets to
its slurmd port holds every login about 2 s, and a slurmd that accepts but
never answers (stopped, wedged, overloaded) holds it about 10 s. Here every
socket operation, the munge encode, the retries and the ``scontrol``
fallback share one budget (default 1 s), and every failure maps to an
outcome instead of an exception: the broker must decide, not crash.

Two ways to ask:

``native``
    Speak the RPC ourselves: one TCP connection to ``<client ip>:SlurmdPort``,
    a REQUEST_NETWORK_CALLERID in Slurm's framing with a munge credential,
    one response. About a millisecond of our own work plus the slurmd's.
``scontrol``
    Run ``scontrol callerid ...``, which calls libslurm. It costs a fork/exec
    and slurm.conf parsing, but speaks whatever protocol the installed Slurm
    speaks, so it is the fallback when the native path does not understand
    the installed version or the slurmd's answer.

``auto`` tries native and falls back to scontrol only for *protocol*
failures. Network failures are final: a refused connection means there is
no slurmd there (a login node, say), and a timeout has already spent the
budget; scontrol would meet the same network.

Which failures are retried: only those that say nothing about the source
host (a connection reset, EAGAIN). A slurmd that closes without answering
has rejected the request (version, credential), so that is a protocol
failure: no retry, but scontrol in ``auto``. A
refusal is an answer (``UNREACHABLE`` at once, as the Slurm docs recommend
for login nodes: "better to have the RPC be rejected rather than silently
dropped"); a timeout is ``UNREACHABLE``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

import sh
import tenacity

from sshd_adopt._internal import munge
from sshd_adopt._internal.connection import Connection
from sshd_adopt._internal.decision import CallerIdAnswer, CallerIdOutcome
from sshd_adopt._internal.logs import logger
from sshd_adopt.errors import CallerIdError

Method = Literal["auto", "native", "scontrol"]

# --- Slurm constants (reference §3.2, §3.5) --------------------------------------------------

REQUEST_NETWORK_CALLERID = 5035
RESPONSE_NETWORK_CALLERID = 5036
RESPONSE_SLURM_RC = 8001
AUTH_PLUGIN_MUNGE = 101
HASH_PLUGIN_NONE = 1
NO_VAL = 0xFFFFFFFE
AF_INET = 2  # Slurm packs Linux's numbers; spelled out so the wire does not follow the host
AF_INET6 = 10

PROTOCOL_22_05 = 0x2600  # 9728: verified live (reference §6)
PROTOCOL_24_11 = 0x2A00  # 10752
PROTOCOL_25_11 = 0x2C00  # 11264: the response body carries a full step id from here on
PROTOCOL_26_05 = 0x2D00  # 11520
#: Versions whose request framing we know (reference §3.5): the 22.05 header is
#: unchanged for forward_cnt = ret_cnt = 0 through 26.05. Older peers (< 22.05)
#: have another header and no hash in the credential; newer ones are unknown.
#: Versions above 24.11 are documented but not verified live.
SPOKEN_VERSIONS = range(PROTOCOL_22_05, PROTOCOL_26_05 + 0x100, 0x100)

#: Largest response we read. A callerid answer is ~200 bytes (header, a
#: ~150-byte credential, a node name); the bound stops a garbage length
#: prefix from making the root broker allocate or wait for megabytes.
MAX_RESPONSE = 64 * 1024
_HEADER_MIN = 16  # version, flags, type, body length, forward_cnt, ret_cnt, orig family

# --- budget and retries ----------------------------------------------------------------------

#: Native attempts in all (first try + retries) for transient failures.
MAX_ATTEMPTS = 3
#: Pause before a retry: long enough for a restarting slurmd to re-listen,
#: short against the deadline.
RETRY_WAIT = 0.02
#: An attempt (native or scontrol) is not started with less time than this left:
#: it could not finish, and starting it only adds a kill to the bill.
MIN_ATTEMPT = 0.03
#: scontrol needs a fork/exec, libslurm's start-up and slurm.conf: not worth
#: starting with less than this.
MIN_SCONTROL = 0.1

_TRANSIENT_ERRNOS = frozenset(
    {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN, errno.EINTR}
)
_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


class ProtocolFailure(CallerIdError):
    """The native path cannot get an answer it understands; another method may.

    Raised by the pure pack/parse helpers; :func:`query_callerid` never lets
    it escape (it becomes a fallback to scontrol, or UNREACHABLE).
    """


class _Transient(Exception):
    """Worth another attempt: the failure says nothing about the source host."""


class _Unreachable(Exception):
    """Final: no slurmd answered at the source (refused, unroutable, timed out)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class Reply:
    """A parsed callerid response: a job id (``None`` = NO_VAL), Slurm rc, node name."""

    job_id: int | None
    rc: int
    node_name: str


class _Budget:
    """An absolute monotonic deadline shared by everything one query does."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + max(0.0, seconds)

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start


# --- packing (pure) --------------------------------------------------------------------------


def _address16(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Slurm's 16-byte address field: network order, IPv4 in the first 4 bytes."""
    return address.packed.ljust(16, b"\0")


def pack_request_body(conn: Connection) -> bytes:
    """The 52-byte ``network_callerid_msg_t`` (reference §3.3).

    ``ip_src`` is the ssh client (whose slurmd we ask), ``ip_dst`` this node.
    """
    af = AF_INET if conn.family == 4 else AF_INET6
    return b"".join(
        (
            struct.pack(">I", 16),
            _address16(conn.remote_ip),
            struct.pack(">I", 16),
            _address16(conn.local_ip),
            struct.pack(">III", conn.remote_port, conn.local_port, af),
        )
    )


def hash_payload(msg_type: int = REQUEST_NETWORK_CALLERID) -> bytes:
    """The munge payload auth/munge checks: HASH_PLUGIN_NONE + BE msg_type.

    libslurm sends a K12 hash of the body instead; the receiver also accepts
    this 3-byte "no hash" form unless ``CommunicationParameters=block_zero_hash``
    (reference §3.5), and it spares us a KangarooTwelve implementation. The
    body is not integrity-protected either way that matters here: it only
    names a TCP connection, and the answer is checked against the user's
    own jobs by the broker.
    """
    return bytes([HASH_PLUGIN_NONE]) + struct.pack(">H", msg_type)


def _packstr(data: bytes) -> bytes:
    """Slurm packstr: BE u32 length including the NUL, the bytes, the NUL."""
    return struct.pack(">I", len(data) + 1) + data + b"\0"


def pack_request(conn: Connection, credential: bytes, protocol_version: int) -> bytes:
    """The full length-prefixed frame: header, munge auth, body (reference §3.5, App. A)."""
    if protocol_version not in SPOKEN_VERSIONS:
        raise ProtocolFailure(f"protocol version {protocol_version:#x} not spoken natively")
    body = pack_request_body(conn)
    header = struct.pack(
        ">HHHIHHH", protocol_version, 0, REQUEST_NETWORK_CALLERID, len(body), 0, 0, 0
    )
    auth = struct.pack(">I", AUTH_PLUGIN_MUNGE) + _packstr(credential)
    message = header + auth + body
    return struct.pack(">I", len(message)) + message


# --- parsing (pure) --------------------------------------------------------------------------


class _Reader:
    """Bounds-checked big-endian reads over one response; short data is a ProtocolFailure."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise ProtocolFailure(f"response cut short in {what}")
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack(">I", self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, what))[0]
        return value

    def packstr(self, what: str) -> bytes | None:
        length = self.u32(what)
        if length == 0:
            return None
        data = self.take(length, what)
        return data[:-1] if data.endswith(b"\0") else data


def response_length(prefix: bytes) -> int:
    """Parse and bound the 4-byte length prefix of a response."""
    if len(prefix) != 4:
        raise ProtocolFailure("response cut short in its length prefix")
    length: int = struct.unpack(">I", prefix)[0]
    if not _HEADER_MIN <= length <= MAX_RESPONSE:
        raise ProtocolFailure(f"response length {length} outside {_HEADER_MIN}..{MAX_RESPONSE}")
    return length


def _skip_header_and_auth(reader: _Reader) -> tuple[int, int]:
    """Read the 22.05-style header and skip the auth; return (version, msg_type).

    The response's munge credential is skipped, not verified, on purpose:
    we opened the TCP connection to the source address ourselves, so a
    forger would have to sit on that path, and the answer can only *choose*
    among this user's own jobs: the broker adopts a job only if it is one
    of the user's jobs with an extern step on this node. Verifying would
    cost an unmunge per login and buy nothing the decision relies on.
    """
    version = reader.u16("header")
    reader.u16("header")  # flags
    msg_type = reader.u16("header")
    body_length = reader.u32("header")
    if reader.u16("header") != 0:
        raise ProtocolFailure("response asks for forwarding")
    if reader.u16("header") != 0:
        raise ProtocolFailure("response carries a ret list")
    family = reader.u16("header")
    if family == AF_INET:
        reader.take(6, "orig_addr")
    elif family == AF_INET6:
        reader.take(reader.u32("orig_addr"), "orig_addr")
        reader.take(2, "orig_addr")
    elif family != 0:
        raise ProtocolFailure(f"response orig_addr family {family}")
    plugin = reader.u32("auth")
    if plugin != AUTH_PLUGIN_MUNGE:
        raise ProtocolFailure(f"response signed by auth plugin {plugin}, not munge")
    reader.packstr("auth credential")
    # Exact, as slurm itself checks since CVE-2023-49933: garbage rarely fits.
    if body_length != reader.remaining():
        raise ProtocolFailure(
            f"response body is {reader.remaining()} bytes, header says {body_length}"
        )
    return version, msg_type


def parse_response(message: bytes) -> Reply:
    """Parse a response *after* its length prefix: header, auth, body.

    The body layout follows the version in the response header (the slurmd
    answers with the request's version): below 25.11 it starts with a u32
    job id, from 25.11 with a full step id (reference §3.3).
    """
    reader = _Reader(message)
    version, msg_type = _skip_header_and_auth(reader)
    if msg_type == RESPONSE_SLURM_RC:
        rc = reader.u32("rc body")
        if rc != 0:
            raise ProtocolFailure(f"slurmd answered RESPONSE_SLURM_RC {rc}")
        # 22.05's libslurm leaves the job id unset on rc 0; we call it "no job".
        return Reply(None, 0, "")
    if msg_type != RESPONSE_NETWORK_CALLERID:
        raise ProtocolFailure(f"unexpected response type {msg_type}")
    if version >= PROTOCOL_25_11:
        reader.u64("step id")  # sluid
        job_id = reader.u32("step id")
        reader.take(8, "step id")  # step_id, step_het_comp
    else:
        job_id = reader.u32("job id")
    rc = reader.u32("return code")
    node = reader.packstr("node name") or b""
    if reader.remaining():
        raise ProtocolFailure("response body has trailing bytes")
    known = job_id not in (0, NO_VAL, 0xFFFFFFFF)
    return Reply(job_id if known else None, rc, node.decode(errors="replace"))


def _outcome(reply: Reply) -> tuple[CallerIdOutcome, int | None]:
    """MEMBER only for a real job id with rc 0; anything else is "no job known"."""
    if reply.job_id is not None and reply.rc == 0:
        return CallerIdOutcome.MEMBER, reply.job_id
    return CallerIdOutcome.INDETERMINATE, None


# --- native path -----------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, budget: _Budget, *, first: bool) -> bytes:
    """Read exactly ``n`` bytes, every recv under what is left of the budget.

    A clean end of stream is a protocol failure, not worth a retry: it is how
    a slurmd rejects a request it cannot take (seen live: 22.05 closes
    without a word on a newer protocol version, logging "Invalid Protocol
    Version 11520"), so the same request would only be rejected again, and
    scontrol, which speaks the installed version, is the better next try.
    A reset (RST) instead raises ConnectionResetError, which is retried.
    """
    chunks: list[bytes] = []
    got = 0
    while got < n:
        left = budget.left()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(min(n - got, 65536))
        if not chunk:
            if first and got == 0:
                raise ProtocolFailure("slurmd closed the connection without answering")
            raise ProtocolFailure("response cut short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _native_once(
    conn: Connection,
    slurmd_port: int,
    protocol_version: int,
    budget: _Budget,
    munge_socket: str | None,
) -> Reply:
    """One connect/send/receive; classifies every failure for the retry policy."""
    left = budget.left()
    if left < MIN_ATTEMPT:
        raise _Unreachable("deadline reached")
    family = socket.AF_INET if conn.family == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(left)
            sock.connect((str(conn.remote_ip), slurmd_port))
            # Encode only once connected: a refused connection (login node)
            # then costs no credential at all.
            credential = munge.encode(
                hash_payload(), timeout=budget.left(), socket_path=munge_socket
            )
            frame = pack_request(conn, credential, protocol_version)
            sock.settimeout(max(budget.left(), 0.001))
            sock.sendall(frame)
            length = response_length(_recv_exact(sock, 4, budget, first=True))
            return parse_response(_recv_exact(sock, length, budget, first=False))
    except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
        raise _Unreachable("timed out") from exc
    except OSError as exc:
        if exc.errno in _UNREACHABLE_ERRNOS:
            raise _Unreachable(exc.strerror or str(exc)) from exc
        if exc.errno in _TRANSIENT_ERRNOS:
            raise _Transient(exc.strerror or str(exc)) from exc
        raise _Unreachable(str(exc)) from exc


def _native(
    conn: Connection,
    slurmd_port: int,
    protocol_version: int,
    budget: _Budget,
    munge_socket: str | None,
) -> CallerIdAnswer:
    """The native RPC with bounded retries; raises ProtocolFailure for the fallback."""
    if protocol_version not in SPOKEN_VERSIONS:
        raise ProtocolFailure(f"protocol version {protocol_version:#x} not spoken natively")
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Transient),
        # A retry starts only with MIN_ATTEMPT left after the wait, so the
        # retries never push the total past the budget.
        stop=(
            tenacity.stop_after_attempt(MAX_ATTEMPTS)
            | tenacity.stop_before_delay(max(0.0, budget.left() - MIN_ATTEMPT))
        ),
        wait=tenacity.wait_fixed(RETRY_WAIT),
        reraise=True,
    )
    try:
        reply = retrying(_native_once, conn, slurmd_port, protocol_version, budget, munge_socket)
    except _Unreachable as exc:
        logger().debug("callerid native to %s: unreachable: %s", conn.remote_ip, exc.why)
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "native", budget.spent())
    except _Transient as exc:
        raise ProtocolFailure(f"{MAX_ATTEMPTS} attempts failed, last: {exc}") from exc
    except munge.MungeError as exc:
        raise ProtocolFailure(str(exc)) from exc
    outcome, job_id = _outcome(reply)
    return CallerIdAnswer(outcome, job_id, "native", budget.spent())


# --- scontrol path ---------------------------------------------------------------------------


def _scontrol(conn: Connection, scontrol_path: str, budget: _Budget) -> CallerIdAnswer | None:
    """``scontrol callerid ...``; ``None`` when scontrol could not be run or said nothing we know.

    scontrol reads this node's slurm.conf and connects from this node's
    network namespace, which is right because the broker runs on the node.

    The deadline is our own timer, not sh's ``_timeout``: sh polls its
    timeout every 100 ms and so adds ~100 ms to *every* call (measured: an
    8 ms scontrol took 105 ms with ``_timeout``). The timer SIGKILLs the
    process at the deadline; ``wait()`` then returns at once.
    """
    left = budget.left()
    if left < MIN_SCONTROL:
        return None
    argv = [
        "callerid",
        str(conn.remote_ip),
        str(conn.remote_port),
        str(conn.local_ip),
        str(conn.local_port),
        str(conn.family),
    ]
    killed = threading.Event()
    try:
        command = sh.Command(scontrol_path)
        # Pipes, not sh's default pty: cheaper, and nothing here is interactive.
        running = command(
            *argv, _bg=True, _bg_exc=False, _ok_code=[0, 1], _tty_out=False, _return_cmd=True
        )
    except (sh.CommandNotFound, OSError) as exc:
        logger().debug("callerid: cannot run %s: %s", scontrol_path, exc)
        return None

    def kill() -> None:
        if running.is_alive():
            killed.set()
            with contextlib.suppress(OSError):
                running.kill()

    timer = threading.Timer(max(0.0, budget.left()), kill)
    timer.daemon = True
    timer.start()
    try:
        running.wait()
    except sh.ErrorReturnCode as exc:  # includes SignalException_SIGKILL
        if killed.is_set():
            return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "scontrol", budget.spent())
        logger().debug("callerid: %s failed: %s", scontrol_path, exc)
        return None
    finally:
        timer.cancel()
    return _scontrol_answer(running.exit_code, running.stdout, running.stderr, budget)


def _scontrol_answer(
    exit_code: int | None, stdout: object, stderr: object, budget: _Budget
) -> CallerIdAnswer | None:
    """Map scontrol's output to an answer (its messages are fixed strings in libslurm)."""
    out = _text(stdout)
    text = (out + "\n" + _text(stderr)).lower()
    if exit_code == 0:
        fields = out.split()
        if fields and fields[0].isdigit() and int(fields[0]) not in (0, NO_VAL, 0xFFFFFFFF):
            return CallerIdAnswer(
                CallerIdOutcome.MEMBER, int(fields[0]), "scontrol", budget.spent()
            )
    elif "indeterminate" in text:
        return CallerIdAnswer(CallerIdOutcome.INDETERMINATE, None, "scontrol", budget.spent())
    elif "unable to retrieve callerid data" in text:
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "scontrol", budget.spent())
    logger().debug("callerid: unexpected scontrol output (rc %s): %r", exit_code, text)
    return None


def _text(data: object) -> str:
    """sh hands back bytes or str depending on options; we want str."""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return str(data or "")


# --- public entry point ----------------------------------------------------------------------


def query_callerid(
    conn: Connection,
    *,
    slurmd_port: int,
    protocol_version: int,
    deadline: float = 1.0,
    method: Method = "auto",
    scontrol_path: str = "scontrol",
    munge_socket: str | None = None,
) -> CallerIdAnswer:
    """Which job does the source host's slurmd say owns ``conn``'s client end?

    Never raises for network, munge or protocol trouble: the broker needs an
    outcome to decide on, and every such failure is one of UNREACHABLE (no
    usable answer) or INDETERMINATE (the slurmd knows no job). The whole call
    returns within ``deadline`` seconds plus a few milliseconds.

    ``method`` in the answer is the method whose result the outcome is (a
    refusal seen by the native path is "native"); it is empty only when no
    method could even be tried. ``munge_socket`` is Slurm's
    ``AuthInfo=socket=`` when set; ``None`` means munged's default socket.
    """
    budget = _Budget(deadline)
    if conn.remote_ip.version != conn.local_ip.version:
        # Slurm's request has one family for both ends; the kernel never
        # reports a mixed pair, so this is a caller bug, not worth a query.
        logger().debug("callerid: mixed address families in %s", conn)
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "", budget.spent())
    if method in ("auto", "native"):
        try:
            return _native(conn, slurmd_port, protocol_version, budget, munge_socket)
        except ProtocolFailure as exc:
            logger().debug("callerid native to %s failed: %s", conn.remote_ip, exc)
            if method == "native":
                return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "", budget.spent())
    answer = _scontrol(conn, scontrol_path, budget)
    if answer is None:
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "", budget.spent())
    return answer


#: How long an answer for one TCP connection is reused. sshd runs the
#: AuthorizedKeysCommand (the gate) twice per login and the wrapper asks again
#: right after: without this, a silent source host would cost each login three
#: deadlines instead of one. A 4-tuple names one connection only while it is
#: open, and a connection's source job cannot change, so a short reuse is safe.
ANSWER_TTL = 30.0
_MAX_CACHED = 4096


class AnswerCache:
    """Callerid answers per connection 4-tuple, shared by the gate and adoption."""

    def __init__(self, ttl: float = ANSWER_TTL) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, int, str, int], tuple[float, CallerIdAnswer]] = {}
        self._pending: dict[tuple[str, int, str, int], threading.Event] = {}

    def query(
        self,
        conn: Connection,
        *,
        slurmd_port: int,
        protocol_version: int,
        deadline: float = 1.0,
        method: Method = "auto",
        scontrol_path: str = "scontrol",
    ) -> CallerIdAnswer:
        """:func:`query_callerid`, asked at most once per connection within the TTL.

        Concurrent requests for the same connection wait for the first one
        instead of each sending the RPC.
        """
        key = (str(conn.remote_ip), conn.remote_port, str(conn.local_ip), conn.local_port)
        while True:
            now = time.monotonic()
            with self._lock:
                hit = self._answers.get(key)
                if hit is not None and hit[0] > now:
                    return hit[1]
                waiting = self._pending.get(key)
                if waiting is None:
                    done = self._pending[key] = threading.Event()
                    break
            waiting.wait(timeout=deadline + 1.0)
        try:
            answer = query_callerid(
                conn, slurmd_port=slurmd_port, protocol_version=protocol_version,
                deadline=deadline, method=method, scontrol_path=scontrol_path,
            )
            with self._lock:
                if len(self._answers) >= _MAX_CACHED:
                    self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
                    if len(self._answers) >= _MAX_CACHED:
                        self._answers.clear()
                self._answers[key] = (time.monotonic() + self._ttl, answer)
            return answer
        finally:
            with self._lock:
                self._pending.pop(key, None)
            done.set()


#: The broker's one cache (module level: the gate and adoption share it).
ANSWERS = AnswerCache()
