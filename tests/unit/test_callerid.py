"""The callerid RPC: framing, parsing, and the one-deadline rule against local listeners.

The framing tests are pure. The deadline tests run real TCP listeners on
127.0.0.1 that refuse, hang, drip, reset or answer garbage, with munge
replaced by a stub (the host running unit tests has no munged; the live
tests in tests/integration/test_callerid_live.py use the real one).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshd_adopt._internal import callerid, munge
from sshd_adopt._internal.callerid import (
    NO_VAL,
    PROTOCOL_22_05,
    PROTOCOL_24_11,
    PROTOCOL_25_11,
    PROTOCOL_26_05,
    REQUEST_NETWORK_CALLERID,
    RESPONSE_NETWORK_CALLERID,
    RESPONSE_SLURM_RC,
    ProtocolFailure,
    Reply,
    pack_request,
    pack_request_body,
    parse_response,
    query_callerid,
    response_length,
)
from sshd_adopt._internal.connection import Connection
from sshd_adopt._internal.decision import CallerIdAnswer, CallerIdOutcome

SLACK = 0.2  # the brief's bound: elapsed <= deadline + 0.2 s
CRED = b"MUNGE:AwQFAAD-fake-credential:"

V4 = Connection(
    local_ip=ipaddress.ip_address("10.213.0.12"),
    local_port=22,
    remote_ip=ipaddress.ip_address("10.213.0.11"),
    remote_port=40000,
)
V6 = Connection(
    local_ip=ipaddress.ip_address("fd5a:213::12"),
    local_port=2222,
    remote_ip=ipaddress.ip_address("fd5a:213::11"),
    remote_port=50001,
)


def loopback(port_src: int = 40000) -> Connection:
    """A connection whose "source host" is 127.0.0.1, where the test listeners live."""
    return Connection(
        local_ip=ipaddress.ip_address("127.0.0.1"),
        local_port=22,
        remote_ip=ipaddress.ip_address("127.0.0.1"),
        remote_port=port_src,
    )


def packstr(data: bytes | None) -> bytes:
    if data is None:
        return struct.pack(">I", 0)
    return struct.pack(">I", len(data) + 1) + data + b"\0"


def callerid_body(job: int, rc: int = 0, node: bytes | None = b"n1") -> bytes:
    return struct.pack(">II", job, rc) + packstr(node)


def response(
    body: bytes,
    *,
    msg_type: int = RESPONSE_NETWORK_CALLERID,
    version: int = PROTOCOL_22_05,
    body_length: int | None = None,
    plugin: int = callerid.AUTH_PLUGIN_MUNGE,
    orig: bytes = struct.pack(">H", 0),
    forward_cnt: int = 0,
    ret_cnt: int = 0,
) -> bytes:
    """A response *without* its length prefix, as a 22.05..26.05 slurmd frames it."""
    header = struct.pack(
        ">HHHIHH",
        version,
        0,
        msg_type,
        len(body) if body_length is None else body_length,
        forward_cnt,
        ret_cnt,
    )
    auth = struct.pack(">I", plugin) + packstr(b"MUNGE:response-cred:")
    return header + orig + auth + body


def framed(message: bytes) -> bytes:
    return struct.pack(">I", len(message)) + message


# --- packing ---------------------------------------------------------------------------------


def test_request_body_ipv4_layout() -> None:
    body = pack_request_body(V4)
    assert len(body) == 52
    assert body[0:4] == struct.pack(">I", 16)
    assert body[4:20] == bytes([10, 213, 0, 11]) + bytes(12)  # ip_src = the ssh client
    assert body[20:24] == struct.pack(">I", 16)
    assert body[24:40] == bytes([10, 213, 0, 12]) + bytes(12)  # ip_dst = this node
    assert struct.unpack(">III", body[40:52]) == (40000, 22, 2)


def test_request_body_ipv6_layout() -> None:
    body = pack_request_body(V6)
    assert body[4:20] == ipaddress.IPv6Address("fd5a:213::11").packed
    assert body[24:40] == ipaddress.IPv6Address("fd5a:213::12").packed
    assert struct.unpack(">III", body[40:52]) == (50001, 2222, 10)


def test_hash_payload_is_hash_none_and_be_msg_type() -> None:
    assert callerid.hash_payload() == b"\x01\x13\xab"


@pytest.mark.parametrize("version", [PROTOCOL_22_05, PROTOCOL_24_11, PROTOCOL_26_05])
def test_request_frame(version: int) -> None:
    frame = pack_request(V4, CRED, version)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    ver, flags, msg_type, body_len, fwd, ret, fam = struct.unpack(">HHHIHHH", frame[4:20])
    assert (ver, flags, msg_type, body_len, fwd, ret, fam) == (
        version, 0, REQUEST_NETWORK_CALLERID, 52, 0, 0, 0,
    )
    plugin, cred_len = struct.unpack(">II", frame[20:28])
    assert plugin == 101
    assert frame[28 : 28 + cred_len] == CRED + b"\0"
    assert frame[28 + cred_len :] == pack_request_body(V4)


@pytest.mark.parametrize("version", [0, 0x2400, 0x2500, 0x25FF, 0x2601, 0x2E00, 0xFFFF])
def test_unknown_protocol_versions_are_refused(version: int) -> None:
    with pytest.raises(ProtocolFailure):
        pack_request(V4, CRED, version)


# --- parsing ---------------------------------------------------------------------------------


def test_parse_live_2205_indeterminate_answer() -> None:
    # The 15-byte body seen live from 22.05.8: job NO_VAL, rc 0, node "vm".
    body = callerid_body(NO_VAL, 0, b"vm")
    assert len(body) == 15
    assert parse_response(response(body)) == Reply(None, 0, "vm")


def test_parse_member() -> None:
    assert parse_response(response(callerid_body(42, 0, b"n1"))) == Reply(42, 0, "n1")


@pytest.mark.parametrize("job", [0, NO_VAL, 0xFFFFFFFF])
def test_non_job_ids_are_no_job(job: int) -> None:
    assert parse_response(response(callerid_body(job))).job_id is None


def test_parse_null_node_name() -> None:
    assert parse_response(response(callerid_body(7, 0, None))) == Reply(7, 0, "")


def test_parse_2511_step_id_layout() -> None:
    body = struct.pack(">QIII", 0x1234, 77, 0xFFFFFFFC, 0xFFFFFFFE) + struct.pack(">I", 0)
    body += packstr(b"n3")
    assert parse_response(response(body, version=PROTOCOL_25_11)) == Reply(77, 0, "n3")


def test_slurm_rc_zero_is_no_job() -> None:
    reply = parse_response(response(struct.pack(">I", 0), msg_type=RESPONSE_SLURM_RC))
    assert reply.job_id is None


def test_slurm_rc_error_is_protocol_failure() -> None:
    with pytest.raises(ProtocolFailure, match="RESPONSE_SLURM_RC 1007"):
        parse_response(response(struct.pack(">I", 1007), msg_type=RESPONSE_SLURM_RC))


def test_orig_addr_is_skipped() -> None:
    body = callerid_body(5)
    v4 = struct.pack(">HIH", 2, 0x0A00000B, 6818)
    v6 = struct.pack(">HI", 10, 16) + bytes(16) + struct.pack(">H", 6818)
    assert parse_response(response(body, orig=v4)).job_id == 5
    assert parse_response(response(body, orig=v6)).job_id == 5


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(response(callerid_body(5), msg_type=1008), id="wrong-type"),
        pytest.param(response(callerid_body(5), plugin=102), id="jwt-auth"),
        pytest.param(response(callerid_body(5), body_length=14), id="body-length-short"),
        pytest.param(response(callerid_body(5), body_length=99), id="body-length-long"),
        pytest.param(response(callerid_body(5), forward_cnt=1), id="forward"),
        pytest.param(response(callerid_body(5), ret_cnt=1), id="ret-list"),
        pytest.param(response(callerid_body(5), orig=struct.pack(">H", 1)), id="orig-family"),
        pytest.param(
            response(callerid_body(5) + b"x", body_length=len(callerid_body(5)) + 1),
            id="trailing",
        ),
        pytest.param(
            response(struct.pack(">II", 5, 0) + struct.pack(">I", 1000)), id="node-overrun"
        ),
        pytest.param(b"HTTP/1.1 400 Bad Request\r\n\r\n", id="http"),
    ],
)
def test_bad_responses(message: bytes) -> None:
    with pytest.raises(ProtocolFailure):
        parse_response(message)


def test_every_truncation_is_a_protocol_failure() -> None:
    message = response(callerid_body(42))
    for cut in range(len(message)):
        with pytest.raises(ProtocolFailure):
            parse_response(message[:cut])


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\0\0", struct.pack(">I", 0), struct.pack(">I", 15),
     struct.pack(">I", 64 * 1024 + 1), b"\xff\xff\xff\xff", b"HTTP"],
)
def test_length_prefix_is_bounded(prefix: bytes) -> None:
    with pytest.raises(ProtocolFailure):
        response_length(prefix)


def test_length_prefix_accepts_normal_sizes() -> None:
    assert response_length(struct.pack(">I", 200)) == 200


# --- local listeners -------------------------------------------------------------------------

Handler = Callable[[socket.socket], None]


@contextlib.contextmanager
def listener(handler: Handler | None, *, accept: bool = True) -> Iterator[tuple[int, list[int]]]:
    """A TCP server on 127.0.0.1; yields (port, accept counter). ``handler=None``: never answer."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted: list[int] = []
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            if handler is None:
                held.append(client)  # keep it open, say nothing
                continue
            with client, contextlib.suppress(OSError):
                handler(client)

    thread = threading.Thread(target=serve, daemon=True)
    if accept:
        thread.start()
    try:
        yield port, accepted
    finally:
        stop.set()
        if accept:
            thread.join(2)
        server.close()
        for client in held:
            client.close()


def read_request(client: socket.socket) -> bytes:
    client.settimeout(2)
    head = b""
    while len(head) < 4:
        head += client.recv(4 - len(head))
    (length,) = struct.unpack(">I", head)
    data = b""
    while len(data) < length:
        data += client.recv(length - len(data))
    return data


def answering(message: bytes) -> Handler:
    def handler(client: socket.socket) -> None:
        read_request(client)
        client.sendall(framed(message))

    return handler


def free_port() -> int:
    """A port with (almost certainly) no listener: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def fake_munge(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace munge.encode; records each payload it was asked to sign."""
    calls: list[bytes] = []

    def encode(payload: bytes, *, timeout: float, socket_path: str | None = None) -> bytes:
        assert timeout > 0
        calls.append(payload)
        return CRED

    monkeypatch.setattr(munge, "encode", encode)
    return calls


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> Callable[[str], str]:
    """Write a stand-in scontrol: a shell script with the given body; returns its path."""

    def make(script: str) -> str:
        path = tmp_path / "scontrol"
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(0o755)
        return str(path)

    return make


def timed(fn: Callable[[], CallerIdAnswer]) -> tuple[CallerIdAnswer, float]:
    start = time.monotonic()
    answer = fn()
    return answer, time.monotonic() - start


def test_member_over_tcp(fake_munge: list[bytes]) -> None:
    with listener(answering(response(callerid_body(42)))) as (port, _):
        answer = query_callerid(
            loopback(), slurmd_port=port, protocol_version=PROTOCOL_22_05, method="native"
        )
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert answer.job_id == 42
    assert answer.method == "native"
    assert fake_munge == [b"\x01\x13\xab"]


def test_request_on_the_wire(fake_munge: list[bytes]) -> None:
    seen: list[bytes] = []

    def handler(client: socket.socket) -> None:
        seen.append(read_request(client))
        client.sendall(framed(response(callerid_body(NO_VAL))))

    conn = loopback(port_src=43210)
    with listener(handler) as (port, _):
        answer = query_callerid(conn, slurmd_port=port, protocol_version=PROTOCOL_24_11)
    assert answer.outcome is CallerIdOutcome.INDETERMINATE
    assert seen[0] == pack_request(conn, CRED, PROTOCOL_24_11)[4:]


def test_refused_is_unreachable_at_once(fake_munge: list[bytes]) -> None:
    answer, elapsed = timed(
        lambda: query_callerid(loopback(), slurmd_port=free_port(), protocol_version=0x2600)
    )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert answer.method == "native"
    assert elapsed < 0.1
    assert fake_munge == []  # no credential spent on a refusal


@pytest.mark.parametrize("method", ["native", "auto"])
def test_silent_slurmd_costs_the_deadline_not_more(
    fake_munge: list[bytes], method: callerid.Method, fake_scontrol: Callable[[str], str]
) -> None:
    scontrol = fake_scontrol("echo 99 n1")  # must NOT be used: a timeout is final
    with listener(None) as (port, _):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=0.5,
                method=method, scontrol_path=scontrol,
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert answer.method == "native"
    assert 0.45 <= elapsed <= 0.5 + SLACK


def test_backlog_only_listener_times_out(fake_munge: list[bytes]) -> None:
    # Kernel completes the handshake, nobody ever calls accept(): a SIGSTOPped slurmd.
    with listener(None, accept=False) as (port, _):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=0.3
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert elapsed <= 0.3 + SLACK


def test_dripping_answer_is_cut_at_the_deadline(fake_munge: list[bytes]) -> None:
    message = framed(response(callerid_body(42)))

    def drip(client: socket.socket) -> None:
        read_request(client)
        for byte in message:
            client.sendall(bytes([byte]))
            time.sleep(0.05)

    with listener(drip) as (port, _):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=0.4,
                method="native",
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert elapsed <= 0.4 + SLACK


def test_garbage_native_only_is_unreachable_fast(fake_munge: list[bytes]) -> None:
    def garbage(client: socket.socket) -> None:
        client.recv(4096)
        client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with listener(garbage) as (port, accepted):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=0.5,
                method="native",
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert answer.method == ""  # nothing we understood answered
    assert len(accepted) == 1  # garbage is not retried
    assert elapsed <= 0.5 + SLACK


def test_garbage_then_scontrol_in_auto(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str]
) -> None:
    def garbage(client: socket.socket) -> None:
        client.recv(4096)
        client.sendall(struct.pack(">I", 20) + bytes(20))

    scontrol = fake_scontrol('[ "$1" = callerid ] && echo "$2 $3 $4 $5 $6" >&2; echo 77 n1')
    with listener(garbage) as (port, _):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=1.0,
                scontrol_path=scontrol,
            )
        )
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert answer.job_id == 77
    assert answer.method == "scontrol"
    assert elapsed <= 1.0 + SLACK


def test_reset_is_retried_then_answered(fake_munge: list[bytes]) -> None:
    calls: list[int] = []

    def flaky(client: socket.socket) -> None:
        read_request(client)
        calls.append(1)
        if len(calls) == 1:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        client.sendall(framed(response(callerid_body(42))))

    with listener(flaky) as (port, accepted):
        answer = query_callerid(
            loopback(), slurmd_port=port, protocol_version=0x2600, method="native"
        )
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert len(accepted) == 2
    assert len(fake_munge) == 2  # a fresh credential each time (munge rejects replays)


def rst(client: socket.socket) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout."""
    read_request(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_resets_are_retried_a_bounded_number_of_times(fake_munge: list[bytes]) -> None:
    with listener(rst) as (port, accepted):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, method="native"
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert len(accepted) == callerid.MAX_ATTEMPTS
    assert elapsed < 0.5


def test_silent_close_is_a_rejection_not_retried(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str]
) -> None:
    # 22.05 closes without a word on a protocol version newer than its own.
    def close_at_once(client: socket.socket) -> None:
        read_request(client)

    with listener(close_at_once) as (port, accepted):
        answer = query_callerid(
            loopback(), slurmd_port=port, protocol_version=PROTOCOL_26_05,
            scontrol_path=fake_scontrol("echo 12 n1"),
        )
    assert (answer.outcome, answer.job_id, answer.method) == (
        CallerIdOutcome.MEMBER, 12, "scontrol",
    )
    assert len(accepted) == 1


def test_retries_respect_the_deadline(
    fake_munge: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(callerid, "RETRY_WAIT", 0.2)
    monkeypatch.setattr(callerid, "MAX_ATTEMPTS", 100)
    with listener(rst) as (port, accepted):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, deadline=0.5,
                method="native",
            )
        )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert 2 <= len(accepted) <= 3
    assert elapsed <= 0.5 + SLACK


def test_munge_failure_falls_back_to_scontrol(
    monkeypatch: pytest.MonkeyPatch, fake_scontrol: Callable[[str], str]
) -> None:
    def broken(payload: bytes, *, timeout: float, socket_path: str | None = None) -> bytes:
        raise munge.MungeError("munged is down")

    monkeypatch.setattr(munge, "encode", broken)
    scontrol = fake_scontrol("echo 'slurm_network_callerid: remote job id indeterminate' >&2\n"
                             "exit 1")
    with listener(None) as (port, _):
        answer, elapsed = timed(
            lambda: query_callerid(
                loopback(), slurmd_port=port, protocol_version=0x2600, scontrol_path=scontrol
            )
        )
    assert answer.outcome is CallerIdOutcome.INDETERMINATE
    assert answer.method == "scontrol"
    assert elapsed <= 1.0 + SLACK


# --- scontrol path ---------------------------------------------------------------------------


def test_unspoken_version_goes_to_scontrol(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str], tmp_path: Path
) -> None:
    argv_file = tmp_path / "argv"
    scontrol = fake_scontrol(f'echo "$@" > {argv_file}; echo 1234 n2')
    answer = query_callerid(V6, slurmd_port=1, protocol_version=0x2400, scontrol_path=scontrol)
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert answer.job_id == 1234
    assert answer.method == "scontrol"
    assert argv_file.read_text().split() == [
        "callerid", "fd5a:213::11", "50001", "fd5a:213::12", "2222", "6",
    ]
    assert fake_munge == []


@pytest.mark.parametrize(
    ("script", "outcome", "method"),
    [
        ("echo 5 n1", CallerIdOutcome.MEMBER, "scontrol"),
        ("echo 'slurm_network_callerid: remote job id indeterminate' >&2; exit 1",
         CallerIdOutcome.INDETERMINATE, "scontrol"),
        ("echo 'slurm_network_callerid: unable to retrieve callerid data from remote slurmd' >&2;"
         " exit 1", CallerIdOutcome.UNREACHABLE, "scontrol"),
        ("echo 'something else' >&2; exit 1", CallerIdOutcome.UNREACHABLE, ""),
        ("exit 2", CallerIdOutcome.UNREACHABLE, ""),
        ("echo 4294967294 n1", CallerIdOutcome.UNREACHABLE, ""),
        ("echo", CallerIdOutcome.UNREACHABLE, ""),
    ],
)
def test_scontrol_outputs(
    fake_scontrol: Callable[[str], str], script: str, outcome: CallerIdOutcome, method: str
) -> None:
    answer = query_callerid(
        V4, slurmd_port=6818, protocol_version=0x2600, method="scontrol",
        scontrol_path=fake_scontrol(script),
    )
    assert (answer.outcome, answer.method) == (outcome, method)


def test_hung_scontrol_is_killed_at_the_deadline(fake_scontrol: Callable[[str], str]) -> None:
    scontrol = fake_scontrol("exec sleep 30")
    answer, elapsed = timed(
        lambda: query_callerid(
            V4, slurmd_port=6818, protocol_version=0x2600, deadline=0.5, method="scontrol",
            scontrol_path=scontrol,
        )
    )
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert elapsed <= 0.5 + SLACK


def test_missing_scontrol(tmp_path: Path) -> None:
    answer = query_callerid(
        V4, slurmd_port=6818, protocol_version=0x2600, method="scontrol",
        scontrol_path=str(tmp_path / "nope"),
    )
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "")


def test_native_only_with_unspoken_version_does_not_run_scontrol(
    fake_scontrol: Callable[[str], str],
) -> None:
    answer = query_callerid(
        V4, slurmd_port=6818, protocol_version=0x2E00, method="native",
        scontrol_path=fake_scontrol("echo 5 n1"),
    )
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "")


def test_mixed_families_are_not_queried() -> None:
    conn = Connection(V4.local_ip, 22, V6.remote_ip, 1)
    answer = query_callerid(conn, slurmd_port=6818, protocol_version=0x2600)
    assert answer.outcome is CallerIdOutcome.UNREACHABLE


# --- munge -----------------------------------------------------------------------------------


def test_munge_cli_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "munge"
    fake.write_text('#!/bin/sh\n[ "$(od -An -tx1 | tr -d " \\n")" = 0113ab ] || exit 3\n'
                    "echo 'MUNGE:abc:'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(munge, "MUNGE_CLI", str(fake))
    monkeypatch.setattr(munge, "_lib", None)
    monkeypatch.setattr(munge, "_lib_missing", True)
    assert munge.encode(b"\x01\x13\xab", timeout=2) == b"MUNGE:abc:"


def test_munge_cli_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "munge"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(munge, "MUNGE_CLI", str(fake))
    start = time.monotonic()
    with pytest.raises(munge.MungeError, match="did not finish"):
        munge.encode_cli(b"x", timeout=0.3)
    assert time.monotonic() - start < 0.3 + SLACK


def test_munge_cli_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(munge, "MUNGE_CLI", str(tmp_path / "nope"))
    with pytest.raises(munge.MungeError, match="is not installed"):
        munge.encode_cli(b"x", timeout=1)


def test_libmunge_hang_is_abandoned_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    if not munge.libmunge_available():
        pytest.skip("libmunge.so.2 not installed")
    release = threading.Event()

    def hang(lib: object, payload: bytes, socket_path: str | None) -> bytes:
        release.wait(5)
        return b"MUNGE:late:"

    monkeypatch.setattr(munge, "_encode_blocking", hang)
    start = time.monotonic()
    try:
        with pytest.raises(munge.MungeError, match="did not answer"):
            munge.encode_libmunge(b"x", timeout=0.2)
        assert time.monotonic() - start < 0.2 + SLACK
    finally:
        release.set()


def test_libmunge_without_munged_fails_cleanly(tmp_path: Path) -> None:
    if not munge.libmunge_available():
        pytest.skip("libmunge.so.2 not installed")
    with pytest.raises(munge.MungeError, match="munge_encode"):
        munge.encode_libmunge(b"x", timeout=5, socket_path=str(tmp_path / "no-socket"))


def test_answer_cache_asks_once_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate (twice) and the wrapper ask about one connection: one RPC."""
    calls: list[Connection] = []

    def fake(conn: Connection, **_: object) -> CallerIdAnswer:
        calls.append(conn)
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE)

    monkeypatch.setattr(callerid, "query_callerid", fake)
    cache = callerid.AnswerCache(ttl=60)
    one = Connection(ipaddress.ip_address("10.0.0.2"), 22, ipaddress.ip_address("10.0.0.1"), 5000)
    other = Connection(ipaddress.ip_address("10.0.0.2"), 22, ipaddress.ip_address("10.0.0.1"), 5001)
    for conn in (one, one, one, other):
        assert cache.query(conn, slurmd_port=6818, protocol_version=0x2600).outcome is (
            CallerIdOutcome.UNREACHABLE)
    assert calls == [one, other]
