"""X11 jobs end to end: a real X server on the login host, Slurm's X11 tunnel, both front ends.

alice's desktop is an Xvfb on the login host whose root window carries a token
(``Cluster.x_server``); her job is ``salloc --x11`` from there, so every node of the job
runs Slurm's X11 forwarding in its extern step (``PrologFlags=X11``, ``X11Parameters=
home_xauthority``). An ssh session adopted into that job must get the job's ``DISPLAY``
and ``XAUTHORITY`` and reach alice's X server through the tunnel: ``xprop`` run in the
session prints the token of that very server. pam_slurm_adopt on port 2222 is compared
where it matters.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import Cluster, XDisplay

PROBE = ('echo "DISPLAY=${DISPLAY-} XAUTHORITY=${XAUTHORITY-} JOB=${SLURM_JOB_ID-}"; '
         "xprop -root _SSHD_ADOPT_LAB 2>&1")


@pytest.fixture
def x(cluster: Cluster) -> Iterator[XDisplay]:
    with cluster.x_server("alice") as server:
        yield server


def _env(output: str) -> dict[str, str]:
    line = next(line for line in output.splitlines() if line.startswith("DISPLAY="))
    return dict(item.split("=", 1) for item in line.split())


def _reached(output: str, x: XDisplay) -> bool:
    return re.search(rf'_SSHD_ADOPT_LAB\(STRING\) = "{x.token}"', output) is not None


def _probe(cluster: Cluster, src: str, dst: str, port: int) -> subprocess.CompletedProcess[str]:
    return cluster.ssh(src, dst, PROBE, user="alice", port=port, timeout=40)


def test_a_session_in_an_x11_job_reaches_the_users_x_server(cluster: Cluster,
                                                            x: XDisplay) -> None:
    job, salloc = cluster.x11_allocation("alice", x, ["n1"])
    try:
        seen = {}
        for port in (2222, 22):
            result = _probe(cluster, "login", "n1", port)
            assert result.returncode == 0, result.stderr
            seen[port] = _env(result.stdout)
            assert seen[port]["JOB"] == str(job)
            assert _reached(result.stdout, x), (port, result.stdout)
        assert re.fullmatch(r"localhost:\d+\.0", seen[22]["DISPLAY"]), seen
        assert seen[22]["DISPLAY"] == seen[2222]["DISPLAY"]
        assert seen[22]["XAUTHORITY"] == str(cluster.home("alice") / ".Xauthority")
        assert seen[22]["XAUTHORITY"] == seen[2222]["XAUTHORITY"]
    finally:
        cluster.cancel(job)
        salloc.kill()


def test_the_callerid_and_newest_paths_set_the_x11_job_and_reach_its_server(
        cluster: Cluster, x: XDisplay) -> None:
    """alice holds a plain job on n2 and a newer X11 job on n1+n2: from inside the X11 job
    (callerid names it) and from the login host (the newest), the session is in the X11
    job with its display; a plain job started after it takes over "newest", and its
    sessions get no display at all."""
    cluster.submit("alice", ["n2"])  # so that n2 needs callerid or "newest" to choose
    job, salloc = cluster.x11_allocation("alice", x, ["n1", "n2"])
    try:
        inside = cluster.exec("login", "srun", f"--jobid={job}", "--overlap", "-N1",
                              f"--nodelist={cluster.node('n1')}", "ssh", "n2", PROBE,
                              user="alice", timeout=60)
        newest = _probe(cluster, "login", "n2", 22)
        for result in (inside, newest):
            env = _env(result.stdout)
            assert env["JOB"] == str(job), result.stdout
            assert re.fullmatch(r"localhost:\d+\.0", env["DISPLAY"]), result.stdout
            assert env["XAUTHORITY"] == str(cluster.home("alice") / ".Xauthority")
            assert _reached(result.stdout, x), result.stdout
        newer = cluster.submit("alice", ["n2"])
        other = _probe(cluster, "login", "n2", 22)
        assert _env(other.stdout) == {"DISPLAY": "", "XAUTHORITY": "", "JOB": str(newer)}, (
            other.stdout)
        assert not _reached(other.stdout, x)
    finally:
        cluster.cancel(job)
        salloc.kill()
