"""The privileged spawn: start a session's command inside its job's namespaces.

Run as ``python -I -m sshd_adopt._internal.node.nsexec`` by the broker (a fresh,
single-threaded process: ``setns(2)`` into a mount namespace refuses a threaded caller),
with its standard input a unix socket to the broker (a socket pair, or a connection
systemd accepted on the root-only ``sshd-adopt-spawn.socket``). Who the session runs as,
in which job and namespace, the broker derived itself from ``/proc`` and the job's stepd
(:mod:`sshd_adopt._internal.services.spawning`); the command and environment are the
session's own (what sshd gave it), and run only after every privilege is gone. It
announces its pid, and is told anything only once the broker has put it into the job's
extern step. In order:

1. receive one message from the broker (peer must be root): a length-prefixed JSON
   object and the descriptors it names -- the session's standard input, output and
   error (sshd's, passed on by the wrapper), the wrapper's broker connection, and the
   job's namespaces (from its stepd, ``REQUEST_GET_NS_FD(S)``);
2. enter the namespaces in the order given; a mount namespace resets the root
   directory, so this process's own root (``/``; in the lab, a chroot generation's) is
   found again in the new namespace, as a mount point with its device and inode, and
   entered (refused if it is not there: never a session in the wrong tree);
3. fork: the child starts a session (``setsid``), takes the terminal as its
   controlling terminal if the session has one (``TIOCSCTTY``), takes the session's
   resource limits and umask, then its groups, gid and uid (every capability goes with
   the uid change; checked), joins a new session keyring (none of root's or another
   session's keys), resets every signal disposition and the signal mask, changes to
   the home directory (``/`` if that fails, as sshd does), and execs the command;
4. the parent waits for that exec, drops to the same credentials and relays: a
   ``sig=<n>`` frame from the
   wrapper becomes that signal to the command's process group, the wrapper's
   connection closing becomes SIGHUP (then SIGKILL after :data:`HANGUP_GRACE`), and the
   command's end becomes ``result=exited`` with ``status`` or ``signal`` for the
   wrapper, which exits the same way: sshd and the client see what they would have.
"""

from __future__ import annotations

# Everything is imported before ``setns``: afterwards the interpreter's own library may be
# out of reach (a mount namespace made by a chrooted slurmstepd has the host's root).
import array
import contextlib
import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import sys
import termios
from typing import Any, NoReturn

from sshd_adopt._internal import protocol
from sshd_adopt.errors import BrokerProtocolError

#: Most descriptors in the broker's message: the wrapper's connection, at most three
#: namespaces (PID, user, mount).
MAX_FDS = 4
#: Most bytes of the JSON description (the environment is at most 256 KiB).
MAX_PARAMS = 1024 * 1024
#: How long the broker may take to send its message (seconds).
RECEIVE_TIMEOUT = 30.0
#: How long the wrapper may take to send its streams once asked (seconds).
STREAMS_TIMEOUT = 10.0
#: After the wrapper is gone: how long the command has between SIGHUP and SIGKILL (s).
HANGUP_GRACE = 5.0
#: Signals a wrapper may pass on (those of sshd's "signal" channel request).
RELAYED = frozenset(getattr(signal, f"SIG{name}") for name in protocol.SESSION_SIGNALS)
_PEERCRED = struct.Struct("3i")
_CAP_LINES = (b"CapPrm:", b"CapEff:", b"CapAmb:", b"CapInh:")
#: keyctl(2) by architecture (``KEYCTL_JOIN_SESSION_KEYRING`` has no Python binding):
#: the kernel's syscall tables (x86 syscall_64.tbl, asm-generic unistd.h for aarch64,
#: riscv64 and loongarch64, powerpc and s390 syscall.tbl).
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "loongarch64": 219,
               "ppc64le": 271, "s390x": 280}
_KEYCTL_JOIN_SESSION_KEYRING = 1
#: libc, resolved now: nothing may be loaded once the namespace is entered.
_LIBC = ctypes.CDLL(None, use_errno=True)


class SpawnError(Exception):
    """The session cannot be started as asked (the text goes to the wrapper)."""


def receive_fds(sock: socket.socket, size: int, most: int) -> tuple[bytes, list[int]]:
    """``size`` bytes and the descriptors that come with them (SCM_RIGHTS, at most
    ``most``, close-on-exec); a message whose descriptors did not all fit is refused
    (those that came are closed). The socket's timeout applies."""
    fds = array.array("i")
    data, ancillary, flags, _ = sock.recvmsg(
        size, socket.CMSG_SPACE((most + 1) * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_CTRUNC or len(fds) > most:
        for fd in fds:
            os.close(fd)
        raise SpawnError(f"more than {most} descriptors came")
    return data, list(fds)


def receive_streams(conn: socket.socket) -> list[int]:
    """The wrapper's standard input, output and error, asked for with ``result=send``:
    one byte carrying exactly three descriptors (anything else is refused and what came
    is closed). Taken here, not by the broker: a descriptor of the user's choosing (one
    whose close or fstat blocks) can only ever hold up this session."""
    conn.settimeout(STREAMS_TIMEOUT)
    conn.sendall(protocol.encode({"v": protocol.PROTOCOL_VERSION, "result": protocol.SEND}))
    data, fds = receive_fds(conn, 1, protocol.STD_FDS)
    if len(fds) != protocol.STD_FDS or len(data) != 1:
        for fd in fds:
            os.close(fd)
        raise SpawnError(f"expected one byte carrying {protocol.STD_FDS} descriptors, got "
                         f"{len(data)} byte(s) and {len(fds)}")
    return fds


def _receive(ctl: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The broker's message: its JSON object and its descriptors (close-on-exec)."""
    pid, uid, _gid = _PEERCRED.unpack(
        ctl.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    if uid != 0:
        raise SpawnError(f"the spawn's peer is pid {pid} uid {uid}, not root")
    ctl.settimeout(RECEIVE_TIMEOUT)
    # Whom to put into the job (systemd may have started us: the broker cannot know).
    ctl.sendall(os.getpid().to_bytes(protocol.LENGTH_BYTES, "big"))
    head, fds = receive_fds(ctl, protocol.LENGTH_BYTES, MAX_FDS)
    if len(head) != protocol.LENGTH_BYTES:
        raise SpawnError("the broker's message was cut short")
    length = int.from_bytes(head, "big")
    if not 0 < length <= MAX_PARAMS:
        raise SpawnError(f"description of {length} bytes")
    body = bytearray()
    while len(body) < length:
        chunk = ctl.recv(length - len(body))
        if not chunk:
            raise SpawnError("the broker closed the connection")
        body += chunk
    params = json.loads(body)
    if not isinstance(params, dict):
        raise SpawnError("description is not an object")
    return params, list(fds)


def _root_identity() -> tuple[int, int]:
    info = os.stat("/")
    return info.st_dev, info.st_ino


def _unescape(field: bytes) -> bytes:
    """A mountinfo path: the kernel writes space, tab, newline and backslash as octal
    escapes (``\\040``...; ``fs/proc_namespace.c: mangle``). By hand: after ``setns`` the
    interpreter's own library may be out of reach (codecs are imported lazily)."""
    for escaped, plain in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"),
                           (b"\\134", b"\\")):
        field = field.replace(escaped, plain)
    return field


def _find_root(identity: tuple[int, int]) -> str:
    """Where the directory ``identity`` (device, inode) is mounted in this (new) mount
    namespace; raises SpawnError when it is not a mount point here. Only mounts of that
    device are looked at (mountinfo's field 3): a hung network mount is never touched."""
    device = f"{os.major(identity[0])}:{os.minor(identity[0])}".encode()
    with open("/proc/self/mountinfo", "rb") as handle:
        table = handle.read(16 * 1024 * 1024)
    for line in table.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5 or fields[2] != device:
            continue
        point = _unescape(fields[4])
        try:
            info = os.stat(point)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == identity:
            return os.fsdecode(point)
    raise SpawnError("the session's root directory is not mounted in the job's namespace")


def _setns(fd: int, kind: int) -> None:
    """``setns(2)``: ``os.setns`` from Python 3.12, libc's before (Debian 12 has 3.11)."""
    call = getattr(os, "setns", None)
    if call is not None:
        call(fd, kind)
        return
    if _LIBC.setns(fd, kind) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"setns: {os.strerror(number)}")


def enter_namespaces(kinds: list[int], fds: list[int]) -> None:
    """``setns`` into each of ``fds`` (types ``kinds``), then into the directory that was
    this process's root, found again in the new namespace."""
    if len(kinds) != len(fds):
        raise SpawnError(f"{len(fds)} namespace descriptors for {len(kinds)} types")
    root = _root_identity()
    for kind, fd in zip(kinds, fds, strict=True):
        _setns(fd, kind)
        os.close(fd)
    if _root_identity() != root:
        where = _find_root(root)
        os.chroot(where)
    os.chdir("/")


def _take_credentials(params: dict[str, Any]) -> None:
    """Become the session's user: groups, then gid, then uid; then check nothing is left."""
    uid, gid = int(params["uid"]), int(params["gid"])
    if uid == 0 or gid == 0:
        raise SpawnError("a session is never spawned as root")
    os.setgroups([int(group) for group in params["groups"]])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SpawnError("credentials did not take")
    with open("/proc/self/status", "rb") as handle:
        for line in handle.read(65536).splitlines():
            if line.startswith(_CAP_LINES) and int(line.split()[1], 16) != 0:
                raise SpawnError(f"capabilities left: {line.decode()}")


def _limits(params: dict[str, Any]) -> None:
    for number, (soft, hard) in params["rlimits"].items():  # JSON keys are text
        resource.setrlimit(int(number), (int(soft), int(hard)))
    os.umask(int(params["umask"]) & 0o777)


def _login_uid(uid: int | None) -> None:
    """The session's audit login uid, the one pam_loginuid gave sshd's session (set while
    still root; unset, the session could set any it likes, root's included)."""
    if uid is not None:
        with open("/proc/self/loginuid", "w", encoding="ascii") as handle:
            handle.write(str(int(uid)))


def _own_keyring() -> None:
    """A new, empty session keyring for the session (as pam_keyinit gives one): never the
    keys of the process that started this one, nor of another session."""
    number = _SYS_KEYCTL.get(os.uname().machine)
    if number is None:
        raise SpawnError(f"no keyctl syscall number known for {os.uname().machine}")
    if _LIBC.syscall(ctypes.c_long(number), ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING),
                     ctypes.c_void_p(None)) < 0:
        raise SpawnError(f"keyctl: {os.strerror(ctypes.get_errno())}")


def _default_signals() -> None:
    """Every signal as a freshly exec'd program expects it (Python ignores SIGPIPE and
    SIGXFSZ, and handles SIGINT), none blocked."""
    for number in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):  # SIGKILL, SIGSTOP, RT signals
            signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _child(params: dict[str, Any]) -> NoReturn:
    """In the forked child: become the session and exec its command (never returns)."""
    try:
        try:
            _default_signals()  # first: a Ctrl-C now reaches the session as it would
            os.setsid()
            if params["tty"]:
                # Steal it from the wrapper's session (allowed to CAP_SYS_ADMIN, arg 1): the
                # terminal's signals (Ctrl-C, SIGWINCH, hangup) then reach this session.
                fcntl.ioctl(0, termios.TIOCSCTTY, 1)
            _limits(params)
            _login_uid(params.get("loginuid"))
            _take_credentials(params)
            _own_keyring()
            argv = [str(arg) for arg in params["argv"]]
            env = {str(k): str(v) for k, v in params["env"].items()}
            path, home = str(params["path"]), str(params["home"])
        except Exception as err:
            os.write(2, f"sshd-adopt: cannot start the session in the job: {err}\n".encode())
            os._exit(1)
        try:
            os.chdir(home)
        except OSError as err:  # sshd's words (session.c: do_child)
            os.write(2, f"Could not chdir to home directory {home}: {err.strerror}\n".encode())
            os.chdir("/")
        try:
            os.execve(path, argv, env)  # noqa: S606  (as the user, after every check)
        except OSError as err:
            os.write(2, f"sshd-adopt: {path}: {err.strerror}\n".encode())
    finally:
        os._exit(1)


def _send(conn: socket.socket, **items: str) -> None:
    with contextlib.suppress(OSError):  # the wrapper is gone: nobody to tell
        conn.sendall(protocol.encode({"v": protocol.PROTOCOL_VERSION, **items}))


#: The session's child, once forked (for the SIGTERM handler).
_relayed: list[int] = []


def _hang_up(_number: int, _frame: object) -> None:
    """SIGTERM (the spawner's unit instance stopped): hang the session up, as its end."""
    for child in _relayed:
        _signal(child, signal.SIGHUP)


def relay(conn: socket.socket, child: int, execed: int, params: dict[str, Any]) -> int:
    """Pass the wrapper's signals on to ``child``'s process group until it ends; tell the
    wrapper how it ended. Drops to the session's credentials once the child exec'd
    (``execed`` reaches its end: until then the child is root, and a signal from the
    user's ids would be refused). Returns the wait status."""
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    poller.register(execed, select.POLLIN)
    conn.settimeout(5.0)
    hung_up = False
    while True:
        ready = dict(poller.poll(HANGUP_GRACE * 1000 if hung_up else None))
        if execed in ready and not os.read(execed, 64):
            poller.unregister(execed)
            os.close(execed)
            _take_credentials(params)
        if pidfd in ready:
            _, status = os.waitpid(child, 0)
            if os.WIFSIGNALED(status):
                _send(conn, result=protocol.EXITED, signal=str(os.WTERMSIG(status)))
            else:
                _send(conn, result=protocol.EXITED,
                      status=str(os.waitstatus_to_exitcode(status)))
            return status
        if not ready and hung_up:
            _signal(child, signal.SIGKILL)
            continue
        if conn.fileno() in ready:
            try:
                number = int(protocol.read_frame(conn).get("sig", ""))
            except (OSError, ValueError, BrokerProtocolError):
                # The wrapper is gone (sshd ended it, the client went away): so does the
                # command, as a terminal's hangup would end it.
                poller.unregister(conn.fileno())
                _signal(child, signal.SIGHUP)
                hung_up = True
                continue
            if number in RELAYED:
                _signal(child, number)


def _signal(child: int, number: int) -> None:
    try:
        os.killpg(child, number)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, number)


def main() -> None:
    """Entry point (see the module's description); exits 0 after relaying, 1 on failure."""
    # Nothing inherited beyond the three standard streams reaches the session (systemd
    # also passes the accepted connection as fd 3, LISTEN_FDS).
    os.closerange(3, max(os.sysconf("SC_OPEN_MAX"), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    ctl = socket.socket(fileno=0)
    conn: socket.socket | None = None
    try:
        params, fds = _receive(ctl)
        kinds = [int(kind) for kind in params["namespaces"]]
        if len(fds) != 1 + len(kinds):
            raise SpawnError(f"{len(fds)} descriptors received, {1 + len(kinds)} expected")
        conn = socket.socket(fileno=fds[0])
        std = receive_streams(conn)
        if params["tty"]:  # only the session's own controlling terminal
            info = os.fstat(std[0])
            if not stat.S_ISCHR(info.st_mode) or info.st_rdev != params["controlling_tty"] \
                    or not params["controlling_tty"]:
                raise SpawnError("its standard input is not its controlling terminal")
        for target, fd in enumerate(std):
            os.dup2(fd, target)  # replaces the broker's socket on 0; inheritable
        for fd in std:
            if fd > 2:
                os.close(fd)
        enter_namespaces(kinds, fds[1:])
        signal.signal(signal.SIGTERM, _hang_up)
        execed, exec_seen = os.pipe()  # close-on-exec: EOF once the child exec'd or died
        child = os.fork()
        if child == 0:
            conn.close()
            os.close(execed)
            _child(params)
        _relayed.append(child)
        os.close(exec_seen)
        devnull = os.open("/dev/null", os.O_RDWR)
        for target in range(protocol.STD_FDS):  # hold none of the session's streams
            os.dup2(devnull, target)
        os.close(devnull)
        relay(conn, child, execed, params)
    except Exception as err:  # whatever it is, the wrapper is told
        if conn is not None:
            _send(conn, result=protocol.FAILED,
                  message=f"sshd-adopt: cannot start the session in the job: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
