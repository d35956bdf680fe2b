"""The callerid RPC against the lab's real slurmds and munge, in every generation.

Set-up for the interesting case: alice's job on n1 holds a TCP connection to a
listener on n2, so n2 (the "sshd side") can ask n1's slurmd who owns the
client end. Queries run as root inside n2's namespaces (the broker's place)
with the lab venv's interpreter and the installed package, built the way the
broker builds them: destinations, SlurmdUser and AuthInfo from the lab's
slurm.conf, the credential minted as the connecting user.

The lab's slurm.conf sets ``CommunicationParameters=block_zero_hash``: its
slurmds refuse a credential bound to the message type only, so every answer
here is also proof that the broker's K12 binding is libslurm's.

The failure cases reproduce the two delays pam_slurm_adopt suffers (TCPTimeout
2 s for a dropped SYN, MessageTimeout 10 s for a slurmd that accepts and never
answers) and check that the one deadline holds for every method. Firewall rules
and SIGSTOP are undone in ``finally`` blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Cluster, wait_until

pytestmark = pytest.mark.cluster

SLURMD_PORT = 6818  # the lab's slurm.conf
CAPTURE_PORT = 16818
SLACK = 0.2

#: Runs in n2: one query per item of argv[1] (a JSON list), ``repeat`` times each, printing
#: the last answer and every wall time as JSON. A query with "slurmd" sends to that port of
#: its source address instead of the configured slurmds (the capture test).
PROBE = """
import ipaddress, json, pwd, sys, time
from sshd_adopt._internal.slurm import callerid, callerid_wire, munge
from sshd_adopt._internal import run
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.slurm.facts import load_slurm_facts
facts = load_slurm_facts()
out = []
for q in json.loads(sys.argv[1]):
    pw = pwd.getpwnam(q.get("user", "alice"))
    requester = run.Identity(pw.pw_uid, pw.pw_gid)
    options = munge.CredentialOptions(facts.slurmd_user_uid, facts.auth_ttl, facts.auth_socket)
    if q["method"] == "munge":
        walls = []
        for _ in range(q["repeat"]):
            t = time.monotonic()
            munge.encode(b"\\x02" + bytes(32), requester=requester, options=options, timeout=2)
            walls.append(time.monotonic() - t)
        out.append({"walls": walls})
        continue
    slurmds = dict(facts.slurmds)
    if "slurmd" in q:
        slurmds = {ipaddress.ip_address(q["remote"]): q["slurmd"]}
    request = callerid.CallerIdRequest(
        requester=requester, credential=options, slurmds=slurmds,
        protocol_version=q.get("version") or facts.protocol_version,
        deadline=q["deadline"], method=q["method"])
    conn = Connection(ipaddress.ip_address(q["local"]), q["lport"],
                      ipaddress.ip_address(q["remote"]), q["rport"])
    walls = []
    for _ in range(q.get("repeat", 1)):
        t = time.monotonic()
        a = callerid.query_callerid(conn, request)
        walls.append(time.monotonic() - t)
    out.append({"outcome": str(a.outcome), "job": a.job_id, "method": a.method,
                "seconds": a.seconds, "walls": walls,
                "body": callerid_wire.pack_request_body(conn).hex(),
                "version": facts.protocol_version})
print(json.dumps(out))
"""

#: Runs in n2 as root: listen, write the bound port, then one "ip port" line per peer.
LISTENER = """
import socket, sys
host, out = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.bind((host, 0)); srv.listen(16)
with open(out + ".tmp", "w") as f: f.write(str(srv.getsockname()[1]))
import os; os.rename(out + ".tmp", out)
held = []
while True:
    c, peer = srv.accept(); held.append(c)
    with open(out + ".peers", "a") as f: f.write(f"{peer[0]} {peer[1]}\\n")
"""

#: Runs wherever the client end should live: connect, then hold the connection.
CLIENT = (
    "import socket, sys, time; "
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); time.sleep(3600)"
)

#: Runs on n1 as root: accept on ADDRESS:PORT, save every request frame (length prefix
#: included) as OUT.<n>, then close without answering.
CAPTURE = """
import socket, struct, sys
address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket(socket.AF_INET); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((address, port)); srv.listen(4)
open(out + ".ready", "w").close()
n = 0
while True:
    c, _ = srv.accept(); c.settimeout(5)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    n += 1
    with open(f"{out}.{n}", "wb") as f: f.write(data)
    c.close()
"""

#: Runs in n2 as root: send the frame in file argv[1] to argv[2]:6818, print the reply's
#: message type and job id (or "closed").
REPLAY = """
import socket, struct, sys
from sshd_adopt._internal.slurm import callerid_wire
frame = open(sys.argv[1], "rb").read()
with socket.create_connection((sys.argv[2], 6818), timeout=5) as s:
    s.sendall(frame)
    head = s.recv(4)
    if len(head) < 4:
        print("closed"); sys.exit()
    n = struct.unpack(">I", head)[0]; data = b""
    while len(data) < n: data += s.recv(n - len(data))
version, flags, msg_type = struct.unpack(">HHH", data[:6])
if msg_type == callerid_wire.RESPONSE_NETWORK_CALLERID:
    print(msg_type, callerid_wire.parse_response(data).job_id)
else:
    print(msg_type, struct.unpack(">I", data[-4:])[0])
"""


@dataclass(frozen=True)
class Listener:
    """A TCP listener on n2: its address, port, and where it records peers."""

    address: str
    port: int
    peers_file: Path

    def wait_peer(self, source: str, known: frozenset[int] = frozenset()) -> int:
        """Wait for a new connection from ``source``; return its (client) port."""
        found: list[int] = []

        def seen() -> bool:
            if not self.peers_file.exists():
                return False
            for line in self.peers_file.read_text().splitlines():
                ip, port = line.split()
                if ip == source and int(port) not in known:
                    found.append(int(port))
                    return True
            return False

        wait_until(seen, 30, f"a connection from {source} to {self.address}:{self.port}")
        return found[0]


def _start_listener(
    cluster: Cluster, tmp: Path, address: str
) -> tuple[subprocess.Popen[str], Listener]:
    out = tmp / f"listen-{address.replace(':', '_')}"
    proc = cluster.spawn("n2", "python3", "-c", LISTENER, address, str(out))
    wait_until(out.exists, 15, f"listener on n2 {address}")
    return proc, Listener(address, int(out.read_text()), Path(str(out) + ".peers"))


@pytest.fixture
def lab_tmp(cluster: Cluster) -> Iterator[Path]:
    """A new scratch dir every lab host sees at the same path (the lab state dir is bound into
    every generation's namespaces; pytest's /tmp is not inside a chroot generation)."""
    top = cluster.var / "test-tmp"
    top.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="callerid-", dir=top))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def n2_listeners(cluster: Cluster, lab_tmp: Path) -> Iterator[dict[int, Listener]]:
    """Listeners on n2's IPv4 and IPv6 addresses, keyed 4 and 6."""
    procs: list[subprocess.Popen[str]] = []
    try:
        listeners: dict[int, Listener] = {}
        for family, address in ((4, cluster.address("n2")), (6, cluster.address6("n2"))):
            proc, listener = _start_listener(cluster, lab_tmp, address)
            procs.append(proc)
            listeners[family] = listener
        yield listeners
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def job_holding_connection(cluster: Cluster, listener: Listener, source: str) -> tuple[int, int]:
    """Start an alice job on n1 whose batch step connects to ``listener``: (job id, client port)."""
    known = frozenset(_ports(listener, source))
    script = f"#!/bin/bash\nexec python3 -c '{CLIENT}' {listener.address} {listener.port}\n"
    job = cluster.submit("alice", ["n1"], script)
    return job, listener.wait_peer(source, known)


def _ports(listener: Listener, source: str) -> list[int]:
    if not listener.peers_file.exists():
        return []
    return [
        int(port)
        for ip, port in (line.split() for line in listener.peers_file.read_text().splitlines())
        if ip == source
    ]


def query(
    local: str, lport: int, remote: str, rport: int, method: str, *,
    deadline: float = 1.0, repeat: int = 1, version: int = 0, user: str = "alice",
    **extra: Any,
) -> dict[str, Any]:
    return {"local": local, "lport": lport, "remote": remote, "rport": rport,
            "method": method, "deadline": deadline, "repeat": repeat, "version": version,
            "user": user, **extra}


def probe(cluster: Cluster, *queries: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    """Run queries inside n2's namespaces, as root, with the installed package."""
    proc = cluster.exec("n2", str(cluster.venv / "bin" / "python"), "-c", PROBE,
                        json.dumps(list(queries)), timeout=timeout)
    answers: list[dict[str, Any]] = json.loads(proc.stdout)
    return answers


def slurmd_pid(cluster: Cluster, host: str) -> int:
    pid = cluster.daemon_pid(f"slurmd-{host}")
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    assert comm == "slurmd", f"pid {pid} is {comm}, not slurmd"
    return pid


ALL_METHODS = ("native", "scontrol", "auto")


# --- answers ---------------------------------------------------------------------------------


def test_member_by_both_methods(cluster: Cluster, n2_listeners: dict[int, Listener]) -> None:
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    job, port = job_holding_connection(cluster, listener, n1)
    answers = probe(cluster, *(query(n2, listener.port, n1, port, m) for m in ALL_METHODS))
    assert [(a["outcome"], a["job"], a["method"]) for a in answers] == [
        ("member", job, "native"),
        ("member", job, "scontrol"),
        ("member", job, "native"),
    ]


def test_another_users_credential_learns_nothing(
    cluster: Cluster, n2_listeners: dict[int, Listener]
) -> None:
    """The credential names the connecting user: slurmd answers only about that user's jobs."""
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    _job, port = job_holding_connection(cluster, listener, n1)
    log = cluster.slurmd_log("n1")
    mark = log.mark()
    answers = probe(cluster, query(n2, listener.port, n1, port, "native", user="bob"))
    assert (answers[0]["outcome"], answers[0]["job"]) == ("indeterminate", None)
    assert "Security violation, REQUEST_NETWORK_CALLERID from uid=2002" in log.wait_for(
        "Security violation", mark)


def test_connection_outside_any_job_is_indeterminate(
    cluster: Cluster, n2_listeners: dict[int, Listener]
) -> None:
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    known = frozenset(_ports(listener, n1))
    client = cluster.spawn("n1", "python3", "-c", CLIENT, listener.address, str(listener.port))
    try:
        port = listener.wait_peer(n1, known)
        answers = probe(
            cluster,
            *(query(n2, listener.port, n1, port, m) for m in ALL_METHODS),
            query(n2, listener.port, n1, 1, "native"),  # no such connection at all
        )
    finally:
        client.kill()
        client.wait(10)
    assert [(a["outcome"], a["job"]) for a in answers] == [("indeterminate", None)] * 4
    assert [a["method"] for a in answers] == ["native", "scontrol", "native", "native"]


def test_a_source_without_slurmd_is_not_a_node_and_sent_nothing(cluster: Cluster) -> None:
    """The login host is no Slurm node: every method answers at once, nothing is sent."""
    n2, login = cluster.address("n2"), cluster.address("login")
    answers = probe(cluster, *(query(n2, 22, login, 40000, m) for m in ALL_METHODS))
    assert [(a["outcome"], a["method"]) for a in answers] == [("not-a-node", "")] * 3
    assert max(a["walls"][0] for a in answers) < 0.05


# --- the two delays ----------------------------------------------------------------------------


def test_dropped_packets_cost_the_deadline_not_two_seconds(cluster: Cluster) -> None:
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    rule = ["INPUT", "-p", "tcp", "--dport", str(SLURMD_PORT), "-j", "DROP"]
    cluster.exec("n1", "iptables", "-A", *rule)
    try:
        answers = probe(cluster, *(query(n2, 22, n1, 40000, m, deadline=1.0) for m in ALL_METHODS))
    finally:
        cluster.exec("n1", "iptables", "-D", *rule)
    for answer in answers:
        assert answer["outcome"] == "unreachable"
        assert 0.9 <= answer["walls"][0] <= 1.0 + SLACK


def test_stopped_slurmd_costs_the_deadline_not_ten_seconds(cluster: Cluster) -> None:
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    pid = slurmd_pid(cluster, "n1")
    os.kill(pid, signal.SIGSTOP)
    try:
        answers = probe(cluster, *(query(n2, 22, n1, 40000, m, deadline=1.0) for m in ALL_METHODS))
    finally:
        os.kill(pid, signal.SIGCONT)
    for answer in answers:
        assert answer["outcome"] == "unreachable"
        assert 0.9 <= answer["walls"][0] <= 1.0 + SLACK
    # and n1's slurmd is fine again
    after = probe(cluster, query(n2, 22, n1, 40000, "native"))
    assert after[0]["outcome"] == "indeterminate"


# --- IPv6 ------------------------------------------------------------------------------------


def test_an_ipv6_source_is_not_asked_without_enable_ipv6(
    cluster: Cluster, n2_listeners: dict[int, Listener]
) -> None:
    """The lab's slurmds listen on IPv4 only (no EnableIPv6): ``[v6]:6818`` is anybody's.

    pam_slurm_adopt sends its credential there; the broker sends nothing and decides at once.
    """
    listener = n2_listeners[6]
    n1_v6, n2_v6 = cluster.address6("n1"), cluster.address6("n2")
    _job, port = job_holding_connection(cluster, listener, n1_v6)
    answers = probe(cluster, *(query(n2_v6, listener.port, n1_v6, port, m) for m in ALL_METHODS))
    assert [(a["outcome"], a["method"]) for a in answers] == [("not-a-node", "")] * 3
    assert max(a["walls"][0] for a in answers) < 0.05


# --- the credential that leaves the node -----------------------------------------------------


def _auth_and_body(frame: bytes) -> tuple[int, bytes, bytes]:
    """(message type, munge credential, body) of a length-prefixed request frame."""
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    _version, _flags, msg_type, body_length = struct.unpack(">HHHI", frame[4:14])
    plugin, cred_length = struct.unpack(">II", frame[20:28])
    assert plugin == 101  # auth/munge
    credential = frame[28:28 + cred_length].rstrip(b"\0")
    body = frame[28 + cred_length:]
    assert len(body) == body_length
    return msg_type, credential, body


def test_the_credential_is_the_users_bound_to_the_body_and_only_slurmd_can_read_it(
    cluster: Cluster, n2_listeners: dict[int, Listener], lab_tmp: Path
) -> None:
    """Capture what the broker's code sends for a connection from a real Slurm node (n1),
    by pointing that one query at a capture port on n1, then check the credential:
    an unprivileged user cannot decode it; it names alice, not root; its payload is the
    K12 hash of the body; and the real slurmd (with block_zero_hash) accepts the request."""
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    job, port = job_holding_connection(cluster, listener, n1)
    out = lab_tmp / "frame"
    capture = cluster.spawn("n1", "python3", "-c", CAPTURE, n1, str(CAPTURE_PORT), str(out))
    try:
        wait_until(Path(f"{out}.ready").exists, 15, "the capture listener on n1")
        probe(cluster, *[query(n2, listener.port, n1, port, "native", slurmd=CAPTURE_PORT,
                               deadline=2.0)] * 2)
        wait_until(lambda: Path(f"{out}.2").exists(), 15, "two captured requests")
    finally:
        capture.kill()
        capture.wait(10)
    frames = [Path(f"{out}.{n}").read_bytes() for n in (1, 2)]
    msg_type, credential, body = _auth_and_body(frames[0])
    assert msg_type == 5035
    expected_body = bytes.fromhex(probe(cluster, query(n2, listener.port, n1, port, "native",
                                                       slurmd=1))[0]["body"])
    assert body == expected_body

    # bob, on n1, cannot decode it: it is restricted to SlurmdUser (root).
    as_bob = cluster.exec("n1", "unmunge", user="bob", input=credential.decode(), check=False)
    assert as_bob.returncode != 0
    assert "Unauthorized credential" in as_bob.stderr, as_bob.stderr

    # root can (slurmd's identity): the credential is alice's, and its payload is the K12
    # binding of exactly this body.
    as_root = cluster.exec("n1", "sh", "-c", "unmunge -m /dev/stderr | od -An -tx1 -v",
                           input=credential.decode())
    assert "UID:             alice (2001)" in as_root.stderr, as_root.stderr
    assert "GID:             alice (2001)" in as_root.stderr, as_root.stderr
    payload = bytes.fromhex("".join(as_root.stdout.split()))
    digest = cluster.exec("n2", str(cluster.venv / "bin" / "python"), "-c",
                          "import sys\n"
                          "from sshd_adopt._internal.slurm.callerid_wire import hash_payload\n"
                          "print(hash_payload(bytes.fromhex(sys.argv[1])).hex())",
                          body.hex()).stdout.strip()
    assert payload.hex() == digest
    assert payload[0] == 2 and len(payload) == 33  # HASH_PLUGIN_K12 + 32 bytes

    # The second capture, replayed to n1's real slurmd, is accepted and answers alice's job.
    replayed = cluster.exec("n2", str(cluster.venv / "bin" / "python"), "-c", REPLAY,
                            str(Path(f"{out}.2")), n1).stdout.split()
    assert replayed == ["5036", str(job)]


def test_the_lab_slurmds_refuse_a_credential_bound_to_the_type_only(
    cluster: Cluster, lab_tmp: Path
) -> None:
    """The control for the test above: with block_zero_hash, the 3-byte payload the broker
    used to send is refused, so an accepted request proves the K12 binding."""
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    body = probe(cluster, query(n2, 22, n1, 40000, "native", slurmd=1))[0]["body"]
    version = probe(cluster, query(n2, 22, n1, 40000, "native", slurmd=1))[0]["version"]
    frame = lab_tmp / "zero-hash-frame"
    script = (
        "import sys\n"
        "from sshd_adopt._internal import run\n"
        "from sshd_adopt._internal.slurm import callerid_wire, munge\n"
        "cred = munge.encode(b'\\x01\\x13\\xab', requester=run.Identity(2001, 2001),"
        " options=munge.CredentialOptions(0), timeout=5)\n"
        "open(sys.argv[1], 'wb').write(callerid_wire.pack_request(\n"
        "    bytes.fromhex(sys.argv[2]), cred, int(sys.argv[3])))\n")
    cluster.exec("n2", str(cluster.venv / "bin" / "python"), "-c", script, str(frame), body,
                 str(version))
    replayed = cluster.exec("n2", str(cluster.venv / "bin" / "python"), "-c", REPLAY,
                            str(frame), n1).stdout.split()
    # 22.05/24.11 answer RESPONSE_SLURM_RC with an error; 26.05 closes without a word.
    assert replayed[0] != "5036", replayed


# --- latency ---------------------------------------------------------------------------------


def test_latency_native_vs_scontrol(
    cluster: Cluster, n2_listeners: dict[int, Listener], record_property: Any
) -> None:
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    job, port = job_holding_connection(cluster, listener, n1)
    runs = 20
    answers = probe(
        cluster,
        query(n2, listener.port, n1, port, "native", repeat=runs),
        query(n2, listener.port, n1, port, "scontrol", repeat=runs),
        {"method": "munge", "repeat": runs},
    )
    medians = {
        name: statistics.median(a["walls"]) * 1000
        for name, a in zip(("native", "scontrol", "munge"), answers, strict=True)
    }
    for name, ms in medians.items():
        record_property(f"median_ms_{name}", round(ms, 2))
    print(f"callerid medians over {runs} runs (ms): "
          + ", ".join(f"{k}={v:.1f}" for k, v in medians.items()))
    assert answers[0]["job"] == job and answers[1]["job"] == job
    assert medians["native"] < 50
    assert medians["native"] < medians["scontrol"]


def test_newer_protocol_version_falls_back_to_scontrol(
    cluster: Cluster, n2_listeners: dict[int, Listener]
) -> None:
    """A slurmd closes silently on a version newer than its own (the broker sends the newest
    it knows when the installed Slurm's version is unknown): auto then asks scontrol, at
    once, without retries."""
    listener = n2_listeners[4]
    n1, n2 = cluster.address("n1"), cluster.address("n2")
    job, port = job_holding_connection(cluster, listener, n1)
    newer = probe(cluster, query(n2, 22, n1, 40000, "native", slurmd=1))[0]["version"] + 0x300
    answers = probe(
        cluster,
        query(n2, listener.port, n1, port, "auto", version=newer),
        query(n2, listener.port, n1, port, "native", version=newer),
    )
    assert (answers[0]["outcome"], answers[0]["job"], answers[0]["method"]) == (
        "member", job, "scontrol",
    )
    assert answers[0]["walls"][0] < 0.5
    assert (answers[1]["outcome"], answers[1]["method"]) == ("unreachable", "native")
