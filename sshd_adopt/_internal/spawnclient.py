"""The wrapper's side of a session started inside its job's namespaces.

When the broker's answer says the job has namespaces of its own (``ns=1``), the wrapper
cannot run the session itself: only a privileged process can enter them. It sends a
"spawn" request, hands over its standard input, output and error, and then stands in
for the session towards sshd until it ends: signals sshd sends it are passed on, and it
exits as the session's command did (status, or the same signal), so sshd and the client
see what they would have. If sshd closes the session's streams (the client went away),
it leaves, and the command gets SIGHUP. The broker-side checks are in
:mod:`sshd_adopt._internal.services.spawning`, the spawn in
:mod:`sshd_adopt._internal.node.nsexec`.
"""

import _socket
import contextlib
import posix
import select
import signal
import sys

from sshd_adopt._internal import protocol
from sshd_adopt.errors import BrokerProtocolError

#: Signals passed on to the session: those sshd sends a session, and those a client may
#: ask for with a "signal" channel request. Not SIGKILL (it ends the wrapper: the session
#: then gets SIGHUP, as when its client goes), not the synchronous fault signals (SEGV,
#: FPE, ILL: a handler would loop on a real fault of the wrapper's own), not SIGPIPE
#: (the wrapper's own writes to a gone relay raise it: it stays ignored).
FORWARDED = tuple(getattr(signal, f"SIG{name}") for name in protocol.SESSION_SIGNALS
                  if name not in ("KILL", "SEGV", "FPE", "ILL", "PIPE"))


#: Exit status when sshd closed the session's streams first (the client is gone).
HUNG_UP = 255


class Ended:
    """The session ended: ``status`` to exit with, or ``signal_number`` to die of."""

    def __init__(self, status: int = 0, signal_number: int = 0) -> None:
        self.status = status
        self.signal_number = signal_number


def _hand_over(sock: _socket.socket) -> None:
    """Send our standard input, output and error: one byte carrying the three."""
    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in range(protocol.STD_FDS))
    sock.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])


def request(socket_path: str, *, timeout: float, sftp_server: str) -> tuple[
        _socket.socket | None, dict[str, str]]:
    """Ask the broker to start this session in the job's namespaces.

    Returns the connection (now the session's relay) and ``{}`` when it started, or
    ``None`` and the broker's answer when it did not (``denied``/``failed`` with a
    message, or ``allowed``: run the session yourself). Raises OSError or
    BrokerProtocolError.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(protocol.encode(protocol.spawn_request(posix.isatty(0), sftp_server)))
        answer = protocol.read_frame(sock)
        if answer.get("result") != protocol.SEND:
            sock.close()
            return None, answer
        _hand_over(sock)
    except BaseException:
        sock.close()
        raise
    return sock, {}


def relay(sock: _socket.socket) -> Ended:
    """Stand in for the session until it ends; return how it ended.

    Raises BrokerProtocolError with the broker's or the helper's message when the
    session could not be started, or when the relay was lost without an end.
    """
    sock.settimeout(None)

    def forward(number: int, _frame: object) -> None:
        try:
            sock.sendall(protocol.encode({"v": protocol.PROTOCOL_VERSION, "sig": str(number)}))
        except OSError:
            return  # the relay is gone; its end is reported by the loop

    for number in FORWARDED:
        signal.signal(number, forward)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(1, 0)  # only its hangup: sshd closed the session's streams
    while True:
        for fd, events in poller.poll():
            if fd == 1 and events & (select.POLLHUP | select.POLLERR):
                return Ended(status=HUNG_UP)
            if fd == sock.fileno():
                try:
                    answer = protocol.read_frame(sock)
                except BrokerProtocolError as err:
                    raise BrokerProtocolError(
                        f"the session's relay ended without its exit status ({err})") from None
                if answer.get("result") == protocol.EXITED:
                    if answer.get("signal"):
                        return Ended(signal_number=int(answer["signal"]))
                    return Ended(status=int(answer.get("status", "255")))
                raise BrokerProtocolError(answer.get("message")
                                          or "the session could not be started")


def leave(ended: Ended) -> None:
    """Exit as the session's command did (die of its signal, else exit with its status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if ended.signal_number:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP cannot be set
            signal.signal(ended.signal_number, signal.SIG_DFL)
        with contextlib.suppress(OSError):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [ended.signal_number])
            posix.kill(posix.getpid(), ended.signal_number)
        raise SystemExit(128 + ended.signal_number)
    raise SystemExit(ended.status)
