"""Issue #6: the same scenarios against the real pam_slurm_adopt (port 2222) and sshd-adopt
(port 22) on the same node in the same state, compared field by field.

The matrix, the expected verdicts and the report live in ``tests/conformance`` (pure code);
this file only drives the lab. Scenarios that can share cluster state share a test (a job
started once serves several rows), because every test ends with all jobs cancelled and job
starts dominate the run time. Each test records its rows first and checks them against the
matrix at the end, so one deviating row does not hide the others from the report.

``SSHD_ADOPT_CONFORMANCE_RESULTS=PATH`` writes the observed rows as JSON (``scripts/conformance``
sets it and renders ``docs/conformance.md`` from it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conformance.matrix import BY_KEY
from tests.conformance.model import PROBE, Observation, Row, parse_probe
from tests.conformance.report import save
from tests.harness import Cluster, HarnessError, wait_until

PAM = 2222
ADOPT = 22
PORTS = (PAM, ADOPT)
ROWS: dict[str, Row] = {}
#: The lab's Slurm release line ("slurm-26.05"), named as the results files are.
RELEASE: list[str] = ["?"]
STARTED = time.monotonic()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _results(cluster: Cluster) -> Iterator[None]:
    """Write the rows of this run as JSON when asked to (see the module docstring)."""
    found = re.search(r"(\d+\.\d+)", cluster.exec("n1", "slurmd", "-V").stdout)
    RELEASE[0] = f"slurm-{found[1]}" if found else "?"
    ROWS.clear()
    yield
    target = os.environ.get("SSHD_ADOPT_CONFORMANCE_RESULTS")
    if not target:
        return
    # The versions of the lab that ran (a chroot generation has its own Slurm and OpenSSH).
    slurm = cluster.exec("n1", "slurmd", "-V").stdout.strip()
    ssh = cluster.exec("n1", "ssh", "-V").stderr.strip()
    meta = {"slurm": slurm, "openssh": ssh.split(",")[0],
            "date": datetime.date.today().isoformat(),
            "duration": f"{time.monotonic() - STARTED:.0f} s"}
    save(Path(target), meta, ROWS)


@pytest.fixture
def pam_options(cluster: Cluster) -> Iterator[Callable[..., None]]:
    """Set options on a node's ``pam_slurm_adopt.so`` line; the file is restored afterwards.

    PAM reads the service file at every login, so no daemon needs a reload.
    """
    saved: dict[Path, str] = {}

    def apply(node: str, **options: str | None) -> None:
        path = cluster.var / "etc" / "pam.d" / f"sshd-psa-{cluster.node(node)}"
        original = saved.setdefault(path, path.read_text())
        lines = []
        for line in original.splitlines():
            if "pam_slurm_adopt.so" in line and not line.lstrip().startswith("#"):
                words = [w for w in line.split() if w.split("=", 1)[0] not in options]
                line = " ".join([*words, *(f"{k}={v}" for k, v in options.items()
                                           if v is not None)])  # None: drop the option
            lines.append(line)
        path.write_text("\n".join(lines) + "\n")

    yield apply
    for path, text in saved.items():
        path.write_text(text)


@pytest.fixture
def dave(cluster: Cluster) -> Iterator[str]:
    """A local user with a key who has never used Slurm; removed again afterwards.

    A chroot generation has its own /etc/passwd: dave is created there too, with the
    same uid (homes are shared through the lab's /home bind).
    """
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", "-U", "-p", "*", "dave"], check=True)
    root = cluster.gen.root
    if root is not None:
        uid = str(Cluster.uid("dave"))
        subprocess.run(["chroot", str(root), "groupadd", "-g", uid, "dave"], check=False)
        subprocess.run(["chroot", str(root), "useradd", "-M", "-d", "/home/dave", "-s",
                        "/bin/bash", "-u", uid, "-g", uid, "-p", "*", "dave"], check=True)
    try:
        home = Path("/home/dave")
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(ssh_dir / "id_ed25519")], check=True)
        (ssh_dir / "authorized_keys").write_text((ssh_dir / "id_ed25519.pub").read_text())
        (ssh_dir / "config").write_text("Host *\n    BatchMode yes\n")
        subprocess.run(["chown", "-R", "dave:dave", str(home)], check=True)
        yield "dave"
    finally:
        if root is not None:
            subprocess.run(["chroot", str(root), "userdel", "dave"], capture_output=True,
                           check=False)
            subprocess.run(["chroot", str(root), "groupdel", "dave"], capture_output=True,
                           check=False)
        subprocess.run(["userdel", "-r", "dave"], capture_output=True, check=False)


# ---------------------------------------------------------------------------- observing


def login(cluster: Cluster, src: str, dst: str, user: str, port: int,
          labels: dict[int, str], extra_opts: tuple[str, ...] = ()) -> Observation:
    """One ssh login running PROBE; the whole ssh invocation is timed."""
    started = time.monotonic()
    try:
        result = cluster.ssh(src, dst, PROBE, user=user, port=port, timeout=40,
                             extra_opts=extra_opts)
    except subprocess.TimeoutExpired:
        return Observation("refused", -1, "(client killed after 40 s)", "none", "unset",
                           "unset", "-", "-", 40.0)
    return parse_probe(result.returncode, result.stdout, result.stderr, labels,
                       time.monotonic() - started, job_of_sluid=cluster.job_of_sluid)


def both(cluster: Cluster, key: str, src: str, dst: str, user: str,
         labels: dict[int, str], extra_opts: tuple[str, ...] = ()) -> Row:
    """Run one scenario against both front ends and record the row."""
    row = Row.compare(key, login(cluster, src, dst, user, PAM, labels, extra_opts),
                      login(cluster, src, dst, user, ADOPT, labels, extra_opts))
    ROWS[key] = row
    return row


def login_from_step(cluster: Cluster, job: int, src: str, dst: str, user: str, port: int,
                    labels: dict[int, str]) -> Observation:
    """One ssh login running PROBE from inside ``job`` on ``src`` (an ``srun --overlap``
    step started from the login host), so that callerid names ``job``. A login that hangs
    is ended after 20 s (exit 124)."""
    started = time.monotonic()
    result = cluster.exec("login", "srun", f"--jobid={job}", "--overlap", "-N1",
                          f"--nodelist={cluster.node(src)}", "timeout", "20", "ssh", "-o",
                          "LogLevel=INFO", "-p", str(port), dst, PROBE, user=user, check=False,
                          timeout=60)
    return parse_probe(result.returncode, result.stdout, result.stderr, labels,
                       time.monotonic() - started, job_of_sluid=cluster.job_of_sluid)


def _remote_sleep(user: str, marker: str) -> int | None:
    """The remote ``sleep MARKER`` of a session (not the ssh client that names it)."""
    out = subprocess.run(["pgrep", "-u", user, "-x", "-f", f"sleep {marker}"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def sessions_vs_job(cluster: Cluster, key: str, src: str, dst: str, user: str,
                    labels: dict[int, str], end_job: Callable[[], None],
                    settle: int = 0) -> Row:
    """Hold a session open through each front end, end the job, see whether they die.

    The sessions run PROBE (after ``settle`` seconds, if given) and then
    ``exec sleep <marker>``; "dies" means the remote sleep is gone within 20 s of the
    job's end.
    """
    markers = {PAM: "31222", ADOPT: "31022"}
    clients: dict[int, subprocess.Popen[str]] = {}
    started = {}
    for port in PORTS:
        started[port] = time.monotonic()
        clients[port] = cluster.spawn(src, "ssh", "-o", "LogLevel=INFO", "-p", str(port), dst,
                                      f"{f'sleep {settle}; ' if settle else ''}{PROBE}; "
                                      f"exec sleep {markers[port]}", user=user)
    try:
        wait_until(lambda: all(_remote_sleep(user, m) for m in markers.values()), 20 + settle,
                   "both sessions to run")
        end_job()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_remote_sleep(user, m)
                                                  for m in markers.values()):
            time.sleep(0.2)
        dies = {port: "no" if _remote_sleep(user, m) else "yes" for port, m in markers.items()}
        observed = {}
        for port, client in clients.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                client.wait(timeout=5)
            if client.poll() is None:
                client.kill()
            stdout, stderr = client.communicate()
            observed[port] = parse_probe(client.returncode, stdout, stderr, labels,
                                         time.monotonic() - started[port], dies[port],
                                         job_of_sluid=cluster.job_of_sluid)
    finally:
        for client in clients.values():
            if client.poll() is None:
                client.kill()
        for marker in markers.values():
            subprocess.run(["pkill", "-u", user, "-x", "-f", f"sleep {marker}"], check=False)
    row = Row.compare(key, observed[PAM], observed[ADOPT])
    ROWS[key] = row
    return row


def verify(*keys: str) -> None:
    """Fail with every row of ``keys`` whose computed verdict deviates from the matrix."""
    problems = [p for key in keys
                for p in BY_KEY[key].for_release(RELEASE[0]).check(ROWS[key])]
    assert not problems, "\n".join(problems) + "\n" + "\n".join(
        f"{k}: pam={ROWS[k].pam}\n{k}: adopt={ROWS[k].adopt}" for k in keys)


# ---------------------------------------------------------------------------- scenarios


def test_users_without_a_job(cluster: Cluster, broker_policy: Callable[..., None],
                             pam_options: Callable[..., None], dave: str) -> None:
    job = cluster.submit("alice", ["n1"])
    labels = {job: "A (alice's)"}
    both(cluster, "root", "login", "n1", "root", labels)
    both(cluster, "no_jobs_deny", "login", "n1", "bob", labels)
    both(cluster, "dave_unmanaged", "login", "n1", dave, labels)
    subprocess.run(["gpasswd", "-a", dave, "slurmusers"], capture_output=True, check=True)
    if cluster.gen.root is not None:  # the generation's own /etc/group
        subprocess.run(["chroot", str(cluster.gen.root), "gpasswd", "-a", dave, "slurmusers"],
                       capture_output=True, check=True)
    both(cluster, "dave_managed", "login", "n1", dave, labels)
    pam_options("n1", action_no_jobs="ignore")
    broker_policy("n1", policy={"action_no_jobs": "ignore"})
    both(cluster, "no_jobs_ignore", "login", "n1", "bob", labels)
    broker_policy("n1", policy={"action_no_jobs": "ignore", "fallthrough": "allow"})
    both(cluster, "no_jobs_ignore_fallthrough_allow", "login", "n1", "bob", labels)
    verify("root", "no_jobs_deny", "dave_unmanaged", "dave_managed", "no_jobs_ignore",
           "no_jobs_ignore_fallthrough_allow")


@contextlib.contextmanager
def refusing_extern_step(cluster: Cluster, job: int, node: str = "n1") -> Iterator[None]:
    """Make slurmstepd's ADD_EXTERN_PID fail for real, for both front ends.

    cgroup v1: task/cgroup adds an adopted pid to the step_extern cpuset too; the kernel
    refuses to move a task into a cgroup v1 cpuset without memory nodes (ENOSPC), so the
    stepd answers -1. The cpuset may only be emptied while it holds no task, so the stepd
    and its sleeper wait in the job's cpuset meanwhile; everything is put back afterwards.

    cgroup v2 (no controllers in the lab): the stepd makes ``step_extern/user/task_special``
    at the job's first adoption; with ``cgroup.max.descendants`` 0 on ``user`` the kernel
    refuses that mkdir (EAGAIN), so the move fails. Only before anything was adopted into
    the job; the limit is lifted afterwards, and the next adoption makes the cgroup.
    """
    if cluster.gen.cgroup == "v2":
        user = cluster.job_cgroup_dir(node, Cluster.uid("alice"), job) / "user"
        if (user / "task_special").exists():
            raise HarnessError(f"{user}/task_special exists: a v2 adoption failure can only "
                               "be made before the job's first adoption")
        (user / "cgroup.max.descendants").write_text("0\n")
        try:
            yield
        finally:
            (user / "cgroup.max.descendants").write_text("max\n")
        return
    step = cluster.job_cgroup_dir(node, Cluster.uid("alice"), job, controller="cpuset")
    mems = (step / "cpuset.mems").read_text().strip()
    pids: list[str] = []
    try:
        # Sessions of earlier logins may still be leaving the step: move until it is empty.
        for _ in range(50):
            moving = (step / "cgroup.procs").read_text().split()
            for pid in moving:
                with contextlib.suppress(OSError):
                    (step.parent / "cgroup.procs").write_text(pid)
            pids += moving
            try:
                (step / "cpuset.mems").write_text("\n")
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise HarnessError(f"could not empty {step}")
        yield
    finally:
        (step / "cpuset.mems").write_text(mems)
        for pid in pids:
            with contextlib.suppress(OSError):
                (step / "cgroup.procs").write_text(pid)


def _hung_stepd_row(cluster: Cluster, job: int, labels: dict[int, str]) -> None:
    """Both logins start while the extern stepd is stopped; it resumes after 6 s."""
    stepd = cluster.extern_stepd_pid("n1", job)
    clients: dict[int, subprocess.Popen[str]] = {}
    ends: dict[int, float] = {}
    os.kill(stepd, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for port in PORTS:
            clients[port] = cluster.spawn("login", "ssh", "-o", "LogLevel=INFO", "-p",
                                          str(port), "n1", PROBE, user="alice")
        while time.monotonic() - started < 6:
            for port, client in clients.items():
                if port not in ends and client.poll() is not None:
                    ends[port] = time.monotonic() - started
            time.sleep(0.05)
    finally:
        os.kill(stepd, signal.SIGCONT)
    observed = {}
    for port, client in clients.items():
        try:
            stdout, stderr = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            stdout, stderr = client.communicate()
        observed[port] = parse_probe(client.returncode, stdout, stderr, labels,
                                     ends.get(port, time.monotonic() - started),
                                     job_of_sluid=cluster.job_of_sluid)
    ROWS["stepd_hung"] = Row.compare("stepd_hung", observed[PAM], observed[ADOPT])


def test_one_job(cluster: Cluster, broker_policy: Callable[..., None],
                 pam_options: Callable[..., None]) -> None:
    job = cluster.submit("alice", ["n1"])
    labels = {job: "A"}
    pam_options("n1", disable_x11="1")
    broker_policy("n1", policy={"disable_x11": True})
    # First: on cgroup v2 the stepd can only be made to fail before its first adoption.
    with refusing_extern_step(cluster, job):
        both(cluster, "adopt_failure_deny", "login", "n1", "alice", labels)
        pam_options("n1", disable_x11="1", action_adopt_failure="allow")
        broker_policy("n1", policy={"disable_x11": True, "action_adopt_failure": "allow"})
        both(cluster, "adopt_failure_allow", "login", "n1", "alice", labels)
    _hung_stepd_row(cluster, job, labels)  # still action_adopt_failure=allow on both sides
    pam_options("n1", disable_x11="1", action_adopt_failure=None)
    broker_policy("n1", policy={"disable_x11": True})
    sessions_vs_job(cluster, "one_job", "login", "n1", "alice", labels,
                    lambda: cluster.cancel(job))
    ending = cluster.submit("alice", ["n1"], "sleep 4")
    sessions_vs_job(cluster, "job_ending", "login", "n1", "alice", {ending: "A"},
                    lambda: cluster.wait_gone(ending, timeout=30))
    verify("adopt_failure_deny", "adopt_failure_allow", "stepd_hung", "one_job", "job_ending")


def test_x11_jobs(cluster: Cluster, broker_policy: Callable[..., None],
                  pam_options: Callable[..., None]) -> None:
    """A real X11 job: alice's Xvfb on the login host, ``salloc --x11`` on n1+n2."""
    plain = cluster.submit("alice", ["n2"])  # older than the X11 job
    time.sleep(1.1)
    with cluster.x_server("alice") as x:
        job, salloc = cluster.x11_allocation("alice", x, ["n1", "n2"])
        try:
            labels = {job: "X (x11)", plain: "P (plain)"}
            both(cluster, "x11_one_job", "login", "n1", "alice", labels)
            # n2: alice holds the plain job too; from inside the X11 job, callerid names it
            ROWS["x11_callerid"] = Row.compare(
                "x11_callerid",
                login_from_step(cluster, job, "n1", "n2", "alice", PAM, labels),
                login_from_step(cluster, job, "n1", "n2", "alice", ADOPT, labels))
            # from the login host: no callerid, the newest job (the X11 one)
            both(cluster, "x11_newest", "login", "n2", "alice", labels)
            pam_options("n1", disable_x11="1")
            broker_policy("n1", policy={"disable_x11": True})
            both(cluster, "disable_x11", "login", "n1", "alice", labels)
            time.sleep(1.1)
            newer = cluster.submit("alice", ["n2"])
            labels[newer] = "N (newest, plain)"
            both(cluster, "x11_other_job", "login", "n2", "alice", labels)
        finally:
            cluster.cancel(job)
            salloc.kill()
            salloc.wait(timeout=10)
    verify("x11_one_job", "x11_callerid", "x11_newest", "disable_x11", "x11_other_job")


def _three_jobs(cluster: Cluster, node: str) -> list[int]:
    """Jobs of alice on ``node`` in start order, 1.1 s apart so "newest" is unambiguous."""
    jobs: list[int] = []
    for _ in range(3):
        jobs.append(cluster.submit("alice", [node]))
        time.sleep(1.1)
    return jobs


def test_several_jobs(cluster: Cluster, broker_policy: Callable[..., None],
                      pam_options: Callable[..., None]) -> None:
    jobs = _three_jobs(cluster, "n2")
    labels = {job: f"J{i + 1}" for i, job in enumerate(jobs)}
    labels[jobs[-1]] += " (newest)"
    both(cluster, "several_compute", "n1", "n2", "alice", labels)
    both(cluster, "several_login", "login", "n2", "alice", labels)
    pam_options("n2", action_unknown="allow")
    broker_policy("n2", policy={"action_unknown": "allow"})
    both(cluster, "unknown_allow", "login", "n2", "alice", labels)
    pam_options("n2", action_unknown="deny")
    broker_policy("n2", policy={"action_unknown": "deny"})
    both(cluster, "unknown_deny", "login", "n2", "alice", labels)
    verify("several_compute", "several_login", "unknown_allow", "unknown_deny")


_SECTION = re.compile(r"^==(\d+)== (\d+) (\d+) (\d+)$", re.MULTILINE)


def test_several_jobs_from_inside_one(cluster: Cluster) -> None:
    other = cluster.submit("alice", ["n2"])
    time.sleep(1.1)
    home = cluster.home("alice")
    script = ""
    for port in PORTS:
        err = f"{home}/.lab/cf-{port}.err"
        script += (f"s=$(date +%s%N); ssh -p {port} n2 '{PROBE}' 2>{err}; rc=$?; "
                   f"echo ==={port}=== $rc $s $(date +%s%N); ")
    script = script.replace("===", "==")
    for port, marker in ((PAM, "31222"), (ADOPT, "31022")):
        script += f"ssh -p {port} n2 exec sleep {marker} >/dev/null 2>&1 & "
    batch = cluster.run_in_batch("alice", ["n1", "n2"], script, keep=True)
    labels = {batch.job_id: "source", other: "other"}
    observed: dict[int, Observation] = {}
    chunks = _SECTION.split(batch.output)
    # re.split yields [before, port, rc, start, end, text-after, port, ...]: PROBE output
    # precedes each section line.
    for i in range(1, len(chunks), 5):
        port, rc, start, end = (int(x) for x in chunks[i:i + 4])
        err_file = Path(f"{home}/.lab/cf-{port}.err")
        stderr = err_file.read_text() if err_file.exists() else ""
        err_file.unlink(missing_ok=True)
        observed[port] = parse_probe(rc, chunks[i - 1], stderr, labels, (end - start) / 1e9,
                                     job_of_sluid=cluster.job_of_sluid)
    assert set(observed) == set(PORTS), batch.output
    wait_until(lambda: all(_remote_sleep("alice", m) for m in ("31222", "31022")), 20,
               "both sessions from the batch step")
    cluster.cancel(batch.job_id)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_remote_sleep("alice", m)
                                              for m in ("31222", "31022")):
        time.sleep(0.2)
    for port, marker in ((PAM, "31222"), (ADOPT, "31022")):
        dies = "no" if _remote_sleep("alice", marker) else "yes"
        obs = observed[port]
        observed[port] = Observation(**{**obs.to_dict(), "dies": dies})  # type: ignore[arg-type]
        subprocess.run(["pkill", "-u", "alice", "-x", "-f", f"sleep {marker}"], check=False)
    ROWS["several_inside"] = Row.compare("several_inside", observed[PAM], observed[ADOPT])
    verify("several_inside")


def test_nodename_differs_from_hostname(cluster: Cluster, broker_policy: Callable[..., None],
                                       pam_options: Callable[..., None]) -> None:
    """Neither front end is told the node name: Slurm's NodeName is not the host's name.

    The lab gives both sides ``nodename`` explicitly everywhere else; here it is removed from
    the PAM line and from the broker's policy, so each has to work out that host n1 runs
    NodeName t1 (pam_slurm_adopt through the /etc/hosts alias, sshd-adopt through NodeAddr).
    """
    if cluster.node("n1") == "n1":
        pytest.skip("this lab generation names its Slurm nodes after their hosts")
    job = cluster.submit("alice", ["n1"])
    pam_options("n1", nodename=None)
    broker_policy("n1", policy={"nodename": None})
    both(cluster, "nodename", "login", "n1", "alice", {job: "A"})
    verify("nodename")


def _slurmd_pid(cluster: Cluster, node: str) -> int:
    out = subprocess.run(["pgrep", "-f", f"slurmd -D -N {cluster.node(node)}$"],
                         capture_output=True, text=True).stdout.split()
    if not out:
        raise HarnessError(f"slurmd of {node} not found")
    return int(out[0])


def test_job_still_starting(cluster: Cluster) -> None:
    """slurmd is stopped for a few seconds (well below SlurmdTimeout/MessageTimeout), so the
    job is allocated but no extern step exists on the node yet."""
    slurmd = _slurmd_pid(cluster, "n1")
    os.kill(slurmd, signal.SIGSTOP)
    try:
        job = cluster.submit("alice", ["n1"], wait=False)
        wait_until(lambda: (cluster.job_info(job) or ("", []))[1] == ["n1"], 10,
                   f"job {job} allocated to n1")
        both(cluster, "job_starting", "login", "n1", "alice", {job: "A (starting)"})
    finally:
        os.kill(slurmd, signal.SIGCONT)
    cluster.wait_running(job)
    verify("job_starting")


def test_pam_systemd_on_a_systemd_node(sysnode: Cluster) -> None:
    """The node s1 booted with systemd, pam_systemd in sshd's PAM stack on both ports: where
    each session is 10 s after login (logind has done its part by then), and whether it
    dies with the job (tests/integration/test_systemd_node.py checks the logind side)."""
    job = sysnode.submit("alice", ["s1"], extra_args=["--partition=systemd"])
    sessions_vs_job(sysnode, "pam_systemd", "login", "s1", "alice", {job: "A"},
                    lambda: sysnode.cancel(job), settle=10)
    verify("pam_systemd")


#: ssh options forcing each keyless method (the lab: scripts/_cluster/kerberos.py, and
#: configs.py's write_etc_ssh for hostbased).
KEYLESS = {
    "hostbased": ("-o", "HostbasedAuthentication=yes",
                  "-o", "PreferredAuthentications=hostbased"),
    "gssapi": ("-o", "GSSAPIAuthentication=yes",
               "-o", "PreferredAuthentications=gssapi-with-mic"),
}


def test_keyless_methods(auth_methods_lab: Cluster, kerberos_tickets: None) -> None:
    """Hostbased and GSSAPI logins, sshd-adopt's drop-in as `scripts/install --auth-methods
    hostbased,gssapi-with-mic` writes it; pam_slurm_adopt's sshd allows both for everyone.
    (Last in the module: its fixtures change every node's drop-in until the module ends.)"""
    cluster = auth_methods_lab
    job = cluster.submit("alice", ["n1"])
    for method, options in KEYLESS.items():
        both(cluster, f"{method}_one_job", "login", "n1", "alice", {job: "A"}, options)
        both(cluster, f"{method}_no_job", "login", "n1", "bob", {job: "A"}, options)
    verify(*(f"{method}_{case}" for method in KEYLESS for case in ("one_job", "no_job")))
