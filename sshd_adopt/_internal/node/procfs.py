"""Race-tolerant readers of /proc: processes, their sockets, their TCP tables.

Every reader maps OS and psutil errors once (:func:`_mapped`): a vanished
process becomes :class:`~sshd_adopt.errors.NoSuchProcess`, a refusal
:class:`~sshd_adopt.errors.AccessDenied`, anything else
:class:`~sshd_adopt.errors.ProcError`, always ``raise … from err``. Processes
come and go while we look; each place where that can happen says so in a
comment and decides whether the race is harmless (skip) or must abort the
request (raise). This is psutil's own discipline (``_pslinux.wrap_exceptions``).

Where psutil fits (uids, ppid, cmdline, create time, the process tree) it is
used. Three things are read by hand, on purpose:

* ``/proc/<pid>/exe``: psutil strips a `` (deleted)`` suffix when the path
  has since been re-created, which is exactly the "binary replaced on disk"
  fact the session checks must see.
* ``/proc/<pid>/comm``: psutil's ``name()`` may substitute a name derived
  from the (user-controlled) cmdline when comm is 15 characters long.
* ``/proc/<pid>/net/tcp{,6}``: psutil reads ``/proc/net/…``, i.e. the
  network namespace of the *reader*. The broker may run in another namespace
  than the sshd it inspects (the multi-node lab does exactly that), so the
  table is read through the inspected process, which shows *its* namespace.

:data:`PROCFS` is only consulted for those hand-read files; tests point it
at a fake tree (as psutil's tests do with ``psutil.PROCFS_PATH``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import psutil

from sshd_adopt._internal.core.connection import Connection, IPAddress, normalise
from sshd_adopt._internal.node import sockpeek
from sshd_adopt.errors import AccessDenied, NoSuchProcess, ProcError

PROCFS: str = "/proc"
# Bytes read from one /proc/<pid>/net/tcp{,6}: ~150 bytes a socket, so a node
# with ~100k sockets still fits; a larger file is refused rather than parsed
# half-way (a truncated table could miss the socket we look for).
MAX_TCP_TABLE = 16 * 1024 * 1024

T = TypeVar("T")

# Whether connection_of may use pidfd_getfd (cleared for good the first time
# the kernel refuses it; see sockpeek).
_pidfd_usable = True

# One row of /proc/net/tcp{,6}: "sl: local rem st tx:rx tr:when retr uid timeout inode …".
# Addresses are 8 (IPv4) or 32 (IPv6) hex digits, ports 4; the kernel prints
# them with %08X/%04X, so anything else means we are not reading what we think.
_ADDRESS = re.compile(r"([0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):([0-9A-Fa-f]{4})")
_INODE = re.compile(r"[0-9]+")
_SOCKET_LINK = re.compile(r"socket:\[([0-9]+)\]")


@dataclass(frozen=True)
class ProcInfo:
    """The facts about one process that the session checks need.

    ``exe`` is the raw text of ``/proc/<pid>/exe`` (a replaced binary keeps
    its `` (deleted)`` suffix); ``None`` for kernel threads.
    ``start_time`` is psutil's ``create_time()``: with ``pid`` it names one
    process for good, which is how pid reuse is detected later.
    """

    pid: int
    ppid: int
    real_uid: int
    effective_uid: int
    real_gid: int
    name: str
    exe: str | None
    cmdline: tuple[str, ...]
    start_time: float

    @property
    def title(self) -> str:
        """The command line as ``ps`` shows it.

        sshd's ``setproctitle`` writes the title over argv and pads with NULs,
        which psutil returns as trailing empty arguments; they are dropped.
        """
        return " ".join(self.cmdline).rstrip()


@contextlib.contextmanager
def _mapped(pid: int) -> Iterator[None]:
    """Map psutil's and the OS's errors about ``pid`` to ours, once."""
    try:
        yield
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError) as err:
        # psutil.ZombieProcess is a NoSuchProcess: a zombie has no fds, no
        # exe and no namespace left to inspect, so it counts as gone.
        raise NoSuchProcess(f"process {pid} is gone") from err
    except (psutil.AccessDenied, PermissionError) as err:
        raise AccessDenied(f"not allowed to inspect process {pid}: {err}") from err
    except (psutil.Error, OSError) as err:
        raise ProcError(f"process {pid}: {err}") from err


def _read_link(path: str) -> str | None:
    """``readlink`` that turns "no such file" into ``None`` (other errors propagate)."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None


def proc_info(pid: int) -> ProcInfo:
    """Read one process's facts; a zombie counts as gone.

    Raises NoSuchProcess if ``pid`` exits (or is reused) while we read it.
    """
    if pid <= 0:
        # ppid 0 is "no parent" (init, kthreadd); psutil would invent pid 0.
        raise NoSuchProcess(f"no process {pid}")
    with _mapped(pid):
        proc = psutil.Process(pid)  # records the create time: the identity we check below
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(pid)
            uids = proc.uids()
            gids = proc.gids()
            ppid = proc.ppid()
            cmdline = tuple(proc.cmdline())
        # Kernel threads have no exe; a process that exits right now loses
        # its exe and comm too -- the identity check below tells the two apart.
        exe = _read_link(f"{PROCFS}/{pid}/exe")
        with open(f"{PROCFS}/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            name = handle.read().rstrip("\n")
        # The exe link and comm were read by path, after psutil's reads: if the
        # process exited and its pid was reused in between, they describe
        # another process. Re-reading the create time closes that window.
        if not proc.is_running():
            raise psutil.NoSuchProcess(pid)
        return ProcInfo(
            pid=pid,
            ppid=ppid,
            real_uid=uids.real,
            effective_uid=uids.effective,
            real_gid=gids.real,
            name=name,
            exe=exe,
            cmdline=cmdline,
            start_time=proc.create_time(),
        )


def _socket_fds(pid: int) -> list[tuple[int, int]]:
    """``(fd, inode)`` of every socket ``pid`` holds, in fd order."""
    fd_dir = f"{PROCFS}/{pid}/fd"
    with _mapped(pid):
        names = os.listdir(fd_dir)
    sockets: list[tuple[int, int]] = []
    for name in names:
        if not name.isdigit():
            continue  # /proc/<pid>/fd holds only numbers; anything else is not an fd
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except PermissionError as err:
            # Root may read any fd link; a refusal here is misconfiguration
            # (or a hardened kernel), not a race, so it is not skipped silently.
            raise AccessDenied(f"not allowed to read {fd_dir}/{name}: {err}") from err
        except (FileNotFoundError, ProcessLookupError):
            # The fd was closed (or the whole process exited) between listdir
            # and readlink: psutil skips it the same way ("file which is gone
            # in the meantime"). A vanished process is caught by the callers'
            # identity checks, not here.
            continue
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENAMETOOLONG):
                continue  # EINVAL: not a link; ENAMETOOLONG: not "socket:[N]" either
            raise ProcError(f"reading {fd_dir}/{name}: {err}") from err
        match = _SOCKET_LINK.fullmatch(target)
        if match:
            sockets.append((int(name), int(match.group(1))))
    sockets.sort()
    return sockets


def socket_inodes(pid: int) -> frozenset[int]:
    """Inodes of the sockets ``pid`` holds (fds closed meanwhile are skipped)."""
    return frozenset(inode for _fd, inode in _socket_fds(pid))


def _address(hex_text: str) -> IPAddress:
    """Decode /proc/net/tcp's address: 32-bit words printed as native-endian hex.

    The kernel prints each 32-bit word of the network-order address with
    ``%08X`` of its *native* value, so on little-endian hosts 127.0.0.1 reads
    ``0100007F``. Packing each word back natively restores network order on
    any host (reference §1.8).
    """
    raw = b"".join(
        struct.pack("=I", int(hex_text[i : i + 8], 16)) for i in range(0, len(hex_text), 8)
    )
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    return ipaddress.IPv6Address(raw)


def _endpoint(text: str) -> tuple[IPAddress, int]:
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(f"not an address:port field: {text!r}")
    return normalise(_address(match.group(1))), int(match.group(2), 16)


def parse_tcp_table(text: str, source: str) -> list[Connection]:
    """Parse the text of /proc/net/tcp or tcp6 (any state) into connections.

    Every socket is returned whatever its state, as pam_slurm_adopt does: the
    caller matches by inode. A line we cannot parse raises ProcError naming
    ``source`` and the line number, because silently skipping it could hide
    the very socket we look for.
    """
    connections: list[Connection] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or (lineno == 1 and fields[0] == "sl"):
            continue  # the header (and a trailing empty line)
        try:
            if len(fields) < 10 or not _INODE.fullmatch(fields[9]):
                raise ValueError("too few fields or a bad inode")
            local_ip, local_port = _endpoint(fields[1])
            remote_ip, remote_port = _endpoint(fields[2])
        except ValueError as err:
            raise ProcError(f"error parsing {source} line {lineno}: {line[:120]!r}") from err
        connections.append(
            Connection(
                local_ip=local_ip,
                local_port=local_port,
                remote_ip=remote_ip,
                remote_port=remote_port,
                inode=int(fields[9]),
            )
        )
    return connections


def _read_table(pid: int, name: str) -> str | None:
    """The text of ``/proc/<pid>/net/<name>``; ``None`` if that table does not exist."""
    path = f"{PROCFS}/{pid}/net/{name}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TCP_TABLE + 1)
    except FileNotFoundError as err:
        # Either the process exited (then its whole /proc directory is gone)
        # or the namespace has no such table (IPv6 disabled): tell them apart.
        if name == "tcp6" and os.path.isdir(f"{PROCFS}/{pid}/net"):
            return None
        raise NoSuchProcess(f"process {pid} is gone") from err
    except PermissionError as err:
        raise AccessDenied(f"not allowed to read {path}: {err}") from err
    except OSError as err:
        # A zombie's or exiting process's namespace may be gone already
        # (EINVAL and friends): the process is as good as gone.
        raise NoSuchProcess(f"process {pid} is exiting ({path}: {err})") from err
    if len(data) > MAX_TCP_TABLE:
        raise ProcError(f"{path} is larger than {MAX_TCP_TABLE} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as err:
        raise ProcError(f"{path} is not ASCII") from err


def tcp_table(pid: int) -> list[Connection]:
    """Every TCP socket in ``pid``'s network namespace (IPv4 rows, then IPv6)."""
    connections: list[Connection] = []
    for name in ("tcp", "tcp6"):
        text = _read_table(pid, name)
        if text is not None:
            connections += parse_tcp_table(text, f"{PROCFS}/{pid}/net/{name}")
    return connections


def connection_of(pid: int) -> Connection | None:
    """The TCP connection of the lowest-numbered TCP socket ``pid`` holds, if any.

    Asked of the socket itself when the kernel allows (:mod:`sockpeek`, ~3 ms
    cheaper per call), otherwise found by inode in the process's TCP tables.

    sshd's per-connection monitor holds exactly one TCP socket, the client's
    (observed, fd 4 on 9.2); the rest are unix sockets and socketpairs, which
    are not in the TCP table. "Lowest fd wins" is pam_slurm_adopt's rule.
    """
    sockets = _socket_fds(pid)
    if not sockets:
        return None
    global _pidfd_usable  # noqa: PLW0603  (one switch per process, set once)
    if _pidfd_usable and PROCFS == "/proc":
        try:
            return sockpeek.first_tcp_connection(pid, sockets)
        except sockpeek.Unavailable:
            _pidfd_usable = False  # this kernel or policy says no: tables from now on
        except OSError as err:
            raise ProcError(f"reading the sockets of process {pid}: {err}") from err
    by_inode = {conn.inode: conn for conn in tcp_table(pid)}
    for _fd, inode in sockets:
        if inode in by_inode:
            return by_inode[inode]
    return None


#: Most descendants one walk collects: a fork bomb must not make the broker walk forever.
MAX_DESCENDANTS = 65536


def children_of(pid: int) -> list[int]:
    """The child pids of ``pid``, as the kernel lists them (``/proc/<pid>/task/*/children``).

    Every thread's file is read: a child belongs to the thread that forked it. Costs
    microseconds, where psutil's ``children()`` reads every ``/proc/*/stat`` (1.4 ms at
    112 processes, 9.7 ms at 929). Raises NoSuchProcess if ``pid`` is gone.
    """
    found: list[int] = []
    with _mapped(pid):
        tasks = os.listdir(f"{PROCFS}/{pid}/task")
        for tid in tasks:
            try:
                with open(f"{PROCFS}/{pid}/task/{tid}/children", "rb") as handle:
                    text = handle.read(1024 * 1024)
            except FileNotFoundError:
                continue  # the thread ended
            found.extend(int(word) for word in text.split())
    return found


def descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, breadth first.

    Children that exit meanwhile are skipped. Raises NoSuchProcess if ``pid`` itself
    is gone; stops at :data:`MAX_DESCENDANTS`.
    """
    found: list[int] = []
    queue = children_of(pid)
    seen = {pid}
    while queue and len(found) < MAX_DESCENDANTS:
        child = queue.pop(0)
        if child in seen:
            continue
        seen.add(child)
        found.append(child)
        with contextlib.suppress(NoSuchProcess):
            queue.extend(children_of(child))
    return found


def own_netns() -> str:
    """This process's network namespace, e.g. ``net:[4026531840]``."""
    return os.readlink(f"{PROCFS}/self/ns/net")


def netns_of(pid: int) -> str | None:
    """The network namespace of ``pid`` (None if it vanished or cannot be read)."""
    try:
        return os.readlink(f"{PROCFS}/{pid}/ns/net")
    except OSError:
        return None


def root_of(pid: int) -> str | None:
    """Where ``pid``'s root directory is (``/``, or a chroot such as sshd's ``/run/sshd``)."""
    try:
        return os.readlink(f"{PROCFS}/{pid}/root")
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessTree:
    """Parent-to-children links from one pass over /proc (a snapshot).

    Asking psutil for one process's children scans all of /proc each time;
    the sweeper needs the children of every ssh connection, so it takes one
    snapshot per scan instead. Processes forked after the pass are missing
    from it: the proc connector's events and the next scan catch those.
    """

    kids: dict[int, tuple[int, ...]]

    @classmethod
    def of(cls, links: Iterable[tuple[int, int, float]]) -> ProcessTree:
        """Build from ``(pid, ppid, start_time)`` of every process seen.

        As psutil does, a "child" that started before its parent is dropped:
        the parent's pid was reused and the child belongs to its old owner.
        """
        entries = list(links)
        started = {pid: start for pid, _ppid, start in entries}
        kids: dict[int, list[int]] = {}
        for pid, ppid, start in entries:
            if ppid in started and start >= started[ppid]:
                kids.setdefault(ppid, []).append(pid)
        return cls({parent: tuple(sorted(pids)) for parent, pids in kids.items()})

    def children(self, pid: int) -> list[int]:
        """Direct children of ``pid`` in the snapshot."""
        return list(self.kids.get(pid, ()))

    def descendants(self, pid: int) -> list[int]:
        """All descendants of ``pid``, breadth first (each pid once)."""
        found: list[int] = []
        seen = {pid}
        queue = list(self.kids.get(pid, ()))
        while queue:
            child = queue.pop(0)
            if child in seen:
                continue
            seen.add(child)
            found.append(child)
            queue.extend(self.kids.get(child, ()))
        return found


def started_at(pid: int) -> float:
    """When ``pid`` started (as :attr:`ProcInfo.start_time`), from its stat file alone.

    The cheap identity read for hot paths (the sweeper sees every fork on the
    node). Raises NoSuchProcess for a vanished process or a zombie.
    """
    if pid <= 0:
        raise NoSuchProcess(f"no process {pid}")
    with _mapped(pid):
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(pid)
            return proc.create_time()


def executable(pid: int) -> str | None:
    """The raw ``/proc/<pid>/exe`` link (one readlink: for hot paths), None when it cannot
    be read (gone, a kernel thread, not allowed)."""
    try:
        return os.readlink(f"{PROCFS}/{pid}/exe")
    except OSError:
        return None


def parent_of(pid: int) -> int:
    """``pid``'s parent pid, from its stat file alone (0: none). Raises NoSuchProcess
    for a vanished process."""
    if pid <= 0:
        raise NoSuchProcess(f"no process {pid}")
    with _mapped(pid):
        return psutil.Process(pid).ppid()


def still_running(pid: int, start_time: float) -> bool:
    """True if ``pid`` still names the process that started at ``start_time``.

    Guards against pid reuse between looking at a process and acting on it.
    A zombie is not running: it can no longer be adopted or inspected.
    """
    try:
        return started_at(pid) == start_time
    except ProcError:
        return False


def same_process(info: ProcInfo) -> bool:
    """True if ``info.pid`` is still that process, under the same parent.

    Cheaper than :func:`proc_info` (one read of ``/proc/<pid>/stat``): used
    to re-check a whole verified chain. A changed ppid means the parent died
    and the process was reparented, i.e. the chain we verified is broken.
    """
    try:
        proc = psutil.Process(info.pid)
        with proc.oneshot():
            return (
                proc.create_time() == info.start_time
                and proc.ppid() == info.ppid
                and proc.status() != psutil.STATUS_ZOMBIE
            )
    except psutil.Error:
        return False


def tolerate_gone(func: Callable[[], T], default: T) -> T:
    """Run ``func``; a process vanishing meanwhile yields ``default``."""
    try:
        return func()
    except NoSuchProcess:
        return default


#: Most bytes of ``/proc/<pid>/environ`` read for a spawned session: an environment
#: larger than this is refused rather than cut (ARG_MAX-sized ones exist only by intent).
MAX_ENVIRON = 256 * 1024
#: Most bytes of ``/proc/<pid>/status`` read (about 1.5 KiB; a long Groups: line more).
_MAX_STATUS = 64 * 1024
#: The resource limits a spawned session copies from the process sshd started (pam_limits
#: set them in sshd's PAM session): ``/proc/<pid>/limits`` row names (``proc(5)``, the
#: kernel's ``fs/proc/base.c: lnames``) and the ``getrlimit(2)`` resource number of each
#: (``include/uapi/asm-generic/resource.h``; Python's ``resource`` lacks some, e.g. LOCKS).
RLIMITS = {"Max cpu time": 0, "Max file size": 1, "Max data size": 2, "Max stack size": 3,
           "Max core file size": 4, "Max resident set": 5, "Max processes": 6,
           "Max open files": 7, "Max locked memory": 8, "Max address space": 9,
           "Max file locks": 10, "Max pending signals": 11, "Max msgqueue size": 12,
           "Max nice priority": 13, "Max realtime priority": 14, "Max realtime timeout": 15}
#: How ``/proc/<pid>/limits`` writes RLIM_INFINITY, and how Python's ``resource`` module
#: does (``resource.RLIM_INFINITY`` is -1 on Linux).
_UNLIMITED = "unlimited"
RLIM_INFINITY = -1


@dataclass(frozen=True)
class Credentials:
    """What the kernel says a process runs as (``/proc/<pid>/status``, ``proc(5)``):
    real, effective, saved and filesystem ids, supplementary groups, umask, and its
    controlling terminal's device number (``/proc/<pid>/stat`` field 7; 0: none)."""

    uids: tuple[int, int, int, int]
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    umask: int
    tty: int


def _ids(value: str, field: str, pid: int) -> tuple[int, int, int, int]:
    parts = [int(part) for part in value.split()]
    if len(parts) != 4:
        raise ProcError(f"process {pid}: {field}: line has {len(parts)} ids, not 4")
    return parts[0], parts[1], parts[2], parts[3]


def credentials(pid: int) -> Credentials:
    """``pid``'s :class:`Credentials`. Raises NoSuchProcess, AccessDenied or ProcError
    (also for a status file without the lines, or one over 64 KiB)."""
    with _mapped(pid):
        with open(f"{PROCFS}/{pid}/status", "rb") as handle:
            raw = handle.read(_MAX_STATUS + 1)
        with open(f"{PROCFS}/{pid}/stat", "rb") as handle:
            stat = handle.read(4096)
    if len(raw) > _MAX_STATUS:
        raise ProcError(f"process {pid}: status larger than {_MAX_STATUS} bytes")
    lines = dict(line.partition(":")[::2] for line in raw.decode("ascii", "replace").splitlines())
    try:
        uids = _ids(lines["Uid"], "Uid", pid)
        gids = _ids(lines["Gid"], "Gid", pid)
        groups = tuple(int(group) for group in lines["Groups"].split())
        umask = int(lines.get("Umask", "0022"), 8)
        tty = int(stat[stat.rindex(b")") + 2:].split()[4])
    except (KeyError, ValueError, IndexError) as err:
        raise ProcError(f"process {pid}: unreadable status or stat: {err}") from err
    return Credentials(uids, gids, groups, umask, tty)


def environment(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (``/proc/<pid>/environ``: what its parent
    gave execve, as later changed in its own memory; entries without ``=`` are dropped).

    Raises NoSuchProcess, AccessDenied, or ProcError for one over :data:`MAX_ENVIRON`.
    """
    with _mapped(pid), open(f"{PROCFS}/{pid}/environ", "rb") as handle:
        raw = handle.read(MAX_ENVIRON + 1)
    if len(raw) > MAX_ENVIRON:
        raise ProcError(f"process {pid}: environment larger than {MAX_ENVIRON} bytes")
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                       "surrogateescape")
    return env


def resource_limits(pid: int) -> dict[int, tuple[int, int]]:
    """``pid``'s resource limits (soft, hard), by resource number, from
    ``/proc/<pid>/limits`` (readable by anyone; ``prlimit(2)`` on another user's process
    would need CAP_SYS_RESOURCE, which the broker does not hold). Raises NoSuchProcess,
    AccessDenied, or ProcError for a file that does not read as the kernel writes it."""
    with _mapped(pid), open(f"{PROCFS}/{pid}/limits", encoding="ascii",
                            errors="replace") as handle:
        text = handle.read(8192)
    limits: dict[int, tuple[int, int]] = {}
    for line in text.splitlines()[1:]:
        number = RLIMITS.get(line[:26].strip())
        values = line[26:].split()
        if number is None or len(values) < 2:
            continue
        try:
            soft, hard = (RLIM_INFINITY if value == _UNLIMITED else int(value)
                          for value in values[:2])
        except ValueError as err:
            raise ProcError(f"process {pid}: limits: {line.strip()!r}") from err
        limits[number] = (soft, hard)
    if len(limits) != len(RLIMITS):
        raise ProcError(f"process {pid}: limits: {len(limits)} of {len(RLIMITS)} rows found")
    return limits


#: ``/proc/<pid>/loginuid`` of a process no login set one for.
LOGINUID_UNSET = 4294967295


def loginuid(pid: int) -> int | None:
    """``pid``'s audit login uid (set by pam_loginuid in sshd's PAM session), None when
    unset or the kernel has no audit support. Raises NoSuchProcess or AccessDenied."""
    try:
        with _mapped(pid), open(f"{PROCFS}/{pid}/loginuid", encoding="ascii") as handle:
            value = int(handle.read(32).strip())
    except NoSuchProcess:
        if os.path.exists(f"{PROCFS}/{pid}"):
            return None  # no audit support: no loginuid file
        raise
    except ValueError:
        return None
    return None if value == LOGINUID_UNSET else value
