"""Managed users authenticating by hostbased and GSSAPI, admission enforced after
authentication (#20).

Every node's port-22 sshd gets the drop-in as ``scripts/install --auth-methods
hostbased,gssapi-with-mic`` writes it (the ``auth_methods_lab`` fixture). Hostbased: the
lab's hosts sign with their own keys (``ssh-keysign`` reads /etc/ssh, the host's own in the
lab: scripts/_cluster/configs.py ``write_etc_ssh``); sshd finds them in
/etc/ssh/ssh_known_hosts and the hosts' addresses in /etc/ssh/shosts.equiv. GSSAPI: a real
MIT KDC on ctl (scripts/_cluster/kerberos.py), the users' tickets from ``kinit`` on the
login host, each node's ``host/<node>`` key in the lab's keytab.

No key entry is consulted for such a login: sshd's PAM account phase, which runs before
authentication succeeds, lets only users with a job here through -- on OpenSSH 9.8 and
later (trixie, forky) in managed users' own PAM service ``sshd-adopt`` (pam.d/sshd-adopt),
on 9.2 (bookworm) in the gate block at the top of /etc/pam.d/sshd (the lab's copy). What
a refused user could try is measured here, many times over: forwarding a port (``-N
-L``), running a command, a startup file.
"""

from __future__ import annotations

import re
import time

import pytest

from sshd_adopt._internal.authmethods import GATE_MESSAGE
from tests.harness import Cluster, remote_cgroup_job
from tests.integration.conftest import pam_gate_service
from tests.procwatch import ProcWatch

pytestmark = pytest.mark.cluster

HOSTBASED = ("-o", "HostbasedAuthentication=yes", "-o", "PreferredAuthentications=hostbased")
GSSAPI = ("-o", "GSSAPIAuthentication=yes", "-o", "PreferredAuthentications=gssapi-with-mic")
#: ssh options of each method, and the name sshd logs it by ("Accepted <name> for").
METHODS = {"hostbased": (HOSTBASED, "hostbased"), "gssapi": (GSSAPI, "gssapi-with-mic")}
#: Attempts of each kind a refused user makes (the issue asks for at least 50).
ATTEMPTS = 50
#: The forwarded port's far end on n1 (its loopback), and the client's end on login.
TARGET_PORT, LOCAL_PORT = 15100, 15101

#: On n1: accept connections on the target port, count what arrives, report on SIGTERM.
TARGET = f"""
import signal, socket, sys, threading
total = [0, 0]
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            total[1] += len(data)
def report(*_):
    print(f"CONNECTIONS {{total[0]}} BYTES {{total[1]}}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", {TARGET_PORT}))
srv.listen(64)
print("READY", flush=True)
while True:
    conn, _ = srv.accept()
    total[0] += 1
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: On login, as the refused user: ATTEMPTS times, `ssh -N -L` over hostbased while
#: connecting to the forwarded port and writing to it as fast as possible until ssh ends.
CLIENT = f"""
import socket, subprocess, sys, time
OPTIONS = sys.argv[1:]
accepted = 0
for _ in range({ATTEMPTS}):
    ssh = subprocess.Popen(["ssh", *OPTIONS, "-o", "ExitOnForwardFailure=yes",
                            "-N", "-L", "127.0.0.1:{LOCAL_PORT}:127.0.0.1:{TARGET_PORT}", "n1"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while ssh.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", {LOCAL_PORT}), timeout=1) as conn:
                accepted += 1
                conn.sendall(b"x" * 4096)
        except OSError:
            time.sleep(0.0005)
    if ssh.poll() is None:
        ssh.kill()
        print("STILL-CONNECTED", flush=True)
    ssh.wait()
print(f"ACCEPTED {{accepted}}", flush=True)
"""


def _accepted(cluster: Cluster, method: str, user: str, mark: int, host: str = "n1") -> int:
    log = cluster.sshd_log(host).since(mark)
    return len(re.findall(rf"Accepted {METHODS[method][1]} for {user} from", log))


def _authentication_to_end(watch: ProcWatch, uid: int) -> list[float]:
    """Per connection of ``uid``, milliseconds from the end of authentication (sshd's
    pre-authentication child exits) to the end of the connection (its monitor exits).
    A monitor is known by its key check: it takes the user's effective uid, its real uid
    staying root."""
    monitors = {c.pid for c in watch.uid_changes if c.ruid == 0 and c.euid == uid}
    first_child: dict[int, int] = {}
    for parent, child in watch.forks:
        if parent in monitors:
            first_child.setdefault(parent, child)
    ended = []
    for monitor, preauth in first_child.items():
        authenticated, gone = watch.exits.get(preauth), watch.exits.get(monitor)
        if authenticated is not None and gone is not None and gone >= authenticated:
            ended.append((gone - authenticated) / 1e6)
    return ended


def _in_job(text: str, job: int) -> bool:
    found = remote_cgroup_job(text)
    return found is not None and found.job == job


@pytest.mark.parametrize("method", METHODS)
def test_without_the_profile_only_publickey_lets_managed_users_in(
        cluster: Cluster, kerberos_tickets: None, method: str) -> None:
    """The shipped drop-in: managed users may not use hostbased or GSSAPI at all; an exempt
    admin (carol) may, as the site's sshd allows it. (First in the module: the tests after
    it run with the methods profile, set up for the rest of the module.)"""
    options = METHODS[method][0]
    refused = cluster.ssh("login", "n1", "echo IN", user="bob", extra_opts=options)
    assert refused.returncode == 255 and "Permission denied (publickey)" in refused.stderr
    admin = cluster.ssh("login", "n1", "echo IN", user="carol", extra_opts=options)
    assert admin.stdout.strip() == "IN", admin


@pytest.mark.parametrize("method", METHODS)
def test_a_user_with_a_job_lands_in_it_from_the_login_host_and_from_a_node(
        auth_methods_lab: Cluster, kerberos_tickets: None, method: str) -> None:
    cluster = auth_methods_lab
    options = METHODS[method][0]
    dropin = (cluster.var / "etc" / "n1" / "sshd-adopt.conf").read_text()
    assert "    AuthenticationMethods publickey hostbased gssapi-with-mic\n" in dropin
    job = cluster.submit("alice", ["n1", "n2"])
    mark = cluster.sshd_log("n1").mark()
    out = cluster.ssh("login", "n1", "cat /proc/self/cgroup", user="alice",
                      extra_opts=options)
    assert out.returncode == 0 and _in_job(out.stdout, job), out
    # From inside the job on n2 (callerid names this job) to n1.
    inner = cluster.exec("login", "srun", f"--jobid={job}", "--overlap", "-N1",
                         f"--nodelist={cluster.node('n2')}", "ssh", *options, "n1",
                         "cat /proc/self/cgroup", user="alice", check=False, timeout=60)
    assert inner.returncode == 0 and _in_job(inner.stdout, job), inner
    assert _accepted(cluster, method, "alice", mark) == 2


def test_a_64_way_hostbased_fan_out_from_a_job_lands_every_session_in_it(
        auth_methods_lab: Cluster) -> None:
    """The batch step on n1 opens 64 hostbased sessions to n2 at once, as an MPI launcher
    without keys would: every one is in the job."""
    cluster = auth_methods_lab
    mark = cluster.sshd_log("n2").mark()
    command = (
        "d=$(mktemp -d); for i in $(seq 64); do "
        f"ssh {' '.join(HOSTBASED)} n2 cat /proc/self/cgroup >$d/$i 2>&1 & done; wait; "
        "for f in $d/*; do echo \"== $f\"; cat $f; done; rm -rf $d")
    # 64 clients and their ssh-keysigns need more than the default 100 MB (the job's
    # memory cgroup OOM-kills some of them otherwise).
    result = cluster.run_in_batch("alice", ["n1", "n2"], command, extra_args=["--mem=1500"],
                                  timeout=180)
    sessions = result.output.split("== ")[1:]
    assert len(sessions) == 64, result.output[-2000:]
    outside = [s for s in sessions if not _in_job(s, result.job_id)]
    assert not outside, outside[:3]
    assert _accepted(cluster, "hostbased", "alice", mark, host="n2") == 64


@pytest.mark.parametrize("method", METHODS)
def test_a_user_without_a_job_gets_nothing_through(
        auth_methods_lab: Cluster, kerberos_tickets: None, method: str) -> None:
    """bob, no job, by ``method``, ATTEMPTS times each: a forwarded port carries no byte,
    a command prints nothing of the node, ~/.bashrc never runs: each connection is
    refused by the PAM gate in sshd's account phase, with sshd-adopt's message."""
    cluster = auth_methods_lab
    options = METHODS[method][0]
    uid = cluster.uid("bob")
    marker = cluster.home("bob") / ".lab" / "bashrc-ran"
    cluster.exec("login", "mkdir", "-p", str(marker.parent), user="bob")
    marker.unlink(missing_ok=True)
    bashrc = cluster.home("bob") / ".bashrc"
    original = bashrc.read_bytes() if bashrc.exists() else b""
    mark = cluster.sshd_log("n1").mark()
    target = cluster.spawn("n1", "python3", "-u", "-c", TARGET)
    try:
        assert target.stdout is not None and target.stdout.readline().strip() == "READY"
        bashrc.write_bytes(f'[ -n "$SSH_CONNECTION" ] && echo ran >> {marker}\n'.encode()
                           + original)
        with ProcWatch() as watch:
            forwarding = cluster.exec("login", "python3", "-c", CLIENT, *options,
                                      user="bob", timeout=600)
            printed, refusals = [], []
            for _ in range(ATTEMPTS):
                out = cluster.ssh("login", "n1", "cat /etc/hostname", user="bob",
                                  extra_opts=options)
                printed.append(out.stdout)
                refusals.append(out.stderr)
            for _ in range(ATTEMPTS):
                cluster.ssh("login", "n1", "true", user="bob", extra_opts=options)
            time.sleep(0.5)  # the last exits' events
    finally:
        bashrc.write_bytes(original)
        target.terminate()
        report, _ = target.communicate(timeout=10)
    assert "STILL-CONNECTED" not in forwarding.stdout, forwarding.stdout
    assert report.strip().endswith("BYTES 0"), f"forwarded to n1: {report}"
    assert not any(text.strip() for text in printed), [t for t in printed if t.strip()][:3]
    assert not marker.exists(), "bob's ~/.bashrc ran on n1"
    # Refused in sshd's account phase, every time (never authenticated, no "Permission
    # denied": his key or host was good), and told why; the broker, which sees the gate
    # in bob's PAM service, killed nothing that could cut sshd's log line of it.
    assert not [e for e in refusals if "Permission denied" in e], refusals[:3]
    log = cluster.sshd_log("n1").since(mark)
    refused = log.count("Access denied for user bob by PAM account configuration")
    assert refused == 3 * ATTEMPTS, refused
    assert _accepted(cluster, method, "bob", mark) == 0
    assert all(GATE_MESSAGE in e for e in refusals), \
        [e for e in refusals if GATE_MESSAGE not in e][:3]
    ended_ms = _authentication_to_end(watch, uid)
    print(f"{method} ({pam_gate_service(cluster)} gate): {forwarding.stdout.strip()}; "
          f"{refused} refused in the account phase; the connection ended at most "
          f"{max(ended_ms or [0]):.1f} ms after the pre-authentication child")
