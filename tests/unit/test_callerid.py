"""The callerid RPC: framing, parsing, and the one-deadline rule against local listeners.

The framing tests are pure. The deadline tests run real TCP listeners on
127.0.0.1 that refuse, hang, drip, reset or answer garbage, with munge
replaced by a stub (the host running unit tests has no munged; the live
tests in tests/integration/test_callerid_live.py use the real one). Every
query names 127.0.0.1 as a Slurm node's slurmd address: an address that is
not one is never sent anything.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from Crypto.Hash import KangarooTwelve

from sshd_adopt._internal import run
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.core.decision import CallerIdAnswer, CallerIdOutcome
from sshd_adopt._internal.node import fsids
from sshd_adopt._internal.slurm import callerid, callerid_wire, munge
from sshd_adopt._internal.slurm.callerid import CallerIdRequest, query_callerid
from sshd_adopt._internal.slurm.callerid_wire import (
    NO_VAL,
    PROTOCOL_22_05,
    PROTOCOL_24_11,
    PROTOCOL_25_11,
    PROTOCOL_26_05,
    REQUEST_NETWORK_CALLERID,
    RESPONSE_NETWORK_CALLERID,
    RESPONSE_SLURM_RC,
    ProtocolFailure,
    Rejected,
    Reply,
    pack_request,
    pack_request_body,
    parse_response,
    response_length,
)
from tests.unit.fakes import ALICE, BOB, broker_state, slurm_facts

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


ME = run.Identity(os.getuid(), os.getgid())


def req(port: int = 6818, *, address: str = "127.0.0.1", **changes: object) -> CallerIdRequest:
    """A request whose only Slurm node is ``address`` (slurmd on ``port``), asked as us."""
    fields: dict[str, object] = {
        "requester": ME,
        "credential": munge.CredentialOptions(restrict_uid=0),
        "slurmds": {ipaddress.ip_address(address): port},
        "protocol_version": PROTOCOL_22_05,
    }
    fields.update(changes)
    return CallerIdRequest(**fields)  # type: ignore[arg-type]


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
    plugin: int = callerid_wire.AUTH_PLUGIN_MUNGE,
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


def test_hash_payload_is_libslurms_k12_binding() -> None:
    # Slurm's own KangarooTwelve.c (22.05.8, compiled) gives this digest for 52 zero bytes
    # with the customisation htons(5035) = 13 ab; the payload is the K12 plugin id, then it.
    digest = "85822b47af51e6b2142e36890551da403fef0426b030107ac0f09b51c95cbb6a"
    assert callerid_wire.hash_payload(bytes(52)) == b"\x02" + bytes.fromhex(digest)
    body = pack_request_body(V4)
    assert callerid_wire.hash_payload(body) == b"\x02" + KangarooTwelve.new(
        data=body, custom=b"\x13\xab").read(32)
    assert callerid_wire.hash_payload(body) != callerid_wire.hash_payload(pack_request_body(V6))


@pytest.mark.parametrize("version", [PROTOCOL_22_05, PROTOCOL_24_11, PROTOCOL_26_05])
def test_request_frame(version: int) -> None:
    frame = pack_request(pack_request_body(V4), CRED, version)
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
    with pytest.raises(Rejected):
        pack_request(pack_request_body(V4), CRED, version)


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

    def encode(payload: bytes, *, requester: run.Identity, options: munge.CredentialOptions,
               timeout: float, munge: str = "") -> bytes:
        assert timeout > 0
        assert requester == ME
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
        answer = query_callerid(loopback(), req(port, method="native"))
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert answer.job_id == 42
    assert answer.method == "native"
    assert fake_munge == [callerid_wire.hash_payload(pack_request_body(loopback()))]


def test_request_on_the_wire(fake_munge: list[bytes]) -> None:
    seen: list[bytes] = []

    def handler(client: socket.socket) -> None:
        seen.append(read_request(client))
        client.sendall(framed(response(callerid_body(NO_VAL))))

    conn = loopback(port_src=43210)
    with listener(handler) as (port, _):
        answer = query_callerid(conn, req(port, protocol_version=PROTOCOL_24_11))
    assert answer.outcome is CallerIdOutcome.INDETERMINATE
    body = pack_request_body(conn)
    assert seen[0] == pack_request(body, CRED, PROTOCOL_24_11)[4:]
    # The credential was asked to carry the K12 binding of exactly that body.
    assert fake_munge == [callerid_wire.hash_payload(body)]


def test_a_source_that_is_not_a_slurm_node_is_sent_nothing(fake_munge: list[bytes]) -> None:
    """A login host (no NodeAddr of slurm.conf) gets no connection and no credential."""
    with listener(answering(response(callerid_body(42)))) as (port, accepted):
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, address="10.213.0.11")))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.NOT_A_NODE, "")
    assert accepted == []
    assert fake_munge == []
    assert elapsed < 0.05


def test_an_ipv6_source_is_sent_nothing_unless_slurmd_listens_on_ipv6(
        fake_munge: list[bytes]) -> None:
    # The map holds IPv6 addresses only with EnableIPv6 (slurmconf.slurmd_addresses).
    answer = query_callerid(V6, req(6818, address="10.213.0.11"))
    assert answer.outcome is CallerIdOutcome.NOT_A_NODE
    assert fake_munge == []


def test_the_port_is_the_source_slurmds(fake_munge: list[bytes]) -> None:
    with listener(answering(response(callerid_body(7)))) as (port, accepted):
        slurmds = {ipaddress.ip_address("127.0.0.1"): port,
                   ipaddress.ip_address("127.0.0.2"): free_port()}
        answer = query_callerid(loopback(), req(slurmds=slurmds))
    assert (answer.outcome, answer.job_id) == (CallerIdOutcome.MEMBER, 7)
    assert len(accepted) == 1


def test_refused_is_unreachable_at_once(fake_munge: list[bytes]) -> None:
    answer, elapsed = timed(lambda: query_callerid(loopback(), req(free_port())))
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
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, deadline=0.5, method=method, scontrol=scontrol)))
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert answer.method == "native"
    assert 0.45 <= elapsed <= 0.5 + SLACK


def test_backlog_only_listener_times_out(fake_munge: list[bytes]) -> None:
    # Kernel completes the handshake, nobody ever calls accept(): a SIGSTOPped slurmd.
    with listener(None, accept=False) as (port, _):
        answer, elapsed = timed(lambda: query_callerid(loopback(), req(port, deadline=0.3)))
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
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, deadline=0.4, method="native")))
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert elapsed <= 0.4 + SLACK


@pytest.mark.parametrize("method", ["native", "auto"])
def test_garbage_is_final_not_retried_nor_passed_to_scontrol(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str], method: callerid.Method,
) -> None:
    """A listener answering garbage gets one credential, not a retry or an scontrol one."""
    def garbage(client: socket.socket) -> None:
        client.recv(4096)
        client.sendall(struct.pack(">I", 20) + bytes(20))

    ran = fake_scontrol("echo 77 n1")
    with listener(garbage) as (port, accepted):
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, deadline=0.5, method=method, scontrol=ran)))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "native")
    assert len(accepted) == 1
    assert len(fake_munge) == 1
    assert elapsed <= 0.5 + SLACK


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
        answer = query_callerid(loopback(), req(port, method="native"))
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert len(accepted) == 2
    assert len(fake_munge) == 2  # a fresh credential each time (munge rejects replays)


def rst(client: socket.socket) -> None:
    """Close with RST instead of FIN: SO_LINGER with a zero timeout."""
    read_request(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("method", ["native", "auto"])
def test_resets_are_retried_a_bounded_number_of_times(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str], method: callerid.Method,
) -> None:
    with listener(rst) as (port, accepted):
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, method=method, scontrol=fake_scontrol("echo 5 n1"))))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "native")
    assert len(accepted) == callerid.MAX_ATTEMPTS
    assert len(fake_munge) == callerid.MAX_ATTEMPTS  # and no scontrol credential after them
    assert elapsed < 0.5


def test_silent_close_is_a_rejection_not_retried(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str]
) -> None:
    # 22.05 closes without a word on a protocol version newer than its own.
    def close_at_once(client: socket.socket) -> None:
        read_request(client)

    with listener(close_at_once) as (port, accepted):
        answer = query_callerid(loopback(), req(
            port, protocol_version=PROTOCOL_26_05, scontrol=fake_scontrol("echo 12 n1")))
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
        answer, elapsed = timed(lambda: query_callerid(
            loopback(), req(port, deadline=0.5, method="native")))
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert 2 <= len(accepted) <= 3
    assert elapsed <= 0.5 + SLACK


def test_munge_failure_is_final(
    monkeypatch: pytest.MonkeyPatch, fake_scontrol: Callable[[str], str], tmp_path: Path
) -> None:
    def broken(payload: bytes, **_: object) -> bytes:
        raise munge.MungeError("munged is down")

    monkeypatch.setattr(munge, "encode", broken)
    ran = tmp_path / "ran"
    scontrol = fake_scontrol(f"touch {ran}; echo 5 n1")
    with listener(None) as (port, _):
        answer, elapsed = timed(lambda: query_callerid(loopback(), req(port, scontrol=scontrol)))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "native")
    assert not ran.exists()  # scontrol would need the same munged
    assert elapsed <= 1.0 + SLACK


# --- scontrol path ---------------------------------------------------------------------------


def test_unspoken_version_goes_to_scontrol(
    fake_munge: list[bytes], fake_scontrol: Callable[[str], str], tmp_path: Path
) -> None:
    argv_file = tmp_path / "argv"
    env_file = tmp_path / "env"
    scontrol = fake_scontrol(f'echo "$@" > {argv_file}; env > {env_file}; echo 1234 n2')
    answer = query_callerid(V6, req(1, address="fd5a:213::11", protocol_version=0x2400,
                                    scontrol=scontrol))
    assert answer.outcome is CallerIdOutcome.MEMBER
    assert answer.job_id == 1234
    assert answer.method == "scontrol"
    assert argv_file.read_text().split() == [
        "callerid", "fd5a:213::11", "50001", "fd5a:213::12", "2222", "6",
    ]
    assert fake_munge == []
    # The fixed tool environment, not the broker's.
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert env.get("PATH") == run.TOOL_ENV["PATH"]
    assert "SLURM_CONF" not in env and "HOME" not in env


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
    answer = query_callerid(V4, req(address="10.213.0.11", method="scontrol",
                                    scontrol=fake_scontrol(script)))
    assert (answer.outcome, answer.method) == (outcome, method)


def test_hung_scontrol_is_killed_at_the_deadline(fake_scontrol: Callable[[str], str]) -> None:
    scontrol = fake_scontrol("exec sleep 30")
    answer, elapsed = timed(lambda: query_callerid(V4, req(
        address="10.213.0.11", deadline=0.5, method="scontrol", scontrol=scontrol)))
    assert answer.outcome is CallerIdOutcome.UNREACHABLE
    assert elapsed <= 0.5 + SLACK


def test_missing_scontrol(tmp_path: Path) -> None:
    answer = query_callerid(V4, req(address="10.213.0.11", method="scontrol",
                                    scontrol=str(tmp_path / "nope")))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "")


def test_native_only_with_unspoken_version_does_not_run_scontrol(
    fake_scontrol: Callable[[str], str],
) -> None:
    answer = query_callerid(V4, req(address="10.213.0.11", protocol_version=0x2E00,
                                    method="native", scontrol=fake_scontrol("echo 5 n1")))
    assert (answer.outcome, answer.method) == (CallerIdOutcome.UNREACHABLE, "native")


def test_mixed_families_are_not_queried() -> None:
    conn = Connection(V4.local_ip, 22, V6.remote_ip, 1)
    answer = query_callerid(conn, req(address="fd5a:213::11"))
    assert answer.outcome is CallerIdOutcome.UNREACHABLE


# --- munge -----------------------------------------------------------------------------------


@pytest.fixture
def cli_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node where libmunge does not load: the ``munge`` CLI mints the credential."""
    monkeypatch.setattr(munge, "_libmunge", lambda: None)


def fake_munge_cli(tmp_path: Path, body: str) -> str:
    path = tmp_path / "munge"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_munge_cli_gets_the_restriction_ttl_socket_and_payload(
        tmp_path: Path, cli_only: None) -> None:
    argv = tmp_path / "argv"
    cli = fake_munge_cli(tmp_path, f'echo "$@" > {argv}\n'
                         '[ "$(od -An -tx1 | tr -d " \\n")" = 02aabb ] || exit 3\n'
                         "echo 'MUNGE:abc:'")
    options = munge.CredentialOptions(restrict_uid=0, ttl=30, socket="/run/munge/alt.socket")
    assert munge.encode(b"\x02\xaa\xbb", requester=ME, options=options, timeout=2,
                        munge=cli) == b"MUNGE:abc:"
    assert argv.read_text().split() == [
        "--restrict-uid", "0", "--ttl", "30", "--socket", "/run/munge/alt.socket"]


def test_munge_defaults_leave_ttl_and_socket_to_munged() -> None:
    assert munge.CredentialOptions(restrict_uid=64030).argv("/usr/bin/munge") == [
        "/usr/bin/munge", "--restrict-uid", "64030"]


def test_munge_cli_timeout(tmp_path: Path, cli_only: None) -> None:
    cli = fake_munge_cli(tmp_path, "exec sleep 30")
    start = time.monotonic()
    with pytest.raises(munge.MungeError, match="killed after"):
        munge.encode(b"x", requester=ME, options=munge.CredentialOptions(0), timeout=0.3,
                     munge=cli)
    assert time.monotonic() - start < 0.3 + SLACK


def test_munge_cli_missing(tmp_path: Path, cli_only: None) -> None:
    with pytest.raises(munge.MungeError, match="not installed"):
        munge.encode(b"x", requester=ME, options=munge.CredentialOptions(0), timeout=1,
                     munge=str(tmp_path / "nope"))


def test_munge_cli_refusal_is_an_error(tmp_path: Path, cli_only: None) -> None:
    cli = fake_munge_cli(tmp_path, "echo 'munge: Error: Failed to access socket' >&2; exit 6")
    with pytest.raises(munge.MungeError, match="Failed to access"):
        munge.encode(b"x", requester=ME, options=munge.CredentialOptions(0), timeout=1,
                     munge=cli)


def test_with_libmunge_the_encode_runs_on_a_thread_with_the_users_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libmunge loads, nothing is forked: the minting thread takes the requester's
    uid and primary gid (what munged reads from its socket), and no CLI runs."""
    taken: list[tuple[int, int]] = []

    def call_as_peer(uid: int, gid: int, work: object, **_: object) -> bytes:
        taken.append((uid, gid))
        return b"MUNGE:BBBB:"

    def no_cli(*_a: object, **_k: object) -> run.Finished:
        raise AssertionError("the CLI ran although libmunge loaded")

    monkeypatch.setattr(munge, "_libmunge", lambda: object())
    monkeypatch.setattr(fsids, "peer_ids_supported", lambda: True)
    monkeypatch.setattr(fsids, "call_as_peer", call_as_peer)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(run, "run", no_cli)
    alice = run.Identity(2001, 2002, (2002, 100))
    assert munge.encode(b"x", requester=alice, options=munge.CredentialOptions(0),
                        timeout=1) == b"MUNGE:BBBB:"
    assert taken == [(2001, 2002)]


def test_libmunge_loads_on_this_machine() -> None:
    """Debian's libmunge2 comes with Slurm; the broker finds it by its soname."""
    assert munge._libmunge() is not None


def test_source_jobs_ask_once_per_connection_and_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Early adoption, the wrapper and the sweeper ask about one connection: one RPC."""
    calls: list[tuple[Connection, int]] = []

    def fake(conn: Connection, request: CallerIdRequest) -> CallerIdAnswer:
        calls.append((conn, request.requester.uid))
        return CallerIdAnswer(CallerIdOutcome.UNREACHABLE)

    monkeypatch.setattr(callerid, "query_callerid", fake)
    state = broker_state()
    source = callerid.SourceJobs(lambda: state, ttl=60)
    one = Connection(ipaddress.ip_address("10.0.0.2"), 22, ipaddress.ip_address("10.0.0.1"), 5000)
    other = Connection(ipaddress.ip_address("10.0.0.2"), 22, ipaddress.ip_address("10.0.0.1"), 5001)
    for conn, account in ((one, ALICE), (one, ALICE), (one, ALICE), (other, ALICE), (one, BOB)):
        assert source.ask(account, conn).outcome is CallerIdOutcome.UNREACHABLE
    assert calls == [(one, ALICE.uid), (other, ALICE.uid), (one, BOB.uid)]
    assert source.ask(ALICE, None).outcome is CallerIdOutcome.NO_SOCKET


def test_source_jobs_build_the_request_from_slurm_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Destinations, SlurmdUser, AuthInfo and the requester come from the broker's state."""
    seen: list[CallerIdRequest] = []
    def fake(conn: Connection, request: CallerIdRequest) -> CallerIdAnswer:
        seen.append(request)
        return CallerIdAnswer(CallerIdOutcome.INDETERMINATE)

    monkeypatch.setattr(callerid, "query_callerid", fake)
    slurmds = {ipaddress.ip_address("10.0.0.12"): 7001}
    state = broker_state(slurm=slurm_facts(slurmd_user_uid=64030, auth_ttl=20,
                                           auth_socket="/run/m.sock", slurmds=slurmds))
    callerid.SourceJobs(lambda: state).ask(ALICE, V4)
    (request,) = seen
    assert request.requester == run.Identity(ALICE.uid, ALICE.gid)
    assert request.credential == munge.CredentialOptions(64030, 20, "/run/m.sock")
    assert request.slurmds == slurmds
    assert (request.scontrol, request.munge) == ("/usr/bin/scontrol", "/usr/bin/munge")
