"""Ask the source host's slurmd which job owns the client end of an ssh connection.

This is pam_slurm_adopt's ``slurm_network_callerid()`` with two differences
that are the point of the module.

**Nothing worth having leaves the node.** The request carries a MUNGE
credential to another host, so it goes only to Slurm's own daemons: to an
address of a configured node (NodeAddr/NodeHostname from slurm.conf, in the
families slurmd listens on: IPv6 only with ``EnableIPv6``), on the port that
node's slurmd listens on. A source that is not a Slurm node (a login host, any
IPv6 source without EnableIPv6) is "not a node" at once: no credential, no
deadline to wait out. The credential itself is minted as the connecting user,
decodable only by SlurmdUser and bound to the request body with libslurm's
K12 hash (:mod:`sshd_adopt._internal.slurm.munge`,
:func:`~sshd_adopt._internal.slurm.callerid_wire.hash_payload`), so whoever
receives it cannot use it for anything else. It is asked only after sshd has
authenticated the connection, and only when the answer can change the outcome.

**One total deadline.** libslurm connects with TCPTimeout (2 s by default) and
then waits MessageTimeout (10 s) for the answer, so a source host that drops
packets to its slurmd port holds every login about 2 s, and a slurmd that
accepts but never answers holds it about 10 s. Here every socket operation,
the munge encode, the retries and the ``scontrol`` fallback share one budget
(default 1 s), and every failure maps to an outcome instead of an exception.

Two ways to ask:

``native``
    Speak the RPC ourselves: one TCP connection to the source's slurmd, a
    REQUEST_NETWORK_CALLERID in Slurm's framing, one response.
``scontrol``
    Run ``scontrol callerid ...`` as the connecting user (libslurm speaks
    whatever protocol the installed Slurm speaks). It costs a fork/exec and
    slurm.conf parsing.

``auto`` tries native and falls back to scontrol only when the slurmd closed
the connection without answering (how a slurmd rejects a protocol version it
does not take) or when the installed version is one we do not speak. Resets,
timeouts and garbage are final: the same credential-carrying request would
only go out again.

Which failures are retried: only those that say nothing about the source host
(a connection reset, EAGAIN), a bounded number of times. A refusal is an
answer (``UNREACHABLE`` at once, as the Slurm docs recommend for hosts
without slurmd: "better to have the RPC be rejected rather than silently
dropped"); a timeout is ``UNREACHABLE``.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import tenacity

from sshd_adopt._internal import run
from sshd_adopt._internal.cache import TtlCache
from sshd_adopt._internal.core.accounts import Account
from sshd_adopt._internal.core.connection import Connection, IPAddress
from sshd_adopt._internal.core.decision import CallerIdAnswer, CallerIdOutcome
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.slurm import callerid_wire as wire
from sshd_adopt._internal.slurm import munge

Method = Literal["auto", "native", "scontrol"]

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


class _Transient(Exception):
    """Worth another attempt: the failure says nothing about the source host."""


class _Unreachable(Exception):
    """Final: no slurmd answered at the source (refused, unroutable, timed out)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Budget:
    """An absolute monotonic deadline shared by everything one query does."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + max(0.0, seconds)

    def left(self) -> float:
        return self.end - time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start


def _outcome(reply: wire.Reply) -> tuple[CallerIdOutcome, int | None]:
    """MEMBER only for a real job id with rc 0; anything else is "no job known"."""
    if reply.job_id is not None and reply.rc == 0:
        return CallerIdOutcome.MEMBER, reply.job_id
    return CallerIdOutcome.INDETERMINATE, None


# --- what one query needs ------------------------------------------------------------------


@dataclass(frozen=True)
class CallerIdRequest:
    """Everything a query needs besides the connection: whom it is for and where it may go.

    ``requester`` is the connection's user (the credential names them);
    ``slurmds`` every configured node's slurmd address with its port
    (:attr:`SlurmFacts.slurmds`), the only destinations; ``credential`` who
    may decode the credential and how long it lives. Times are in seconds.
    """

    requester: run.Identity
    credential: munge.CredentialOptions
    slurmds: Mapping[IPAddress, int] = field(default_factory=dict)
    protocol_version: int = wire.PROTOCOL_22_05
    deadline: float = 1.0
    method: Method = "auto"
    scontrol: str = "/usr/bin/scontrol"
    munge: str = munge.MUNGE_CLI


# --- native path -----------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, budget: _Budget, *, first: bool) -> bytes:
    """Read exactly ``n`` bytes, every recv under what is left of the budget.

    A clean end of stream before any byte is :class:`wire.Rejected`, not worth a
    retry: it is how a slurmd refuses a request it cannot take (seen live:
    22.05 closes without a word on a newer protocol version, logging "Invalid
    Protocol Version 11520"; 26.05 does the same on a hash it cannot check),
    so the same request would only be refused again. A reset (RST) raises
    ConnectionResetError, which is retried.
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
                raise wire.Rejected("slurmd closed the connection without answering")
            raise wire.ProtocolFailure("response cut short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _native_once(conn: Connection, port: int, request: CallerIdRequest,
                 budget: _Budget) -> wire.Reply:
    """One connect/send/receive; classifies every failure for the retry policy."""
    left = budget.left()
    if left < MIN_ATTEMPT:
        raise _Unreachable("deadline reached")
    family = socket.AF_INET if conn.family == 4 else socket.AF_INET6
    body = wire.pack_request_body(conn)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(left)
            sock.connect((str(conn.remote_ip), port))
            # Encode only once connected: a refused connection costs no credential.
            credential = munge.encode(
                wire.hash_payload(body), requester=request.requester, options=request.credential,
                timeout=budget.left(), munge=request.munge,
            )
            frame = wire.pack_request(body, credential, request.protocol_version)
            sock.settimeout(max(budget.left(), 0.001))
            sock.sendall(frame)
            length = wire.response_length(_recv_exact(sock, 4, budget, first=True))
            return wire.parse_response(_recv_exact(sock, length, budget, first=False))
    except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
        raise _Unreachable("timed out") from exc
    except OSError as exc:
        if exc.errno in _UNREACHABLE_ERRNOS:
            raise _Unreachable(exc.strerror or str(exc)) from exc
        if exc.errno in _TRANSIENT_ERRNOS:
            raise _Transient(exc.strerror or str(exc)) from exc
        raise _Unreachable(str(exc)) from exc


def _native(conn: Connection, port: int, request: CallerIdRequest, budget: _Budget) -> wire.Reply:
    """The native RPC with bounded retries of transient failures.

    Raises :class:`wire.Rejected` (scontrol may help), :class:`wire.ProtocolFailure`
    or :class:`~sshd_adopt._internal.slurm.munge.MungeError` (final), or
    :class:`_Unreachable`.
    """
    if request.protocol_version not in wire.SPOKEN_VERSIONS:
        raise wire.Rejected(f"protocol version {request.protocol_version:#x} not spoken natively")
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
        reply: wire.Reply = retrying(_native_once, conn, port, request, budget)
    except _Transient as exc:
        raise _Unreachable(f"{MAX_ATTEMPTS} attempts failed, last: {exc}") from exc
    return reply


# --- scontrol path ---------------------------------------------------------------------------


def _scontrol(conn: Connection, request: CallerIdRequest, budget: _Budget) -> CallerIdAnswer | None:
    """``scontrol callerid ...`` as the requester; ``None`` when it said nothing we know.

    scontrol reads this node's slurm.conf and connects from this node's
    network namespace, which is right because the broker runs on the node;
    it mints its credential as the user it runs as (libslurm's
    ``slurm_network_callerid``: unrestricted, but K12-bound to its body).
    """
    if budget.left() < MIN_SCONTROL:
        return None
    argv = [request.scontrol, "callerid", str(conn.remote_ip), str(conn.remote_port),
            str(conn.local_ip), str(conn.local_port), str(conn.family)]
    try:
        done = run.run(argv, timeout=budget.left(), as_user=request.requester,
                       max_output=64 * 1024)
    except run.ToolTimeout:
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "scontrol", budget.spent())
    except run.ToolError as exc:
        logger().debug("callerid: %s", exc)
        return None
    return _scontrol_answer(done.returncode, done.text(), done.stderr.decode(errors="replace"),
                            budget)


def _scontrol_answer(
    exit_code: int | None, stdout: str, stderr: str, budget: _Budget
) -> CallerIdAnswer | None:
    """Map scontrol's output to an answer (its messages are fixed strings in libslurm)."""
    text = (stdout + "\n" + stderr).lower()
    if exit_code == 0:
        fields = stdout.split()
        if fields and fields[0].isdigit() and int(fields[0]) not in (0, wire.NO_VAL, 0xFFFFFFFF):
            return CallerIdAnswer(
                CallerIdOutcome.MEMBER, int(fields[0]), "scontrol", budget.spent()
            )
    elif "indeterminate" in text:
        return CallerIdAnswer(CallerIdOutcome.INDETERMINATE, None, "scontrol", budget.spent())
    elif "unable to retrieve callerid data" in text:
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "scontrol", budget.spent())
    logger().debug("callerid: unexpected scontrol output (rc %s): %r", exit_code, text)
    return None


# --- public entry point ----------------------------------------------------------------------


def slurmd_port(conn: Connection, slurmds: Mapping[IPAddress, int]) -> int | None:
    """The port of the slurmd at the connection's source, or None: not a Slurm node there.

    Only configured nodes' addresses count, in the families slurmd listens on
    (the caller's map holds IPv6 addresses only with ``EnableIPv6``).
    """
    return slurmds.get(conn.remote_ip)


def query_callerid(conn: Connection, request: CallerIdRequest) -> CallerIdAnswer:
    """Which job does the source host's slurmd say owns ``conn``'s client end?

    Never raises for network, munge or protocol trouble: the broker needs an
    outcome to decide on, and every such failure is one of NOT_A_NODE (nothing
    was sent), UNREACHABLE (no usable answer) or INDETERMINATE (the slurmd
    knows no job of the requester for it). The whole call returns within
    ``request.deadline`` seconds plus a few milliseconds.

    ``method`` in the answer is the method whose result the outcome is (a
    refusal seen by the native path is "native"); it is empty when nothing was
    tried.
    """
    budget = _Budget(request.deadline)
    if conn.remote_ip.version != conn.local_ip.version:
        # Slurm's request has one family for both ends; the kernel never
        # reports a mixed pair, so this is a caller bug, not worth a query.
        logger().debug("callerid: mixed address families in %s", conn)
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "", budget.spent())
    port = slurmd_port(conn, request.slurmds)
    if port is None:
        return CallerIdAnswer(CallerIdOutcome.NOT_A_NODE, None, "", budget.spent())
    if request.method in ("auto", "native"):
        try:
            reply = _native(conn, port, request, budget)
        except wire.Rejected as exc:
            logger().debug("callerid native to %s: %s", conn.remote_ip, exc)
            if request.method == "native":
                return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "native", budget.spent())
        except (wire.ProtocolFailure, munge.MungeError) as exc:
            logger().debug("callerid native to %s failed: %s", conn.remote_ip, exc)
            return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "native", budget.spent())
        except _Unreachable as exc:
            logger().debug("callerid native to %s: unreachable: %s", conn.remote_ip, exc.why)
            return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "native", budget.spent())
        else:
            outcome, job_id = _outcome(reply)
            return CallerIdAnswer(outcome, job_id, "native", budget.spent())
    answer = _scontrol(conn, request, budget)
    if answer is None:
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE, None, "", budget.spent())
    return answer


#: How long an answer for one TCP connection is reused. Early adoption, the wrapper's
#: request and the sweeper may all ask about one connection: without this, a silent
#: source host would cost each of them a deadline. A 4-tuple names one connection only
#: while it is open, and a connection's source job cannot change, so a short reuse is safe.
ANSWER_TTL: Final = 30.0


class SourceJobs:
    """:class:`~sshd_adopt._internal.core.ports.SourceJob` through the callerid RPC.

    Builds each request from the broker's state (the slurmds and credential options
    from slurm.conf, the method and deadline from the configuration) and asks at most
    once per connection and user within :data:`ANSWER_TTL`; concurrent askers wait for
    the first.
    """

    def __init__(self, state: Callable[[], BrokerState], ttl: float = ANSWER_TTL) -> None:
        self._state = state
        self._answers: TtlCache[tuple[str, int, str, int, int], CallerIdAnswer] = TtlCache(ttl)

    def ask(self, account: Account, connection: Connection | None) -> CallerIdAnswer:
        """Which job the source host's slurmd says ``connection`` runs in, asked as ``account``."""
        state = self._state()
        slurm = state.slurm
        if connection is None or slurm is None:
            return CallerIdAnswer(CallerIdOutcome.NO_SOCKET)
        settings = state.config.callerid
        request = CallerIdRequest(
            requester=run.Identity(account.uid, account.gid),
            credential=munge.CredentialOptions(
                restrict_uid=slurm.slurmd_user_uid, ttl=slurm.auth_ttl, socket=slurm.auth_socket),
            slurmds=slurm.slurmds,
            protocol_version=slurm.protocol_version,
            deadline=settings.deadline,
            method=settings.method,
            scontrol=settings.scontrol_path,
            munge=settings.munge_path,
        )
        key = (str(connection.remote_ip), connection.remote_port, str(connection.local_ip),
               connection.local_port, account.uid)
        return self._answers.get_or_compute(key, lambda: query_callerid(connection, request),
                                            wait=request.deadline + 1.0)
