"""Issue #7: the broker's signals under a running login load.

SIGHUP re-reads the configuration and the Slurm facts without dropping a
login in flight; SIGTERM answers the requests in flight, then exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from tests.harness import Cluster, process_running, remote_cgroup_job, wait_until


@contextlib.contextmanager
def login_load(cluster: Cluster, host: str, workers: int = 4) -> Iterator[list[tuple[int, str]]]:
    """Logins of alice into ``host`` in a loop from ``workers`` threads until the block ends.

    Yields the list of (exit status, stdout) results, filled as logins finish.
    """
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            proc = cluster.ssh("login", host, "cat /proc/self/cgroup", user="alice", timeout=60)
            results.append((proc.returncode, proc.stdout + proc.stderr))

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield results
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)


def test_sighup_reloads_without_dropping_logins(
    cluster: Cluster, broker_policy: Callable[..., None]
) -> None:
    job = cluster.submit("alice", ["n1"])
    log = cluster.broker_log("n1")
    mark = log.mark()
    with login_load(cluster, "n1") as results:
        for _ in range(5):
            time.sleep(0.7)
            os.kill(cluster.broker_pid("n1"), signal.SIGHUP)
        # A real change takes effect while logins keep coming.
        broker_policy("n1", policy={"log_level": "verbose"})
        time.sleep(1.0)
    reloads = log.since(mark).count("configuration and Slurm facts reloaded")
    assert reloads >= 5, log.since(mark)[-2000:]
    assert len(results) >= 10
    failed = [out for status, out in results if status != 0]
    assert not failed, failed[:3]
    for _, out in results:
        found = remote_cgroup_job(out)
        assert found is not None and found.job == job, out


def wrapper_running(user: str) -> bool:
    """Is a ``sshd-adopt`` wrapper of ``user`` running (the lab hosts share one pid space)?"""
    found = subprocess.run(["pgrep", "-u", user, "-f", "bin/sshd-adopt( |$)"],
                           capture_output=True, text=True, check=False)
    return bool(found.stdout.split())


def test_sigterm_answers_the_request_in_flight_then_exits(
    cluster: Cluster, broker_restart: None
) -> None:
    """A login whose callerid RPC hangs (the source drops packets) is in flight at SIGTERM."""
    del broker_restart
    for _ in range(2):
        cluster.submit("alice", ["n2"])
    rule = ["INPUT", "-p", "tcp", "--dport", "6818", "-j", "DROP"]
    log = cluster.broker_log("n2")
    mark = log.mark()
    cluster.exec("n1", "iptables", "-I", *rule)
    try:
        client = cluster.spawn("n1", "ssh", "-o", "LogLevel=INFO", "n2", "true", user="alice")
        # The wrapper's request waits for its callerid RPC's 1 s deadline once it runs.
        wait_until(lambda: wrapper_running("alice"), 20, "alice's wrapper on n2")
        time.sleep(0.2)
        pid = cluster.broker_pid("n2")
        os.kill(pid, signal.SIGTERM)
        client.communicate(timeout=60)
    finally:
        cluster.exec("n1", "iptables", "-D", *rule, check=False)
    # The broker really exits ...
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_running(pid):
        time.sleep(0.1)
    assert not process_running(pid)
    text = log.since(mark)
    assert "finishing 1 request(s) in flight" in text, text[-2000:]
    # ... after the wrapper's request in flight got its answer (early adoption waited on
    # the hung RPC; the wrapper's request waited on early adoption).
    after = text.split("finishing 1 request(s) in flight", 1)[1]
    answer = "INFO: user=alice uid="
    assert answer in after, after
    assert after.index(answer) < after.index("sshd-adoptd stopped"), after

