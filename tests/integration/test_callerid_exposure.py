"""Nothing of the callerid RPC reaches a port that an ordinary user can hold.

The RPC carries a MUNGE credential to ``<ssh client's address>:SlurmdPort``. On a host
without slurmd (a login host), or on any host's IPv6 address when slurmd listens on IPv4
only, any user can listen there. These tests put such a listener in place, as bob, and
drive real logins at a node where the user has several jobs (so a source job would be
asked): before authentication (bob offering alice's name) and after it (alice herself).
The listener must receive nothing, and the login must be decided at once as "source
unknown" (the broker logs "source is not a Slurm node").
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, remote_cgroup_job, wait_until

pytestmark = pytest.mark.cluster

#: Runs as an ordinary user: listen on ADDRESS:PORT (IPv6 sockets; "::" dual-stack),
#: append "peer bytes" to OUT for every connection, never answer.
LISTEN = """
import socket, sys
address, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in address else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if address == "::":
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((address, port)); s.listen(16)
open(out + ".ready", "w").close()
while True:
    c, peer = s.accept(); c.settimeout(2)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    with open(out, "a") as f:
        f.write(f"{peer[0]} {len(data)}\\n")
    c.close()
"""


@pytest.fixture
def listen_as_bob(cluster: Cluster) -> Iterator[Callable[[str, str], Path]]:
    """Start bob's listener on HOST at ADDRESS:6818; returns the file it records into."""
    procs: list[subprocess.Popen[str]] = []
    outdir = cluster.home("bob") / ".lab"
    cluster.exec("login", "mkdir", "-p", str(outdir), user="bob")

    def start(host: str, address: str) -> Path:
        out = outdir / f"listener-{host}-{address.replace(':', '_')}-{time.monotonic_ns()}"
        procs.append(cluster.spawn(host, "python3", "-c", LISTEN, address, "6818", str(out),
                                   user="bob"))
        wait_until(Path(f"{out}.ready").exists, 15, f"bob's listener on {host} {address}")
        return out

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def received(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def test_a_login_host_listener_gets_nothing_before_or_after_authentication(
    cluster: Cluster, listen_as_bob: Callable[[str, str], Path]
) -> None:
    first = cluster.submit("alice", ["n1"])
    second = cluster.submit("alice", ["n1"])
    out = listen_as_bob("login", "::")  # IPv4 and IPv6 on the login host
    log = cluster.broker_log("n1")
    mark = log.mark()

    # Before authentication: bob offers alice's name with his own key.
    for target in ("n1", "n1-v6"):
        refused = cluster.ssh("login", target, "true", user="bob", extra_opts=["-l", "alice"])
        assert refused.returncode == 255
        assert "Permission denied" in refused.stderr

    # After authentication: alice herself, over IPv4 and IPv6.
    for target in ("n1", "n1-v6"):
        started = time.monotonic()
        login = cluster.ssh("login", target, "cat /proc/self/cgroup", user="alice")
        elapsed = time.monotonic() - started
        assert login.returncode == 0, login.stderr
        landed = remote_cgroup_job(login.stdout)
        assert landed is not None and landed.job == second  # action_unknown=newest
        assert elapsed < 5  # no callerid deadline to wait out (the login itself is slower)
    lines = log.wait_for("source is not a Slurm node", mark)
    decisions = [line for line in lines.splitlines()
                 if "user=alice" in line and "callerid=" in line]
    assert len(decisions) >= 2, lines
    assert all("source is not a Slurm node" in line for line in decisions), decisions
    # nothing was sent, so nothing was waited for (the callerid phase's own time, in ms)
    spent = [re.search(r"callerid=[^=]*? in (\d+)ms", line) for line in decisions]
    assert all(found is not None and int(found[1]) < 100 for found in spent), decisions

    time.sleep(1.5)  # anything in flight would have arrived by now
    assert received(out) == []
    assert first != second


def test_a_compute_nodes_ipv6_slurmd_port_gets_nothing(
    cluster: Cluster, listen_as_bob: Callable[[str, str], Path]
) -> None:
    """slurmd listens on IPv4 only (no EnableIPv6), so bob can hold n1's [v6]:6818."""
    cluster.submit("alice", ["n2"])
    newest = cluster.submit("alice", ["n2"])
    out = listen_as_bob("n1", cluster.address6("n1"))
    log = cluster.broker_log("n2")
    mark = log.mark()
    login = cluster.ssh("n1", "n2-v6", "cat /proc/self/cgroup", user="alice")
    assert login.returncode == 0, login.stderr
    landed = remote_cgroup_job(login.stdout)
    assert landed is not None and landed.job == newest
    assert "source is not a Slurm node" in log.wait_for("outcome=", mark)
    time.sleep(1.5)
    assert received(out) == []
