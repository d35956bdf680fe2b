"""The broker's wire format: one length-prefixed frame of ``key=value`` items each way.

The ForceCommand wrapper imports this module on every login, so it uses no
module beyond the builtins (``json`` alone would add ~7 ms of start-up: it
pulls in ``re`` and ``enum``). A frame is a 4-byte big-endian length followed
by that many bytes: UTF-8 items ``key=value`` separated by NUL. NUL cannot
occur in environment values, user names or the messages we send, so no
escaping is needed, and a parser that fits on a screen can be fuzzed whole.

Frames are capped at :data:`MAX_FRAME` bytes: the broker runs as root and
reads from anyone who can connect, so it never reads an unbounded amount. A
request says only *what kind* of request it is (plus, for the wrapper,
per-``Match`` option overrides ``o.<option>`` that the broker accepts only
when they are stricter than its own); everything else the broker derives
itself from SO_PEERCRED and /proc.
"""

import _socket

from sshd_adopt.errors import BrokerProtocolError

PROTOCOL_VERSION = "1"
#: Where the broker listens unless configured otherwise (``broker.socket_path``).
DEFAULT_SOCKET = "/run/sshd-adopt/broker.sock"
MAX_FRAME = 8192
#: Replies to the auth-time gate carry a user's public keys, which can exceed
#: a request frame; only the broker sends frames this large, and only the
#: gate client (``sshd-adopt-keys``) accepts them. Requests stay at MAX_FRAME.
MAX_REPLY_FRAME = 256 * 1024
#: The one argument a "keys" request carries: the user sshd is authenticating
#: (``%u``). The broker verifies it against the sshd monitor's own title.
KEYS_USER = "user"
MAX_USER_CHARS = 64
MAX_ITEMS = 64
LENGTH_BYTES = 4
OVERRIDE_PREFIX = "o."
#: How long the wrapper waits for the broker unless its --timeout says otherwise.
DEFAULT_WRAPPER_TIMEOUT = 8.0
ENV_PREFIX = "env."

#: Session tickets: ``<socket dir>/sessions/<monitor pid>``, one per connection the
#: broker adopted right after authentication, holding the reply an "adopt" request
#: would get (a frame) plus the monitor's start time (``MONITOR_START``: clock ticks,
#: field 22 of ``/proc/<pid>/stat``, so a reused pid never matches). The wrapper
#: reads its connection's ticket instead of asking (no options on its line, its own
#: cgroup in that job); anything else asks the broker.
SESSIONS = "sessions"
MONITOR_START = "monitor_start"
#: In a ticket, the job's SLUID when its stepd told one (Slurm >= 25.11): on 26.05's
#: cgroup/v2 the job's cgroup is ``/<sluid>/step_extern``, elsewhere ``/job_<id>/...``.
SLUID = "sluid"

#: Request kinds. "adopt": the wrapper asks for its session; "ping": doctor and
#: readiness checks; "keys": the auth-time gate asks whether a user may enter;
#: "spawn": the wrapper of a session whose job has namespaces asks for its command to
#: be started inside them.
OPS = frozenset({"adopt", "ping", "keys", "spawn"})

#: In an "adopted" reply (and ticket): the job has namespaces of its own; the wrapper
#: then sends a "spawn" request instead of running the session itself.
NAMESPACES = "ns"
#: A "spawn" request's items: whether the session has a terminal ("1"/"0"; the broker
#: checks it is the session's own), and what ``internal-sftp`` runs (an absolute path).
SPAWN_TTY = "tty"
SPAWN_SFTP = "sftp"
MAX_PATH_CHARS = 256
#: The conversation of a "spawn" request: the broker answers ``result=send``; the wrapper
#: then sends one byte carrying its standard input, output and error (SCM_RIGHTS, exactly
#: three descriptors). Then, unless the broker refuses (``denied``/``failed``, or
#: ``allowed``: the job has no namespaces after all, run the session yourself), the
#: connection belongs to the spawned session's relay: the wrapper may send ``sig=<n>``
#: frames (signals sshd sent it) and at the end receives ``result=exited`` with
#: ``status=<n>`` or ``signal=<n>``.
SEND = "send"
EXITED = "exited"
STD_FDS = 3
#: Signals passed on to a spawned session: those a client may send with a "signal"
#: channel request (OpenSSH ``session.c: session_signal_req``), by name.
SESSION_SIGNALS = ("ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT",
                   "SEGV", "TERM", "USR1", "USR2")

#: Result of a "keys" request that lets the user in; the keys are in ``keys``.
KEYS = "keys"

#: Results of an "adopt" request.
ADOPTED = "adopted"  # in a job; ``job`` and ``env.*`` are set
ALLOWED = "allowed"  # let in without adoption (root, exempt, policy)
DENIED = "denied"  # refused; ``message`` is for the user
FAILED = "failed"  # the broker could not decide; the wrapper applies its failure action

_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
#: What a user name may contain (POSIX portable names plus ``@`` and ``$`` for
#: directory services): anything else never names a real account.
_USER_CHARS = _KEY_CHARS | frozenset("@$")


def encode(items: dict[str, str], *, limit: int = MAX_FRAME) -> bytes:
    """Serialise one frame; refuse bad keys, NULs and frames over ``limit`` bytes."""
    parts = []
    for key, value in items.items():
        if not key or not _KEY_CHARS.issuperset(key) or "\0" in value:
            raise BrokerProtocolError(f"cannot encode item {key!r}")
        parts.append(f"{key}={value}")
    body = "\0".join(parts).encode("utf-8")
    if not body or len(body) > limit:
        raise BrokerProtocolError(f"frame of {len(body)} bytes outside 1..{limit}")
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def frame_length(header: bytes, *, limit: int = MAX_FRAME) -> int:
    """Parse and bound the 4-byte length prefix."""
    if len(header) != LENGTH_BYTES:
        raise BrokerProtocolError("frame cut short in its length prefix")
    length = int.from_bytes(header, "big")
    if length == 0 or length > limit:
        raise BrokerProtocolError(f"frame length {length} outside 1..{limit}")
    return length


def decode(body: bytes, *, limit: int = MAX_FRAME) -> dict[str, str]:
    """Parse one frame's body into a dict; duplicates, bad keys and bad UTF-8 are errors."""
    if len(body) > limit:
        raise BrokerProtocolError(f"frame of {len(body)} bytes exceeds {limit}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BrokerProtocolError(f"frame is not UTF-8: {err}") from err
    items: dict[str, str] = {}
    parts = text.split("\0")
    if len(parts) > MAX_ITEMS:
        raise BrokerProtocolError(f"frame has more than {MAX_ITEMS} items")
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key or not _KEY_CHARS.issuperset(key):
            raise BrokerProtocolError(f"malformed item {part[:40]!r}")
        if key in items:
            raise BrokerProtocolError(f"duplicate item {key!r}")
        items[key] = value
    return items


def parse_request(body: bytes) -> tuple[str, dict[str, str]]:
    """Validate a request frame and return (op, overrides).

    Override values are returned as strings; the broker validates names and
    values against its own option table and strictness rules.

    A "keys" request takes no overrides (the gate's policy is the broker's
    own) and exactly one argument, ``user`` (sshd's ``%u``); it comes back as
    the only entry of the second element, ``{"user": name}``.
    """
    items = decode(body)
    if items.get("v") != PROTOCOL_VERSION:
        raise BrokerProtocolError(f"unsupported protocol version {items.get('v')!r}")
    op = items.get("op", "")
    if op not in OPS:
        raise BrokerProtocolError(f"unknown request {op[:40]!r}")
    if op == "keys":
        user = items.get(KEYS_USER, "")
        if set(items) != {"v", "op", KEYS_USER}:
            raise BrokerProtocolError("a keys request carries exactly v, op and user")
        if not user or len(user) > MAX_USER_CHARS or not _USER_CHARS.issuperset(user):
            raise BrokerProtocolError(f"bad user name {user[:40]!r}")
        return op, {KEYS_USER: user}
    if op == "spawn":
        if set(items) != {"v", "op", SPAWN_TTY, SPAWN_SFTP}:
            raise BrokerProtocolError("a spawn request carries exactly v, op, tty and sftp")
        sftp = items[SPAWN_SFTP]
        if items[SPAWN_TTY] not in ("0", "1"):
            raise BrokerProtocolError(f"bad tty flag {items[SPAWN_TTY][:8]!r}")
        if not sftp.startswith("/") or len(sftp) > MAX_PATH_CHARS or not sftp.isprintable():
            raise BrokerProtocolError(f"bad sftp server path {sftp[:40]!r}")
        return op, {SPAWN_TTY: items[SPAWN_TTY], SPAWN_SFTP: sftp}
    overrides: dict[str, str] = {}
    for key, value in items.items():
        if key in ("v", "op"):
            continue
        if not key.startswith(OVERRIDE_PREFIX) or len(key) > 64 or len(value) > 256:
            raise BrokerProtocolError(f"unexpected request item {key[:40]!r}")
        overrides[key.removeprefix(OVERRIDE_PREFIX)] = value
    return op, overrides


def adopt_request(overrides: dict[str, str]) -> dict[str, str]:
    """The wrapper's request: adopt my session (with its ForceCommand-line options)."""
    request = {"v": PROTOCOL_VERSION, "op": "adopt"}
    for key, value in overrides.items():
        request[OVERRIDE_PREFIX + key] = value
    return request


def keys_request(user: str) -> dict[str, str]:
    """The AuthorizedKeysCommand's request: the keys of ``user`` (sshd's ``%u``), if any."""
    return {"v": PROTOCOL_VERSION, "op": "keys", KEYS_USER: user}


def spawn_request(tty: bool, sftp_server: str) -> dict[str, str]:
    """The wrapper's request to have its session started inside its job's namespaces."""
    return {"v": PROTOCOL_VERSION, "op": "spawn", SPAWN_TTY: "1" if tty else "0",
            SPAWN_SFTP: sftp_server}


def ping_request() -> dict[str, str]:
    """Doctor's and readiness checks' request: who are you, which configuration."""
    return {"v": PROTOCOL_VERSION, "op": "ping"}


def reply(result: str, *, message: str = "", job: int | None = None,
          env: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """Build a reply's items (the broker side)."""
    items = {"v": PROTOCOL_VERSION, "result": result}
    if message:
        items["message"] = message.replace("\0", "")
    if job is not None:
        items["job"] = str(job)
    for key, value in (env or {}).items():
        items[ENV_PREFIX + key] = value
    items.update(extra)
    return items


def sessions_dir(socket_path: str) -> str:
    """Where the tickets are: next to the broker's socket."""
    return f"{socket_path.rpartition('/')[0]}/{SESSIONS}"


def stat_identity(stat: bytes) -> tuple[int, int]:
    """``(ppid, start time in clock ticks)`` from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may hold spaces and parentheses: fields are counted
    after its last ``)`` (``proc_pid_stat(5)``). Raises ValueError on other text.
    """
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19])


def exchange(
    socket_path: str, request: dict[str, str], *, timeout: float, limit: int = MAX_FRAME
) -> dict[str, str]:
    """Client side: send one request to the broker and return its reply's items.

    Every step is bounded by ``timeout`` (blocking socket with a timeout);
    raises OSError or BrokerProtocolError. Uses ``_socket`` directly: the
    ``socket`` module would cost the wrapper ~6 ms of imports (``enum``).
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(encode(request))
        return read_frame(sock, limit=limit)
    finally:
        sock.close()


def read_frame(sock: _socket.socket, *, limit: int = MAX_FRAME) -> dict[str, str]:
    """One whole frame from ``sock`` (its timeout applies to each read)."""
    length = frame_length(_recv_exact(sock, LENGTH_BYTES), limit=limit)
    return decode(_recv_exact(sock, length), limit=limit)


def _recv_exact(sock: _socket.socket, count: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < count:
        chunk = sock.recv(min(count - got, 65536))
        if not chunk:
            raise BrokerProtocolError("the broker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
