"""The stepd client's framing and failure mapping, against an in-test fake stepd.

The fake speaks the byte protocol of reference §2.3/§2.5 on a real unix
socket, so these tests exercise the same socket calls as production: accept,
refuse, short reads, hangs, and the close-without-reply of 24.11.6+.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal.slurm import stepd
from sshd_adopt._internal.slurm.stepd import (
    EXTERN_STEP,
    NEWEST_PROTOCOL,
    PROTOCOL_VERSIONS,
    StepdConnection,
    StepdRequestFailed,
    StepSocket,
    list_extern_steps,
    socket_name_pattern,
)
from sshd_adopt.errors import StepdError, StepdProtocolError, StepdUnavailable

V2205 = PROTOCOL_VERSIONS["22.05"]
MIN_2205 = 0x2400  # 20.11: a 22.05 stepd accepts any version >= this

Handler = Callable[[socket.socket], None]


def recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_int(conn: socket.socket) -> int:
    value: int = struct.unpack("=i", recv_exact(conn, 4))[0]
    return value


def send_int(conn: socket.socket, *values: int) -> None:
    conn.sendall(struct.pack(f"={len(values)}i", *values))


class FakeStepd:
    """A unix-socket server that runs ``handler`` for each accepted connection."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.errors: list[BaseException] = []
        self.seen_versions: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.handler(conn)
                except (EOFError, OSError):
                    pass
                except BaseException as err:  # surfaced by the test
                    self.errors.append(err)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def stepd_22_05(
    *, uid: int = 2001, pid: int = 4242, display: int = 0, xauth: bytes = b"",
    add_rc: int = 0, seen: list[int] | None = None,
) -> Handler:
    """A faithful-enough 22.05 extern stepd: MIN 20.11, replies 9728."""

    def handle(conn: socket.socket) -> None:
        version = read_int(conn)
        if seen is not None:
            seen.append(version)
        if version < MIN_2205:
            send_int(conn, -1)
            return
        send_int(conn, V2205)
        while True:
            code = read_int(conn)
            if code == stepd.REQUEST_STEP_UID:
                conn.sendall(struct.pack("=I", uid))
            elif code == stepd.REQUEST_DAEMON_PID:
                send_int(conn, pid)
            elif code == stepd.REQUEST_STATE:
                send_int(conn, 2)
            elif code == stepd.REQUEST_ADD_EXTERN_PID:
                if seen is not None:
                    seen.append(read_int(conn))
                else:
                    read_int(conn)
                send_int(conn, add_rc)
            elif code == stepd.REQUEST_X11_DISPLAY:
                send_int(conn, display, len(xauth))
                conn.sendall(xauth)
            else:
                return  # "Unrecognized request": close without reply

    return handle


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory: pytest's tmp_path can exceed the 107-byte sun_path limit."""
    path = tempfile.mkdtemp(prefix="sa-stepd-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(sockdir: str) -> Iterator[Callable[..., FakeStepd]]:
    servers: list[FakeStepd] = []

    def start(handler: Handler, name: str = f"n1_7.{EXTERN_STEP}") -> FakeStepd:
        server = FakeStepd(os.path.join(sockdir, name), handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        assert not server.errors, server.errors


# -- constants ----------------------------------------------------------------


def test_constants_match_the_reference() -> None:
    assert EXTERN_STEP == 4294967292
    assert (stepd.REQUEST_STATE, stepd.REQUEST_DAEMON_PID) == (5, 9)
    assert (stepd.REQUEST_STEP_UID, stepd.REQUEST_ADD_EXTERN_PID) == (20, 22)
    assert stepd.REQUEST_X11_DISPLAY == 23
    assert PROTOCOL_VERSIONS["22.05"] == 9728
    assert PROTOCOL_VERSIONS["24.11"] == 10752
    assert NEWEST_PROTOCOL == PROTOCOL_VERSIONS["26.05"] == 11520


# -- handshake ----------------------------------------------------------------


def test_handshake_sends_newest_and_keeps_the_peer_version(serve: Callable[..., FakeStepd]) -> None:
    seen: list[int] = []
    server = serve(stepd_22_05(seen=seen))
    with StepdConnection.open(server.path, timeout=2) as conn:
        assert conn.protocol_version == V2205
        assert conn.step_uid() == 2001
    assert seen == [NEWEST_PROTOCOL]


def test_handshake_refused_is_a_protocol_error(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05())
    with pytest.raises(StepdProtocolError, match="refused protocol version 9215"):
        StepdConnection.open(server.path, timeout=2, version=9215)


def test_24_11_refuses_22_05_version(serve: Callable[..., FakeStepd]) -> None:
    def stepd_24_11(conn: socket.socket) -> None:
        version = read_int(conn)
        send_int(conn, -1 if version < PROTOCOL_VERSIONS["23.02"] else PROTOCOL_VERSIONS["24.11"])

    server = serve(stepd_24_11)
    with pytest.raises(StepdProtocolError, match="9728"):
        StepdConnection.open(server.path, timeout=2, version=V2205)
    with StepdConnection.open(server.path, timeout=2) as conn:
        assert conn.protocol_version == PROTOCOL_VERSIONS["24.11"]


def test_handshake_eof_is_unavailable(serve: Callable[..., FakeStepd]) -> None:
    server = serve(lambda conn: None)  # accept and close at once
    # Depending on timing our send meets EPIPE or our recv meets EOF: both "gone".
    with pytest.raises(StepdUnavailable, match="closed the connection"):
        StepdConnection.open(server.path, timeout=2)


def test_handshake_short_read_is_a_protocol_error(serve: Callable[..., FakeStepd]) -> None:
    def half(conn: socket.socket) -> None:
        read_int(conn)
        conn.sendall(b"\x00\x26")

    server = serve(half)
    with pytest.raises(StepdProtocolError, match="short read, 2 of 4"):
        StepdConnection.open(server.path, timeout=2)


def test_hung_stepd_times_out_within_bound(serve: Callable[..., FakeStepd]) -> None:
    release = threading.Event()

    def hang(conn: socket.socket) -> None:
        read_int(conn)
        release.wait(10)

    server = serve(hang)
    began = time.monotonic()
    with pytest.raises(StepdUnavailable, match=r"no answer within 0\.3s"):
        StepdConnection.open(server.path, timeout=0.3)
    assert time.monotonic() - began < 1.0
    release.set()


def test_trickling_stepd_cannot_stretch_the_timeout(serve: Callable[..., FakeStepd]) -> None:
    def trickle(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, V2205)
        read_int(conn)
        for byte in struct.pack("=I", 2001):
            time.sleep(0.2)
            conn.sendall(bytes([byte]))

    server = serve(trickle)
    with StepdConnection.open(server.path, timeout=0.5) as conn:
        began = time.monotonic()
        with pytest.raises(StepdUnavailable):
            conn.step_uid()
        assert time.monotonic() - began < 0.9


def test_stale_socket_is_unavailable(sockdir: str) -> None:
    path = os.path.join(sockdir, f"n1_4.{EXTERN_STEP}")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: like a crashed stepd
    with pytest.raises(StepdUnavailable, match="stale socket"):
        StepdConnection.open(path, timeout=1)


def test_missing_socket_is_unavailable(sockdir: str) -> None:
    with pytest.raises(StepdUnavailable, match="no such socket"):
        StepdConnection.open(os.path.join(sockdir, "n1_9.4294967292"), timeout=1)


def test_too_long_path_is_reported_clearly() -> None:
    path = "/" + "x" * 120 + f"/n1_1.{EXTERN_STEP}"
    with pytest.raises(StepdError, match="longer than the 107"):
        StepdConnection.open(path, timeout=1)


def test_non_positive_timeout_is_refused(sockdir: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        StepdConnection.open(os.path.join(sockdir, "x"), timeout=0)


# -- requests -----------------------------------------------------------------


def test_requests_on_one_connection(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05(uid=2002, pid=31337))
    with StepdConnection.open(server.path, timeout=2) as conn:
        assert conn.step_uid() == 2002
        assert conn.daemon_pid() == 31337
        assert conn.state() == 2
        assert conn.x11_display() == (0, None)
        assert conn.step_uid() == 2002  # still in sync after the X11 reply


def test_step_uid_is_unsigned(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05(uid=0xFFFFFFFE))
    with StepdConnection.open(server.path, timeout=2) as conn:
        assert conn.step_uid() == 0xFFFFFFFE


def test_x11_display_reads_the_full_reply(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05(display=12, xauth=b"/home/alice/.Xauthority\0"))
    with StepdConnection.open(server.path, timeout=2) as conn:
        assert conn.x11_display() == (12, "/home/alice/.Xauthority")
        assert conn.step_uid() == 2001


def test_x11_display_bounds_the_length(serve: Callable[..., FakeStepd]) -> None:
    def huge(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, V2205)
        read_int(conn)
        send_int(conn, 10, 1 << 30)

    server = serve(huge)
    with (
        StepdConnection.open(server.path, timeout=2) as conn,
        pytest.raises(StepdProtocolError, match="1073741824 bytes"),
    ):
        conn.x11_display()


def test_add_extern_pid_ok_sends_the_pid(serve: Callable[..., FakeStepd]) -> None:
    seen: list[int] = []
    server = serve(stepd_22_05(seen=seen))
    with StepdConnection.open(server.path, timeout=2) as conn:
        conn.add_extern_pid(5555)
    assert seen == [NEWEST_PROTOCOL, 5555]


def test_add_extern_pid_rc_is_reported(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05(add_rc=-1))
    with StepdConnection.open(server.path, timeout=2) as conn:
        with pytest.raises(StepdRequestFailed, match="rc=-1") as info:
            conn.add_extern_pid(5555)
        assert info.value.rc == -1
        assert isinstance(info.value, StepdError)
        assert conn.step_uid() == 2001  # 22.05 keeps the connection open


def test_add_extern_pid_close_without_reply(serve: Callable[..., FakeStepd]) -> None:
    """24.11.6+: "step is ending" closes without reading the pid or replying."""

    def ending(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, PROTOCOL_VERSIONS["24.11"])
        assert read_int(conn) == stepd.REQUEST_ADD_EXTERN_PID
        # close with the pid unread (may turn into a RST on the client side)

    server = serve(ending)
    with (
        StepdConnection.open(server.path, timeout=2) as conn,
        pytest.raises(StepdUnavailable, match="closed the connection"),
    ):
        conn.add_extern_pid(5555)


def test_add_extern_pid_refuses_bad_pids(serve: Callable[..., FakeStepd]) -> None:
    server = serve(stepd_22_05())
    with StepdConnection.open(server.path, timeout=2) as conn, pytest.raises(ValueError):
        conn.add_extern_pid(0)


def test_reply_short_read_is_a_protocol_error(serve: Callable[..., FakeStepd]) -> None:
    def short(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, V2205)
        read_int(conn)
        conn.sendall(b"\x01")

    server = serve(short)
    with (
        StepdConnection.open(server.path, timeout=2) as conn,
        pytest.raises(StepdProtocolError, match="short read, 1 of 4"),
    ):
        conn.daemon_pid()


def test_unknown_request_close_is_unavailable(serve: Callable[..., FakeStepd]) -> None:
    def closes(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, V2205)
        read_int(conn)

    server = serve(closes)
    with (
        StepdConnection.open(server.path, timeout=2) as conn,
        pytest.raises(StepdUnavailable, match="without replying"),
    ):
        conn.state()


# -- discovery ----------------------------------------------------------------


def make_socket(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_list_extern_steps_filters_names_and_types(sockdir: str) -> None:
    for name in (
        f"n1_5.{EXTERN_STEP}",
        f"n1_12.{EXTERN_STEP}",
        f"n1_12.{EXTERN_STEP - 1}",  # batch step
        "n1_12.0",
        f"n10_3.{EXTERN_STEP}",  # another node whose name starts with ours
        f"n1_6.{EXTERN_STEP}.1",  # het component
    ):
        make_socket(os.path.join(sockdir, name))
    Path(sockdir, f"n1_7.{EXTERN_STEP}").write_text("not a socket")
    os.symlink(
        os.path.join(sockdir, f"n1_5.{EXTERN_STEP}"), os.path.join(sockdir, f"n1_8.{EXTERN_STEP}")
    )
    Path(sockdir, "cred_state").write_text("")
    found = list_extern_steps(sockdir, "n1")
    assert found == [
        StepSocket(5, EXTERN_STEP, os.path.join(sockdir, f"n1_5.{EXTERN_STEP}")),
        StepSocket(6, EXTERN_STEP, os.path.join(sockdir, f"n1_6.{EXTERN_STEP}.1")),
        StepSocket(12, EXTERN_STEP, os.path.join(sockdir, f"n1_12.{EXTERN_STEP}")),
    ]
    assert all(stat.S_ISSOCK(os.lstat(s.path).st_mode) for s in found)


def test_nodename_with_regex_metacharacters_is_escaped(sockdir: str) -> None:
    make_socket(os.path.join(sockdir, f"gpu.1+_3.{EXTERN_STEP}"))
    make_socket(os.path.join(sockdir, f"gpux11_4.{EXTERN_STEP}"))  # would match unescaped
    found = list_extern_steps(sockdir, "gpu.1+")
    assert [s.job_id for s in found] == [3]
    assert socket_name_pattern("n[1]").match(f"n[1]_2.{EXTERN_STEP}")
    assert not socket_name_pattern("n[1]").match(f"n1_2.{EXTERN_STEP}")


@pytest.mark.parametrize(
    "name",
    [f"n1_.{EXTERN_STEP}", f"n1_5{EXTERN_STEP}", f"n1_5.{EXTERN_STEP}.", f"n1_5.{EXTERN_STEP}x",
     f"n1_\u0665.{EXTERN_STEP}"],  # Arabic-Indic digit five: only ASCII digits count
)
def test_socket_name_pattern_rejects(name: str) -> None:
    assert socket_name_pattern("n1").match(name) is None


def test_missing_spool_dir_is_empty(sockdir: str) -> None:
    assert list_extern_steps(os.path.join(sockdir, "nope"), "n1") == []


def test_spool_dir_that_is_a_file_is_an_error(sockdir: str) -> None:
    path = os.path.join(sockdir, "file")
    Path(path).write_text("")
    with pytest.raises(StepdError, match="cannot list"):
        list_extern_steps(path, "n1")


def test_sluid_is_asked_of_25_11_and_newer_only(serve: Callable[..., FakeStepd]) -> None:
    """REQUEST_SLUID (code 1) exists from 25.11; an older stepd is never sent it."""
    codes: list[int] = []

    def stepd_26_05(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, PROTOCOL_VERSIONS["26.05"])
        while True:
            code = read_int(conn)
            codes.append(code)
            if code == stepd.REQUEST_SLUID:
                conn.sendall(struct.pack("=Q", 0x0E5B68A34D4B1C00))
            elif code == stepd.REQUEST_STEP_UID:
                conn.sendall(struct.pack("=I", 2001))

    with StepdConnection.open(serve(stepd_26_05).path, timeout=2) as conn:
        assert conn.sluid() == stepd.sluid_name(0x0E5B68A34D4B1C00)
        assert conn.step_uid() == 2001  # the connection stayed in step
    assert codes == [stepd.REQUEST_SLUID, stepd.REQUEST_STEP_UID]
    older = serve(stepd_22_05(), name=f"n1_8.{EXTERN_STEP}")
    with StepdConnection.open(older.path, timeout=2) as conn:
        assert conn.sluid() is None
        assert conn.step_uid() == 2001


@pytest.mark.parametrize(("value", "name"), [
    (0, "s0000000000000"),
    (31, "s000000000000Z"),
    (32, "s0000000000010"),
    ((1 << 64) - 1, "sFZZZZZZZZZZZZ"),  # the top digit holds 4 bits only
])
def test_sluid_name_is_slurms_printed_form(value: int, name: str) -> None:
    assert stepd.sluid_name(value) == name


def test_sluid_name_refuses_what_is_not_a_uint64() -> None:
    with pytest.raises(ValueError, match="uint64"):
        stepd.sluid_name(1 << 64)


# -- the job's namespaces (REQUEST_GET_NS_FD / _FDS) ----------------------------------


def send_fd(conn: socket.socket, fd: int) -> None:
    """As ``send_fd_over_socket``: one byte, the descriptor as SCM_RIGHTS."""
    socket.send_fds(conn, [b"\0"], [fd])


def ns_stepd(version: int, replies: Callable[[socket.socket], None]) -> Handler:
    """A stepd of ``version`` that answers one namespace request with ``replies``."""

    def handle(conn: socket.socket) -> None:
        read_int(conn)
        send_int(conn, version)
        code = read_int(conn)
        assert code == (stepd.REQUEST_GET_NS_FDS if version >= stepd.NS_FDS_PROTOCOL
                        else stepd.REQUEST_GET_NS_FD), code
        replies(conn)
        time.sleep(0.2)  # let the client read before the connection goes

    return handle


def same_namespace(fd: int, path: str) -> bool:
    mine, theirs = os.fstat(fd), os.stat(path)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def test_get_ns_fd_before_25_11_gives_the_mount_namespace(
        serve: Callable[..., FakeStepd]) -> None:
    """The descriptor received is the very namespace the stepd sent (its inode)."""
    def replies(conn: socket.socket) -> None:
        fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        send_int(conn, fd)
        send_fd(conn, fd)
        os.close(fd)

    server = serve(ns_stepd(V2205, replies))
    with StepdConnection.open(server.path, timeout=2) as conn:
        [(kind, fd)] = conn.namespace_fds()
    try:
        assert kind == stepd.CLONE_NEWNS and same_namespace(fd, "/proc/self/ns/mnt")
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("number, error", [(0, None), (-1, stepd.StepdRequestFailed)])
def test_get_ns_fd_without_a_container_or_failing(serve: Callable[..., FakeStepd],
                                                  number: int,
                                                  error: type[Exception] | None) -> None:
    server = serve(ns_stepd(V2205, lambda conn: send_int(conn, number)))
    with StepdConnection.open(server.path, timeout=2) as conn:
        if error is None:
            assert conn.namespace_fds() == []
        else:
            with pytest.raises(error):
                conn.namespace_fds()


V2605 = PROTOCOL_VERSIONS["26.05"]


def test_get_ns_fds_from_25_11_gives_each_namespace_in_order(
        serve: Callable[..., FakeStepd]) -> None:
    def replies(conn: socket.socket) -> None:
        send_int(conn, 2)
        for kind, name in ((stepd.CLONE_NEWPID, "pid"), (stepd.CLONE_NEWNS, "mnt")):
            fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY)
            conn.sendall(struct.pack("=I", kind))
            send_fd(conn, fd)
            os.close(fd)

    server = serve(ns_stepd(V2605, replies))
    with StepdConnection.open(server.path, timeout=2) as conn:
        found = conn.namespace_fds()
    try:
        assert [kind for kind, _ in found] == [stepd.CLONE_NEWPID, stepd.CLONE_NEWNS]
        assert same_namespace(found[0][1], "/proc/self/ns/pid")
        assert same_namespace(found[1][1], "/proc/self/ns/mnt")
    finally:
        for _, fd in found:
            os.close(fd)


MARKER = "/proc/self/ns/uts"  # what the bad replies carry: nothing else here opens it


def send_marker(conn: socket.socket) -> None:
    fd = os.open(MARKER, os.O_RDONLY)
    try:
        send_fd(conn, fd)
    finally:
        os.close(fd)


def markers_open() -> int:
    """This process's descriptors on the marker's namespace (a leak would be one)."""
    target = os.stat(MARKER)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            found = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        count += (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino)
    return count


NEWNS = struct.pack("=I", stepd.CLONE_NEWNS)


@pytest.mark.parametrize("steps, error", [
    ([struct.pack("=i", 4)], StepdProtocolError),  # more namespaces than a job can have
    ([struct.pack("=i", -1)], StepdProtocolError),
    # an unknown type after a good one: the descriptor already received is closed
    ([struct.pack("=i", 2), NEWNS, "fd", struct.pack("=I", 0x40)], StepdProtocolError),
    ([struct.pack("=i", 2), NEWNS, "fd", NEWNS, "fd"], StepdProtocolError),  # twice
    # the type announced, then nothing (26.05.3's namespace/tmpfs when .ns cannot open)
    ([struct.pack("=i", 1), NEWNS], StepdUnavailable),
    ([struct.pack("=i", 1), NEWNS, b"\0"], StepdProtocolError),  # the byte, no descriptor
])
def test_bad_namespace_replies_are_refused_and_leak_nothing(
        serve: Callable[..., FakeStepd], steps: list[bytes | str],
        error: type[Exception]) -> None:
    def replies(conn: socket.socket) -> None:
        for step in steps:
            if isinstance(step, bytes):
                conn.sendall(step)
            else:
                send_marker(conn)

    server = serve(ns_stepd(V2605, replies))
    with StepdConnection.open(server.path, timeout=1) as conn, pytest.raises(error):
        conn.namespace_fds()
    assert markers_open() == 0
