"""Fuzz targets (issue #5, item 7): the parsers that read what others wrote.

The broker is root and parses bytes from anyone who can connect (requests),
from /proc (TCP tables, which other users' sockets fill) and from slurmstepd
sockets (0777, so a process that impersonates a stepd socket path could
answer). Each parser must turn any input into a result or *its* error
class, never another exception, and in bounded time. Run with a bounded
number of examples so CI time stays fixed.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshd_adopt._internal import protocol
from sshd_adopt._internal.node import procfs
from sshd_adopt._internal.node.procevents import parse_proc_events
from sshd_adopt._internal.slurm.stepd import StepdConnection
from sshd_adopt.errors import BrokerProtocolError, ProcError, StepdError

FUZZ = settings(max_examples=400, deadline=500, suppress_health_check=[HealthCheck.too_slow])

_items = st.dictionaries(
    st.sampled_from(["v", "op", "user", "o.action_unknown", "o.x", "env.A", "junk"]),
    st.text(max_size=80).filter(lambda t: "\0" not in t),
    max_size=6,
)


@FUZZ
@given(st.binary(max_size=protocol.MAX_FRAME + 16))
def test_parse_request_raw_bytes(body: bytes) -> None:
    try:
        op, args = protocol.parse_request(body)
    except BrokerProtocolError:
        return
    assert op in protocol.OPS
    if op == "keys":
        assert set(args) == {protocol.KEYS_USER}


@FUZZ
@given(_items)
def test_parse_request_structured(items: dict[str, str]) -> None:
    body = "\0".join(f"{k}={v}" for k, v in items.items()).encode()
    with contextlib.suppress(BrokerProtocolError):
        protocol.parse_request(body)


@FUZZ
@given(st.binary(max_size=8))
def test_frame_length(header: bytes) -> None:
    try:
        length = protocol.frame_length(header)
    except BrokerProtocolError:
        return
    assert 1 <= length <= protocol.MAX_FRAME


_hexword = st.text("0123456789ABCDEFabcdefXZ:", min_size=0, max_size=40)


@FUZZ
@given(st.lists(st.lists(_hexword, max_size=14).map(" ".join), max_size=8).map("\n".join))
def test_parse_tcp_table(text: str) -> None:
    with contextlib.suppress(ProcError):
        procfs.parse_tcp_table(text, "fuzz")


@FUZZ
@given(st.text(max_size=400))
def test_parse_tcp_table_any_text(text: str) -> None:
    with contextlib.suppress(ProcError):
        procfs.parse_tcp_table(text, "fuzz")


@FUZZ
@given(st.binary(max_size=512))
def test_parse_proc_events(data: bytes) -> None:
    for event in parse_proc_events(data):
        assert event.pid >= 0


@FUZZ
@given(st.binary(max_size=64), st.sampled_from(["uid", "x11", "add", "state"]))
def test_stepd_replies(reply: bytes, request: str) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(reply)
        theirs.shutdown(socket.SHUT_WR)
        conn = StepdConnection(ours, "fuzz-stepd", 0.5, 0x2600)
        try:
            if request == "uid":
                conn.step_uid()
            elif request == "x11":
                _display, xauth = conn.x11_display()
                assert xauth is None or len(xauth) <= len(reply)
            elif request == "add":
                conn.add_extern_pid(1)
            else:
                conn.state()
        except StepdError:
            pass
    finally:
        ours.close()
        theirs.close()


def test_stepd_x11_length_bound() -> None:
    """An announced xauthority length over the bound is refused before reading it."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack("=ii", 10, 1 << 30))
        conn = StepdConnection(ours, "fuzz-stepd", 0.5, 0x2600)
        try:
            conn.x11_display()
        except StepdError as err:
            assert "xauthority" in str(err)
        else:
            raise AssertionError("a 1 GiB xauthority was accepted")
    finally:
        ours.close()
        theirs.close()
