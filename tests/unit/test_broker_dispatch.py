"""The broker's dispatch table, its replies, and one request's way through the server.

The services are fakes that record what they were asked (the server is built with a
fake :class:`~sshd_adopt._internal.broker.node.Node`); the server itself is real:
``Broker._on_client`` reads from an ``asyncio.StreamReader`` fed by the test and
writes to a fake writer whose socket reports the SO_PEERCRED the test chose, and one
test goes through a real unix socket, where the kernel reports the peer.

Who may ask what: the server asks SO_PEERCRED and passes the peer on unchanged; it
does not check uids itself (a "keys" request from a uid that is not the gate's reaches
admission, whose ``verify_gate_peer`` refuses it). What the server does refuse is
anything that is not one well-formed, bounded request of a kind in ``REQUESTS``:
such a client is dropped without an answer and no service is asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import cast

import pytest

from sshd_adopt import __version__
from sshd_adopt._internal import protocol
from sshd_adopt._internal.broker import server
from sshd_adopt._internal.broker.node import Node
from sshd_adopt._internal.broker.replies import render_adoption, render_keys
from sshd_adopt._internal.broker.server import CONVERSATIONS, REQUESTS, Broker
from sshd_adopt._internal.config import AdmissionSettings, BrokerSettings, Config, Messages
from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.outcomes import Adopted, Allowed, Denied, Failed, Outcome
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.services.admission import Keys, KeysOutcome, Refused
from sshd_adopt._internal.services.adoption import Peer
from sshd_adopt._internal.slurm import hints
from sshd_adopt.errors import AccessDenied, BrokerProtocolError
from tests.unit.fakes import broker_state

CONFIG_PATH = "/etc/sshd-adopt/test.toml"
ALICE_PEER = Peer(pid=4321, uid=2001, gid=2001)
GATE_PEER = Peer(pid=777, uid=998, gid=998)


# --------------------------------------------------------------------------- fakes


class FakeAdoption:
    """Answers the wrapper's requests with ``outcome``; ``hold`` makes it wait first."""

    def __init__(self) -> None:
        self.asked: list[tuple[Peer, dict[str, str]]] = []
        self.outcome: Outcome = Allowed("root")
        self.hold: threading.Event | None = None
        self.error: Exception | None = None

    def request(self, peer: Peer, overrides: dict[str, str]) -> Outcome:
        self.asked.append((peer, dict(overrides)))
        if self.hold is not None:
            self.hold.wait(5)
        if self.error is not None:
            raise self.error
        return self.outcome


class FakeAdmission:
    """Answers the gate with ``outcome``."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int, str]] = []
        self.outcome: KeysOutcome = Refused("not the gate")

    def keys(self, peer_pid: int, peer_uid: int, user: str) -> KeysOutcome:
        self.asked.append((peer_pid, peer_uid, user))
        return self.outcome


class FakeNode:
    """What the request handlers reach of the node: the state and the two services."""

    def __init__(self, state: Callable[[], BrokerState], pool: Executor) -> None:
        self.state = state
        self.pool = pool
        self.adoption = FakeAdoption()
        self.admission = FakeAdmission()

    def asked(self) -> int:
        return len(self.adoption.asked) + len(self.admission.asked)

    def events(self) -> str:
        return "proc connector"


class FakeSocket:
    """A connected socket as far as SO_PEERCRED goes."""

    def __init__(self, peer: Peer) -> None:
        self.creds = struct.pack("3i", peer.pid, peer.uid, peer.gid)
        self.options: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.options.append((level, option, size))
        return self.creds


class FakeWriter:
    """The server's side of a connection: what it wrote, and whether it closed it."""

    def __init__(self, peer: Peer) -> None:
        self.sock = FakeSocket(peer)
        self.data = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None

    def reply(self) -> dict[str, str]:
        """The one frame written, decoded."""
        length = protocol.frame_length(bytes(self.data[:4]), limit=protocol.MAX_REPLY_FRAME)
        assert len(self.data) == 4 + length
        return protocol.decode(bytes(self.data[4:]), limit=protocol.MAX_REPLY_FRAME)


MakeBroker = Callable[..., tuple[Broker, FakeNode]]


@pytest.fixture
def make_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeBroker]:
    """A real Broker over a FakeNode; ``state`` is what its loader returns."""
    nodes: list[FakeNode] = []

    def node_factory(state: Callable[[], BrokerState], pool: Executor) -> FakeNode:
        node = FakeNode(state, pool)
        nodes.append(node)
        return node

    monkeypatch.setattr(server, "Node", node_factory)

    def make(state: BrokerState | None = None) -> tuple[Broker, FakeNode]:
        chosen = state or broker_state(Config(path=CONFIG_PATH))
        broker = Broker(lambda: chosen)
        return broker, nodes[-1]

    yield make
    for node in nodes:
        assert isinstance(node.pool, ThreadPoolExecutor)
        node.pool.shutdown(wait=True, cancel_futures=True)


def state_with(**broker: object) -> BrokerState:
    settings = dataclasses.replace(BrokerSettings(), **broker)  # type: ignore[arg-type]
    return broker_state(Config(path=CONFIG_PATH, broker=settings))


def frame(items: dict[str, str]) -> bytes:
    return protocol.encode(items)


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def talk(broker: Broker, data: bytes, peer: Peer = ALICE_PEER) -> FakeWriter:
    """One connection from ``peer`` that sends ``data`` and then closes its side."""
    writer = FakeWriter(peer)

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await broker._on_client(reader, cast(asyncio.StreamWriter, writer))

    asyncio.run(run())
    return writer


# --------------------------------------------------------------------------- the table


def test_the_table_serves_exactly_the_kinds_the_protocol_knows() -> None:
    assert set(REQUESTS) | CONVERSATIONS == protocol.OPS
    assert not set(REQUESTS) & CONVERSATIONS


def test_adopt_goes_to_adoption_with_the_peer_and_overrides() -> None:
    node = FakeNode(lambda: broker_state(Config(path=CONFIG_PATH)), ThreadPoolExecutor(1))
    node.adoption.outcome = Adopted(12, "in job", {"SLURM_JOB_ID": "12"})
    reply = REQUESTS["adopt"].serve(cast(Node, node), ALICE_PEER, {"action_unknown": "deny"})
    assert node.adoption.asked == [(ALICE_PEER, {"action_unknown": "deny"})]
    assert node.admission.asked == []
    assert reply == {"v": "1", "result": "adopted", "job": "12", "env.SLURM_JOB_ID": "12"}


def test_keys_goes_to_admission_with_the_peers_pid_uid_and_the_user() -> None:
    node = FakeNode(lambda: broker_state(Config(path=CONFIG_PATH)), ThreadPoolExecutor(1))
    node.admission.outcome = Keys("ssh-ed25519 AAAA alice\n", False, "has a job")
    reply = REQUESTS["keys"].serve(cast(Node, node), GATE_PEER, {protocol.KEYS_USER: "alice"})
    assert node.admission.asked == [(GATE_PEER.pid, GATE_PEER.uid, "alice")]
    assert node.adoption.asked == []
    assert reply == {"v": "1", "result": "keys", "keys": "ssh-ed25519 AAAA alice\n"}


def test_ping_answers_from_the_state_and_asks_no_service() -> None:
    node = FakeNode(lambda: broker_state(Config(path=CONFIG_PATH)), ThreadPoolExecutor(1))
    reply = REQUESTS["ping"].serve(cast(Node, node), ALICE_PEER, {})
    assert reply == {"v": "1", "result": "pong", "version": __version__, "node": "n1",
                     "config": CONFIG_PATH, "events": "proc connector"}
    assert node.asked() == 0


def test_ping_without_a_node_name_says_so_with_an_empty_node() -> None:
    node = FakeNode(lambda: broker_state(Config(path=CONFIG_PATH), slurm=False),
                    ThreadPoolExecutor(1))
    assert REQUESTS["ping"].serve(cast(Node, node), ALICE_PEER, {})["node"] == ""


def test_deadlines_and_reply_bounds_per_kind() -> None:
    config = Config(path=CONFIG_PATH,
                    broker=BrokerSettings(request_timeout=0.7, decision_deadline=3.0),
                    admission=AdmissionSettings(timeout=1.5))
    state = broker_state(config)
    assert REQUESTS["adopt"].deadline(state) == 3.0
    assert REQUESTS["keys"].deadline(state) == 4.5  # the key source's bound on top
    assert REQUESTS["ping"].deadline(state) == 0.7
    assert REQUESTS["keys"].reply_limit == protocol.MAX_REPLY_FRAME
    assert REQUESTS["adopt"].reply_limit == protocol.MAX_FRAME
    assert REQUESTS["ping"].reply_limit == protocol.MAX_FRAME


# --------------------------------------------------------------------------- rendering


class HintStub:
    """squeue stand-in for the denial hint: answers ``jobs``; records (user, timeout)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.jobs: list[tuple[int, str]] | None = [(12, "n[2-3]"), (15, "n4")]

    def running_jobs_elsewhere(self, user: str, *, timeout: float = 0.5,
                               squeue: str = "squeue") -> list[tuple[int, str]] | None:
        self.calls.append((user, timeout))
        return self.jobs


@pytest.fixture
def hint(monkeypatch: pytest.MonkeyPatch) -> HintStub:
    stub = HintStub()
    monkeypatch.setattr(hints, "running_jobs_elsewhere", stub.running_jobs_elsewhere)
    return stub


HINT = ("Your running jobs: 12 on n[2-3], 15 on n4. To get a shell inside one: "
        "srun --jobid=12 --overlap --pty bash")
DEFAULT_TEXTS = {
    Message.NO_JOBS: "Access denied by sshd-adopt: you have no active jobs on this node",
    Message.UNKNOWN_SOURCE: "Access denied by sshd-adopt: unable to determine source job",
    Message.ADOPT_FAILED: "Access denied by sshd-adopt: failed to adopt the session into job 42",
    Message.NO_NODE: "Access denied by sshd-adopt: this host is not a Slurm compute node "
                     "(no NodeName)",
    Message.NOT_AN_SSH_SESSION: "sshd-adopt: not an ssh session",
}
HINTED = {Message.NO_JOBS, Message.UNKNOWN_SOURCE}


def test_every_message_kind_has_a_default_text_here() -> None:
    assert set(DEFAULT_TEXTS) == set(Message)


@pytest.mark.parametrize("kind", list(Message))
def test_denied_renders_the_kinds_text_and_hints_only_where_it_helps(
        kind: Message, hint: HintStub) -> None:
    state = broker_state(Config(path=CONFIG_PATH))
    outcome = Denied(kind, "why", user="alice", node="n1", failed_job=42, jobs=(42,))
    reply = render_adoption(state, outcome)
    expected = DEFAULT_TEXTS[kind] + ("\n" + HINT if kind in HINTED else "")
    assert reply == {"v": "1", "result": "denied", "message": expected}
    if kind in HINTED:
        assert [user for user, _ in hint.calls] == ["alice"]
        assert all(timeout <= 0.5 for _, timeout in hint.calls)  # a slow slurmctld costs little
    else:
        assert hint.calls == []  # nobody waits for squeue on a denial that shows no hint


@pytest.mark.parametrize("kind", list(Message))
def test_denied_fills_the_templates_fields(kind: Message,
                                           hint: HintStub) -> None:
    hint.jobs = None  # squeue failed: no hint
    templates = Messages(**{k.value: f"[{k.value}] {{user}}@{{node}} job={{job}} jobs={{jobs}}"
                            for k in Message})
    state = broker_state(Config(path=CONFIG_PATH, messages=templates))
    with_jobs = render_adoption(state, Denied(kind, "r", "bob", "n7", 9, (9, 11)))
    assert with_jobs["message"] == f"[{kind.value}] bob@n7 job=9 jobs=9,11"
    without = render_adoption(state, Denied(kind, "r", "bob", "n7"))
    assert without["message"] == f"[{kind.value}] bob@n7 job=- jobs=none"


def test_no_running_jobs_anywhere_is_said_too(hint: HintStub) -> None:
    hint.jobs = []
    reply = render_adoption(broker_state(Config(path=CONFIG_PATH)),
                            Denied(Message.NO_JOBS, "r", "alice", "n1"))
    assert reply["message"] == DEFAULT_TEXTS[Message.NO_JOBS] + "\nYou have no running jobs."


def test_adopted_carries_the_job_and_its_environment() -> None:
    outcome = Adopted(31, "newest job", {"SLURM_JOB_ID": "31", "DISPLAY": "localhost:10.0"})
    reply = render_adoption(broker_state(), outcome)
    assert reply == {"v": "1", "result": "adopted", "job": "31", "env.SLURM_JOB_ID": "31",
                     "env.DISPLAY": "localhost:10.0"}
    assert protocol.decode(protocol.encode(reply)[4:]) == reply


def test_allowed_is_a_bare_allowed() -> None:
    assert render_adoption(broker_state(), Allowed("root")) == {"v": "1", "result": "allowed"}


def test_failed_says_sshd_adopt_and_why(hint: HintStub) -> None:
    reply = render_adoption(broker_state(), Failed("stepd of job 5 hung"))
    assert reply == {"v": "1", "result": "failed", "message": "sshd-adopt: stepd of job 5 hung"}
    assert hint.calls == []


@pytest.mark.parametrize("restricted", [False, True])
def test_keys_are_passed_verbatim(restricted: bool) -> None:
    text = ('restrict ssh-ed25519 AAAAC3 alice@laptop\n' if restricted
            else 'ssh-ed25519 AAAAC3 alice@laptop\nssh-rsa AAAAB3 alice@desk\n')
    reply = render_keys(Keys(text, restricted, "reason"))
    assert reply == {"v": "1", "result": "keys", "keys": text}


def test_refused_keys_are_a_denial_with_the_reason() -> None:
    reply = render_keys(Refused("no job here"))
    assert reply == {"v": "1", "result": "denied", "message": "no job here"}
    assert "keys" not in reply


# --------------------------------------------------------------------------- the server


def test_peer_credentials_come_from_so_peercred_and_reach_the_service(
        make_broker: MakeBroker) -> None:
    broker, node = make_broker()
    node.adoption.outcome = Adopted(8, "ok", {"SLURM_JOB_ID": "8"})
    request = protocol.adopt_request({"action_adopt_failure": "deny"})
    writer = talk(broker, frame(request), ALICE_PEER)
    assert writer.sock.options == [(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)]
    assert node.adoption.asked == [(ALICE_PEER, {"action_adopt_failure": "deny"})]
    assert writer.reply() == {"v": "1", "result": "adopted", "job": "8",
                              "env.SLURM_JOB_ID": "8"}
    assert writer.closed


def test_ping_round_trip(make_broker: MakeBroker) -> None:
    broker, node = make_broker()
    writer = talk(broker, frame(protocol.ping_request()))
    assert writer.reply() == {"v": "1", "result": "pong", "version": __version__, "node": "n1",
                              "config": CONFIG_PATH, "events": "proc connector"}
    assert node.asked() == 0


def test_a_keys_request_from_any_uid_reaches_admission_with_that_uid(
        make_broker: MakeBroker) -> None:
    """The gate check is admission's: the server hands it the kernel's pid and uid."""
    broker, node = make_broker()
    node.admission.outcome = Refused("not the AuthorizedKeysCommandUser")
    writer = talk(broker, frame(protocol.keys_request("alice")), ALICE_PEER)
    assert node.admission.asked == [(ALICE_PEER.pid, ALICE_PEER.uid, "alice")]
    assert writer.reply() == {"v": "1", "result": "denied",
                              "message": "not the AuthorizedKeysCommandUser"}


def test_a_keys_reply_may_exceed_a_request_frame(make_broker: MakeBroker) -> None:
    broker, node = make_broker()
    keys = "".join(f"ssh-ed25519 {'A' * 80} key{i}\n" for i in range(300))
    assert len(keys) > protocol.MAX_FRAME
    node.admission.outcome = Keys(keys, False, "has a job")
    writer = talk(broker, frame(protocol.keys_request("alice")), GATE_PEER)
    assert writer.reply()["keys"] == keys


def test_an_adopt_reply_over_the_frame_bound_is_not_sent(make_broker: MakeBroker) -> None:
    broker, node = make_broker()
    node.adoption.outcome = Adopted(3, "ok", {"BIG": "x" * protocol.MAX_FRAME})
    writer = talk(broker, frame(protocol.adopt_request({})))
    assert len(node.adoption.asked) == 1
    assert writer.data == b""
    assert writer.closed


DROPPED = {
    "unknown op": frame({"v": "1", "op": "shutdown"}),
    "no op": frame({"v": "1"}),
    "other version": frame({"v": "2", "op": "ping"}),
    "not utf-8": raw_frame(b"v=1\0op=ping\0o.x=\xff"),
    "keys with extra items": frame({"v": "1", "op": "keys", "user": "alice", "uid": "0"}),
    "keys with a bad user": frame({"v": "1", "op": "keys", "user": "../root"}),
    "adopt claiming a fact": frame({"v": "1", "op": "adopt", "uid": "0"}),
    "zero length": b"\0\0\0\0",
    "oversized": (protocol.MAX_FRAME + 1).to_bytes(4, "big") + b"v=1\0op=ping",
    "huge": b"\xff\xff\xff\xff" + b"v=1\0op=ping",
    "body cut short": (100).to_bytes(4, "big") + b"v=1\0op=ping",
    "nothing after the length": (11).to_bytes(4, "big"),
}


@pytest.mark.parametrize("data", list(DROPPED.values()), ids=list(DROPPED))
def test_bad_frames_are_dropped_before_any_service(make_broker: MakeBroker, data: bytes) -> None:
    broker, node = make_broker()
    node.adoption.outcome = Adopted(1, "must not happen")
    writer = talk(broker, data)
    assert writer.data == b""
    assert writer.closed
    assert node.asked() == 0


def test_a_kind_missing_from_the_table_is_not_served(make_broker: MakeBroker,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the protocol know a kind the table lacks, the table wins."""
    monkeypatch.delitem(server.REQUESTS, "adopt")
    broker, node = make_broker()
    writer = talk(broker, frame(protocol.adopt_request({})))
    assert writer.data == b""
    assert node.asked() == 0


@pytest.mark.parametrize("data", list(DROPPED.values()), ids=list(DROPPED))
def test_answer_raises_a_protocol_error_for_bad_frames(make_broker: MakeBroker,
                                                        data: bytes) -> None:
    broker, node = make_broker()

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        await broker._read_request(reader)

    with pytest.raises(BrokerProtocolError):
        asyncio.run(run())
    assert node.asked() == 0


def test_a_client_that_closes_inside_the_length_prefix_is_dropped_quietly(
        make_broker: MakeBroker) -> None:
    broker, node = make_broker()
    writer = talk(broker, b"\0\0")
    assert writer.data == b""
    assert node.asked() == 0


def test_a_client_that_closes_inside_the_length_prefix_reaches_no_service(
        make_broker: MakeBroker) -> None:
    """Whatever escapes, the connection is closed, no service asked, and its slot freed."""
    broker, node = make_broker(state_with(max_per_uid=1))
    for data in (b"", b"\0\0"):
        writer = FakeWriter(ALICE_PEER)

        async def run(data: bytes = data, writer: FakeWriter = writer) -> None:
            reader = asyncio.StreamReader()
            reader.feed_data(data)
            reader.feed_eof()
            await broker._on_client(reader, cast(asyncio.StreamWriter, writer))

        asyncio.run(run())
        assert writer.closed
        assert writer.data == b""
    assert node.asked() == 0
    # the slot of the uid was given back: a well-formed request is still served
    assert talk(broker, frame(protocol.ping_request())).reply()["result"] == "pong"


def test_a_uid_over_its_connection_limit_is_refused_but_root_is_not(
        make_broker: MakeBroker) -> None:
    broker, node = make_broker(state_with(max_per_uid=0))
    refused = talk(broker, frame(protocol.adopt_request({})), ALICE_PEER)
    assert refused.data == b""
    assert refused.closed
    assert node.asked() == 0
    served = talk(broker, frame(protocol.adopt_request({})), Peer(100, 0, 0))
    assert served.reply() == {"v": "1", "result": "allowed"}
    assert node.adoption.asked == [(Peer(100, 0, 0), {})]


def test_over_the_global_limit_even_root_is_refused(make_broker: MakeBroker) -> None:
    broker, node = make_broker(state_with(max_connections=0))
    writer = talk(broker, frame(protocol.ping_request()), Peer(100, 0, 0))
    assert writer.data == b""
    assert node.asked() == 0


def test_a_request_over_its_deadline_fails_instead_of_hanging(make_broker: MakeBroker) -> None:
    broker, node = make_broker(state_with(decision_deadline=0.1))
    node.adoption.hold = threading.Event()
    try:
        writer = talk(broker, frame(protocol.adopt_request({})))
    finally:
        node.adoption.hold.set()
    assert len(node.adoption.asked) == 1
    assert writer.reply() == {"v": "1", "result": "failed",
                              "message": "sshd-adopt: the broker timed out"}


def test_a_failing_service_closes_that_client_unanswered_and_serving_goes_on(
        make_broker: MakeBroker, caplog: pytest.LogCaptureFixture) -> None:
    """A bug (here an error nobody mapped) is logged with its traceback; the wrapper,
    without an answer, fails closed; the next request is served."""
    broker, node = make_broker()
    node.adoption.error = AccessDenied("not allowed to inspect process 1")
    writer = talk(broker, frame(protocol.adopt_request({})))
    assert writer.closed and not writer.data
    assert "request of pid 4321 uid 2001 failed" in caplog.text
    assert "not allowed to inspect process 1" in caplog.text
    node.adoption.error = None
    assert talk(broker, frame(protocol.adopt_request({}))).reply()["result"] == "allowed"


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory short enough for a unix socket path."""
    path = tempfile.mkdtemp(prefix="sa-brk-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_round_trip_over_a_real_unix_socket(make_broker: MakeBroker, short_dir: str) -> None:
    """The kernel's SO_PEERCRED (this process) reaches adoption; the wrapper's client reads
    the answer."""
    broker, node = make_broker()
    node.adoption.outcome = Adopted(44, "newest", {"SLURM_JOB_ID": "44"})
    path = os.path.join(short_dir, "broker.sock")

    async def run() -> dict[str, str]:
        listening = await asyncio.start_unix_server(broker._on_client, path=path)
        try:
            return await asyncio.to_thread(
                protocol.exchange, path, protocol.adopt_request({"x11": "no"}), timeout=3.0)
        finally:
            listening.close()
            await listening.wait_closed()

    reply = asyncio.run(run())
    assert reply == {"v": "1", "result": "adopted", "job": "44", "env.SLURM_JOB_ID": "44"}
    assert node.adoption.asked == [(Peer(os.getpid(), os.getuid(), os.getgid()), {"x11": "no"})]


def test_every_worker_thread_starts_with_the_broker() -> None:
    """The thread count must not follow the largest burst the broker has met (the soak's
    "flat" threads): all ``broker.workers`` threads exist before the first request."""
    state = broker_state()
    broker = Broker(lambda: state)
    before = {t.ident for t in threading.enumerate()}
    try:
        broker.start_workers(timeout=5)
        started = [t for t in threading.enumerate()
                   if t.ident not in before and t.name.startswith("worker")]
        assert len(started) == state.config.broker.workers
        broker.start_workers(timeout=5)  # once more: the same threads, no new ones
        assert len([t for t in threading.enumerate() if t.ident not in before
                    and t.name.startswith("worker")]) == state.config.broker.workers
    finally:
        broker._pool.shutdown(wait=True)


def test_missing_slurm_facts_are_read_again_until_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """A configless node's slurm.conf appears only once slurmd has fetched it: the broker,
    started before, picks the facts up by itself (no SIGHUP), then stops asking."""
    missing = dataclasses.replace(broker_state(slurm=False),
                                  slurm_problem="no slurm.conf: /run/slurm/conf/slurm.conf")
    found = broker_state()
    answers = [missing, missing, found]
    loads: list[int] = []

    def load() -> BrokerState:
        loads.append(1)
        return answers.pop(0)

    broker = Broker(load)
    reloaded: list[BrokerState] = []
    monkeypatch.setattr(broker.node, "reloaded", reloaded.append)
    assert broker.state.slurm is None
    assert broker.retry_slurm() is False  # still missing: nothing swapped
    assert broker.state is missing and reloaded == []
    assert broker.retry_slurm() is True
    assert broker.state is found and broker.state.nodename == "n1" and reloaded == [missing]
    assert broker.retry_slurm() is True and len(loads) == 3  # found: not read again


def test_node_names_that_did_not_resolve_are_resolved_again_and_swapped_in_when_better(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """DNS not up at boot: the nodes whose names did not resolve count as not Slurm nodes
    (no callerid) until a later try resolves them; a try that resolves nothing more
    changes nothing."""
    facts = broker_state().slurm
    assert facts is not None

    def with_unresolved(*names: str) -> BrokerState:
        return dataclasses.replace(broker_state(),
                                   slurm=dataclasses.replace(facts, unresolved=names))

    start, same, better, complete = (with_unresolved("n2", "n3"), with_unresolved("n3", "n2"),
                                     with_unresolved("n3"), with_unresolved())
    answers = [start, same, better, complete]
    broker = Broker(lambda: answers.pop(0))
    monkeypatch.setattr(broker.node, "reloaded", lambda old: None)
    assert "2 node name(s) unresolved" in broker.status()
    assert broker.retry_slurm() is False and broker.state is start  # nothing more resolved
    with caplog.at_level("INFO", logger="sshd-adopt"):
        assert broker.retry_slurm() is False and broker.state is better
        assert broker.retry_slurm() is True and broker.state is complete
    assert "1 more node name(s) resolved" in caplog.text
    assert "unresolved" not in broker.status()
    assert broker.retry_slurm() is True and answers == []  # complete: not read again
