"""Helpers for tests against the lab cluster started by ``scripts/cluster``.

The lab is a real Slurm (slurmctld on ``ctl``, slurmd on ``n1``..``n3``), munge and OpenSSH,
each "host" a set of namespaces entered with nsenter. Every compute node runs sshd on port 22
(the sshd-adopt front end, ``UsePAM no``) and on port 2222 (the real pam_slurm_adopt, the
oracle for differential tests). See ``scripts/cluster --help``.

Everything here runs as root on the machine that hosts the lab.

Generations: ``Cluster(generation="bookworm")`` (Debian 12: Slurm 22.05, OpenSSH 9.2, the
host's own userland) or ``Cluster(generation="trixie")`` (Debian 13: Slurm 24.11, OpenSSH 10,
Python 3.13, from a chroot), see ``scripts/cluster --help`` and docs/generations.md. Tests use
the same host names on both: ``ctl``, ``login``, ``n1``..``n3`` (every generation has its own
UTS namespaces and /etc/hosts). Slurm NodeNames differ (``t1``..``t3`` on trixie: cgroup v1
hierarchies are host-wide and Slurm's prefix is ``/slurm_<NodeName>``); the Cluster maps host
names to NodeNames where Slurm wants them (``submit``, spool sockets, cgroup dirs, slurmd logs)
and back (``job_info``, ``hostnames``, ``remote_cgroup_job``). The module constants below
(RUN, VAR, LOG, VENV, NSDIR, ADDRESSES) are the bookworm lab's; generation-aware code uses
the same-named Cluster attributes and methods instead.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from sshd_adopt._internal.slurm.stepd import StepdConnection
from sshd_adopt.errors import Error

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cluster"
RUN = Path("/run/sshd-adopt-lab")
NSDIR = RUN / "ns"
VAR = Path("/var/lib/sshd-adopt-lab")
LOG = Path("/var/log/sshd-adopt-lab")
VENV = Path("/opt/sshd-adopt-lab/venv")
HOSTS = ("ctl", "login", "n1", "n2", "n3")
COMPUTE = ("n1", "n2", "n3")
ADDRESSES = {"ctl": "10.213.0.1", "login": "10.213.0.5", "n1": "10.213.0.11",
             "n2": "10.213.0.12", "n3": "10.213.0.13"}
EXTERN_STEP = 4294967292  # SLURM_EXTERN_CONT
BATCH_STEP = 4294967291  # SLURM_BATCH_SCRIPT
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}



@dataclass(frozen=True)
class Generation:
    """What tests need to know of one lab generation (scripts/_cluster/generation.py has the
    full record; tests/unit/test_generations.py checks that both agree)."""

    name: str
    root: Path | None  # the chroot with the generation's userland; None: the host's own
    run: Path  # host paths of the run, state and log dirs (the same paths inside the lab)
    var: Path
    log: Path
    venv: Path  # inside the lab (what sshd's ForceCommand and in-lab commands use)
    v4_net: str
    v6_net: str
    node_names: tuple[tuple[str, str], ...]  # (host, Slurm NodeName)
    cgroup: str = "v1"  # "v2": the host's cgroup2 hierarchy at each node's /sys/fs/cgroup

    def in_root(self, path: Path | str) -> Path:
        """A path inside the lab's userland, seen from the host."""
        return Path(f"{self.root}{path}") if self.root is not None else Path(path)


GENERATIONS: dict[str, Generation] = {
    "bookworm": Generation(
        name="bookworm", root=None, run=RUN, var=VAR, log=LOG, venv=VENV,
        v4_net="10.213.0.", v6_net="fd5a:213::",
        node_names=(("n1", "n1"), ("n2", "n2"), ("n3", "n3"))),
    "trixie": Generation(
        name="trixie", root=Path("/var/lib/sshd-adopt-lab-trixie/root"),
        run=Path("/run/sshd-adopt-lab-trixie"), var=Path("/var/lib/sshd-adopt-lab-trixie/lab"),
        log=Path("/var/log/sshd-adopt-lab-trixie"), venv=VENV,
        v4_net="10.214.0.", v6_net="fd5a:214::",
        node_names=(("n1", "t1"), ("n2", "t2"), ("n3", "t3"))),
    "forky": Generation(
        name="forky", root=Path("/var/lib/sshd-adopt-lab-forky/root"),
        run=Path("/run/sshd-adopt-lab-forky"), var=Path("/var/lib/sshd-adopt-lab-forky/lab"),
        log=Path("/var/log/sshd-adopt-lab-forky"), venv=VENV,
        v4_net="10.215.0.", v6_net="fd5a:215::",
        node_names=(("n1", "f1"), ("n2", "f2"), ("n3", "f3")), cgroup="v2"),
}
DEFAULT_GENERATION = "bookworm"
HOST_NUM = {"ctl": 1, "login": 5, "n1": 11, "n2": 12, "n3": 13}
#: Slurm NodeName -> lab host name, over all generations (NodeNames never repeat).
_HOST_OF_NODE = {node: host for gen in GENERATIONS.values() for host, node in gen.node_names}

_CGROUP_RE = re.compile(r"/slurm_(?P<node>[^/]+)/uid_(?P<uid>\d+)/job_(?P<job>\d+)"
                        r"(?:/step_(?P<step>[^/\s]+))?")
#: cgroup v2 (the ``0::`` line): ``system.slice/<NodeName>_slurmstepd.scope/<job>/step_<s>``,
#: the job dir named ``job_<id>`` or, from Slurm 26.05, by the job's SLUID.
_CGROUP_V2_RE = re.compile(r"/(?P<node>[^/]+)_slurmstepd\.scope/(?:job_(?P<job>\d+)"
                           r"|(?P<sluid>s[0-9A-HJKMNP-TV-Z]{13}))(?:/step_(?P<step>[^/\s]+))?")
#: SLUID -> (job, uid), as a stepd or a batch step told (SLUIDs name one job cluster-wide):
#: a job that ended can no longer be asked.
_SLUIDS: dict[str, tuple[int, int]] = {}


UNIT = REPO / "packaging" / "systemd" / "sshd-adoptd.service"
#: Capability numbers (linux/capability.h) of the names a unit may list.
CAPABILITY_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
    "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
}


def unit_capabilities() -> list[str]:
    """The shipped unit's CapabilityBoundingSet= names."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise HarnessError(f"{UNIT}: no CapabilityBoundingSet=")


def capability_mask(names: Sequence[str]) -> int:
    """The bit mask /proc/<pid>/status shows (CapBnd: ...) for capability ``names``."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_BITS[name]
    return mask


class HarnessError(RuntimeError):
    """The lab did not do what a helper waited for."""


@dataclass(frozen=True)
class CgroupJob:
    """Which Slurm job (and step) a process's cgroup path names."""

    node: str  # the lab host name (n1..n3) of the Slurm node, in every generation
    uid: int
    job: int
    step: str | None


@dataclass(frozen=True)
class XDisplay:
    """An X server on the login host (``Cluster.x_server``)."""

    display: str  # ":71"
    number: int
    token: str  # the value of its root window's _SSHD_ADOPT_LAB property


@dataclass(frozen=True)
class BatchResult:
    """Outcome of a command run inside a job's batch step."""

    job_id: int
    returncode: int
    output: str


def user_pids(user: str, pattern: str, *, exact: bool = False) -> list[int]:
    """Host pids of ``user``'s processes whose command line matches ``pattern`` (``pgrep
    -f``; all of it with ``exact``), leaving out the ssh clients and the nsenter/setpriv
    that started them (their command lines name the remote command too)."""
    out = subprocess.run(["pgrep", "-u", user, "-fx" if exact else "-f", pattern],
                         capture_output=True, text=True, check=False).stdout.split()
    pids = []
    for pid in map(int, out):
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).name() not in ("ssh", "nsenter", "setpriv"):
                pids.append(pid)
    return pids


def process_running(pid: int) -> bool:
    """Is ``pid`` running? A zombie (exited, waiting for init to reap it) is not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.1) -> None:
    """Poll ``pred`` until true; raise HarnessError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def remote_cgroup_job(cgroup_text: str, controller: str = "memory") -> CgroupJob | None:
    """Parse ``/proc/<pid>/cgroup`` text; return the Slurm job named by ``controller``'s line,
    or else by the unified ``0::`` line.

    cgroup v1 lines look like ``4:memory:/slurm_n2/uid_2001/job_7/step_extern``; on a cgroup
    v2 node (forky) the job is in the ``0::`` line,
    ``0::/system.slice/f2_slurmstepd.scope/<job_7 or its SLUID>/step_extern/user/...``
    (its v1 lines there are the host's, in no job). Returns None when the process is not
    in a Slurm job cgroup.
    """
    chosen: str | None = None
    unified: str | None = None
    for line in cgroup_text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if controller in parts[1].split(","):
            chosen = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            unified = parts[2]
    match = _CGROUP_RE.search(chosen) if chosen is not None else None
    if match is not None:
        return CgroupJob(node=_HOST_OF_NODE.get(match["node"], match["node"]),
                         uid=int(match["uid"]), job=int(match["job"]), step=match["step"])
    v2 = _CGROUP_V2_RE.search(unified) if unified is not None else None
    if v2 is None:
        return None
    node = v2["node"]
    if v2["job"] is not None:
        job, uid = int(v2["job"]), -1
    else:
        found = _sluid_job(node, v2["sluid"])
        if found is None:
            return None
        job, uid = found
    return CgroupJob(node=_HOST_OF_NODE.get(node, node), uid=uid, job=job, step=v2["step"])


def _ask_sluid(sock: Path, job: int, timeout: float) -> str | None:
    """The SLUID the stepd at ``sock`` (a step of ``job``) tells, remembered with the job's
    owner; None from a stepd older than 25.11. Raises what StepdConnection raises."""
    with StepdConnection.open(str(sock), timeout=timeout) as stepd:
        sluid = stepd.sluid()
        if sluid is not None:
            _SLUIDS[sluid] = (job, stepd.step_uid())
    return sluid


def _sluid_job(node: str, sluid: str) -> tuple[int, int] | None:
    """(job, uid) of the job a node's stepds know by ``sluid`` (asked once, then kept)."""
    if sluid not in _SLUIDS:
        gen = next((g for g in GENERATIONS.values() if node in dict(g.node_names).values()), None)
        if gen is None:
            return None
        spool = gen.var / f"slurmd-{node}"
        for sock in sorted(spool.glob(f"{node}_*.*")):
            with contextlib.suppress(Error, OSError, ValueError):
                _ask_sluid(sock, int(sock.name.split("_", 1)[1].split(".")[0]), 2)
    return _SLUIDS.get(sluid)


class LogFile:
    """A log file that tests read incrementally: ``m = log.mark(); ...; log.since(m)``."""

    def __init__(self, path: Path, contains: str | None = None) -> None:
        self.path = path
        self.contains = contains

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int = 0) -> str:
        try:
            with self.path.open("rb") as fh:
                fh.seek(mark)
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        if self.contains is None:
            return text
        return "".join(line for line in text.splitlines(keepends=True)
                       if self.contains in line)

    def text(self) -> str:
        return self.since(0)

    def wait_for(self, needle: str, mark: int = 0, timeout: float = 10.0) -> str:
        """Wait until ``needle`` appears after ``mark``; return the text since ``mark``."""
        wait_until(lambda: needle in self.since(mark), timeout, f"{needle!r} in {self.path}")
        return self.since(mark)


class Cluster:
    """Handle on the running lab cluster of one generation."""

    def __init__(self, script: Path = SCRIPT, generation: str = DEFAULT_GENERATION) -> None:
        self.script = script
        self.gen = GENERATIONS[generation]
        self.generation = generation
        self.run = self.gen.run
        self.nsdir = self.gen.run / "ns"
        self.var = self.gen.var
        self.log = self.gen.log
        self.venv = self.gen.venv  # inside the lab
        self.venv_host = self.gen.in_root(self.gen.venv)  # the same venv from the host
        self._node_of = dict(self.gen.node_names)
        self._host_of = {node: host for host, node in self.gen.node_names}

    def __repr__(self) -> str:
        return f"Cluster(generation={self.generation!r})"

    # ------------------------------------------------------------------ names

    def node(self, host: str) -> str:
        """Slurm NodeName of a compute host (``n1`` -> ``t1`` on trixie)."""
        return self._node_of.get(host, host)

    def host_of(self, node: str) -> str:
        """Lab host name of a Slurm NodeName (the inverse of ``node``)."""
        return self._host_of.get(node, node)

    def address(self, host: str) -> str:
        return f"{self.gen.v4_net}{HOST_NUM[host]}"

    def address6(self, host: str) -> str:
        return f"{self.gen.v6_net}{HOST_NUM[host]}"

    def in_root(self, path: Path | str) -> Path:
        """A path inside the lab's userland (e.g. /usr/sbin/sshd), seen from the host."""
        return self.gen.in_root(path)

    # ------------------------------------------------------------------ harness state

    def state(self) -> dict[str, object]:
        """scripts/cluster's state file (daemons, pids, options)."""
        data = json.loads((self.run / "state.json").read_text())
        if not isinstance(data, dict):
            raise HarnessError(f"{self.run / 'state.json'} is not an object")
        return data

    def daemon_pid(self, name: str) -> int:
        daemons = self.state().get("daemons")
        if not isinstance(daemons, dict) or name not in daemons:
            raise HarnessError(f"no daemon {name!r} in {self.run / 'state.json'}")
        return int(daemons[name]["pid"])

    def broker_pid(self, host: str) -> int:
        return self.daemon_pid(f"sshd-adoptd-{host}")

    def broker_config(self, host: str) -> Path:
        return self.var / "etc" / host / "sshd-adopt.toml"

    # ------------------------------------------------------------------ lifecycle

    def run_script(self, *args: str, timeout: float = 300,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``scripts/cluster ARGS`` (as a subprocess)."""
        proc = subprocess.run([str(self.script), "--generation", self.generation, *args],
                              capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise HarnessError(f"scripts/cluster -g {self.generation} {' '.join(args)} failed "
                               f"(rc={proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def set_job_container(self, on: bool) -> None:
        """Turn Slurm's tmpfs job container on or off in this lab (``scripts/cluster
        job-container on|off``: cancels every job, restarts slurmctld and the slurmds, waits
        until the nodes are idle; nothing restarts when it already is as asked)."""
        want = "on" if on else "off"
        self.run_script("job-container", want, timeout=600)
        told = self.run_script("job-container", "status", timeout=60).stdout.strip()
        if told != want:
            raise HarnessError(f"scripts/cluster job-container status says {told!r}, "
                               f"not {want!r}")

    def job_namespace(self, host: str, job: int) -> Path:
        """The file holding ``job``'s mount namespace on ``host`` (job container on), as
        seen in that host's mount namespace: ``<root><base>/<NodeName>/<job>/.ns``."""
        return self.in_root(self.var / "job-container" / self.node(host) / str(job) / ".ns")

    def is_up(self) -> bool:
        return self.run_script("status", check=False, timeout=60).returncode == 0

    def ensure_up(self) -> None:
        """``scripts/cluster up``: start what is not running, and install this checkout.

        Always run, even when the lab is healthy: ``up`` reinstalls the package when the
        checkout changed and checks that the venv holds exactly its code, so a lab left
        running by an earlier session never tests other code than the one in hand.
        """
        self.run_script("up", timeout=600)

    # ------------------------------------------------------------------ running things

    @staticmethod
    def uid(user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    @staticmethod
    def home(user: str) -> Path:
        return Path(pwd.getpwnam(user).pw_dir)

    def command(self, host: str, *cmd: str, user: str | None = None) -> list[str]:
        """argv that runs ``cmd`` in ``host``'s namespaces, as root or as ``user``."""
        if host not in HOSTS:
            raise ValueError(f"unknown lab host {host!r}")
        wd = "/"
        argv = list(cmd)
        if user is not None:
            pw = pwd.getpwnam(user)
            wd = pw.pw_dir
            argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                    "--init-groups", "--reset-env", "--", *argv]
        ns = ["nsenter", f"--net={self.nsdir / (host + '.net')}",
              f"--uts={self.nsdir / (host + '.uts')}", f"--mount={self.nsdir / (host + '.mnt')}"]
        if self.gen.root is not None:
            # chroot(8) changes to / itself: env -C gives the working directory back.
            return [*ns, "--wd=/", "--", "chroot", str(self.gen.root), "env", "-C", wd, *argv]
        return [*ns, f"--wd={wd}", "--", *argv]

    def exec(self, host: str, *cmd: str, user: str | None = None, timeout: float = 60,
             check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on a lab host and wait for it (stdout/stderr captured as text)."""
        proc = subprocess.run(self.command(host, *cmd, user=user), input=input,
                              capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV,
                              check=False)
        if check and proc.returncode != 0:
            raise HarnessError(f"on {host} as {user or 'root'}: {shlex.join(cmd)} -> rc "
                               f"{proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sysnode(self, *cmd: str, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as root inside the systemd-booted node s1 (``scripts/cluster
        sysnode up`` booted it; cgroup v2 generations only) and wait for it."""
        proc = self.run_script("exec", "s1", "--", *cmd, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise HarnessError(f"on s1: {shlex.join(cmd)} -> rc {proc.returncode}\n"
                               f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def spawn(self, host: str, *cmd: str, user: str | None = None) -> subprocess.Popen[str]:
        """Start ``cmd`` on a lab host without waiting (e.g. a long ssh session)."""
        return subprocess.Popen(self.command(host, *cmd, user=user), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=CLEAN_ENV)

    def ssh(self, from_host: str, to_host: str, command: str, user: str, port: int = 22,
            extra_opts: Sequence[str] = (), timeout: float = 30,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """``ssh`` from one lab host to another as ``user``.

        LogLevel=INFO so that a PAM/pam_slurm_adopt denial banner shows on stderr.
        """
        argv = ["ssh", "-o", "LogLevel=INFO", "-p", str(port), *extra_opts, to_host, command]
        return self.exec(from_host, *argv, user=user, timeout=timeout, check=check)

    def slurm(self, *cmd: str, user: str | None = None, host: str = "ctl",
              timeout: float = 30) -> str:
        """Run a Slurm client command (default on ctl, as root) and return its stdout."""
        return self.exec(host, *cmd, user=user, timeout=timeout).stdout

    # ------------------------------------------------------------------ jobs

    def spool(self, host: str) -> Path:
        """slurmd's spool dir of a compute host (SlurmdSpoolDir=.../slurmd-%n)."""
        return self.var / f"slurmd-{self.node(host)}"

    def stepd_socket(self, host: str, job: int, step: int = EXTERN_STEP) -> Path:
        return self.spool(host) / f"{self.node(host)}_{job}.{step}"

    def extern_stepd_pid(self, host: str, job: int) -> int:
        """The extern slurmstepd of ``job`` on ``host``, asked through its own socket (job
        ids repeat across lab generations, so a process-name search could find the other
        lab's)."""
        try:
            with StepdConnection.open(str(self.stepd_socket(host, job)), timeout=5) as stepd:
                return stepd.daemon_pid()
        except Error as err:
            raise HarnessError(f"no extern slurmstepd for job {job} on {host}: {err}") from err

    @staticmethod
    def stepd_answers(path: Path) -> bool:
        """Is a slurmstepd listening on ``path`` (a stale socket file refuses)?"""
        if not path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(str(path))
        except OSError:
            return False
        return True

    def job_info(self, job: int) -> tuple[str, list[str]] | None:
        """(state, nodes) of a job still in squeue, else None."""
        out = self.exec("ctl", "squeue", "-h", "-j", str(job), "-o", "%T|%N",
                        check=False).stdout.strip()
        if not out or "|" not in out:
            return None
        state, nodelist = out.splitlines()[0].split("|", 1)
        return state, self.hostnames(nodelist) if nodelist else []

    def hostnames(self, nodelist: str) -> list[str]:
        """Expand a Slurm node list into lab host names (``t[1-2]`` -> n1, n2 on trixie)."""
        return [self.host_of(n)
                for n in self.slurm("scontrol", "show", "hostnames", nodelist).split()]

    def submit(self, user: str, nodes: Sequence[str] | int, script_or_wrap: str = "sleep 600",
               *, extra_args: Sequence[str] = (), wait: bool = True,
               timeout: float = 30) -> int:
        """``sbatch`` as ``user`` (from the login host); return the job id.

        ``nodes`` is a list of node names (``-w``) or a node count (``-N``).
        ``script_or_wrap`` starting with ``#!`` is a batch script, otherwise ``--wrap``.
        With ``wait`` the call returns once the job is RUNNING and its extern step is up
        (the stepd socket answers) on every node of the job.
        """
        home = self.home(user)
        outdir = home / ".lab"
        self.exec("login", "mkdir", "-p", str(outdir), user=user)
        args = ["sbatch", "--parsable", f"--chdir={home}", f"--output={outdir}/slurm-%j.out"]
        if isinstance(nodes, int):
            args.append(f"--nodes={nodes}")
        else:
            args += [f"--nodes={len(nodes)}",
                     f"--nodelist={','.join(self.node(n) for n in nodes)}"]
        args += list(extra_args)
        if script_or_wrap.startswith("#!"):
            proc = self.exec("login", *args, user=user, input=script_or_wrap)
        else:
            proc = self.exec("login", *args, "--wrap", script_or_wrap, user=user)
        job = int(proc.stdout.strip().split(";")[0])
        if wait:
            self.wait_running(job, timeout=timeout)
        return job

    def wait_running(self, job: int, timeout: float = 30) -> list[str]:
        """Wait until ``job`` runs and its extern stepd answers on each node; return nodes."""
        nodes: list[str] = []

        def ready() -> bool:
            nonlocal nodes
            info = self.job_info(job)
            if info is None:
                raise HarnessError(f"job {job} left the queue before running")
            state, nodes = info
            return state == "RUNNING" and bool(nodes) and all(
                self.stepd_answers(self.stepd_socket(n, job)) for n in nodes)

        wait_until(ready, timeout, f"job {job} running with extern steps", interval=0.2)
        if self.gen.cgroup == "v2" and nodes:  # remembered while it can still be asked
            with contextlib.suppress(Error, OSError):
                _ask_sluid(self.stepd_socket(nodes[0], job), job, 5)
        return nodes

    def cancel(self, job: int, timeout: float = 30) -> None:
        """``scancel`` a job and wait until it is out of squeue and no stepd of it answers."""
        self.exec("ctl", "scancel", str(job), check=False)
        self.wait_gone(job, timeout)

    def wait_gone(self, job: int, timeout: float = 30) -> None:
        def gone() -> bool:
            if self.job_info(job) is not None:
                return False
            return not any(
                self.stepd_answers(sock) for host in COMPUTE
                for sock in self.spool(host).glob(f"{self.node(host)}_{job}.*"))

        wait_until(gone, timeout, f"job {job} to be gone", interval=0.2)

    def jobs(self) -> list[int]:
        out = self.exec("ctl", "squeue", "-h", "-o", "%i", check=False).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    def cancel_all(self, timeout: float = 30) -> None:
        jobs = self.jobs()
        if jobs:
            self.exec("ctl", "scancel", *map(str, jobs), check=False)
        for job in jobs:
            self.wait_gone(job, timeout)

    # ------------------------------------------------------------------ cgroups / pids

    @staticmethod
    def cgroup_of(host: str, pid: int) -> str:
        """Text of ``/proc/<pid>/cgroup`` (all lab hosts share one /proc; ``host`` is
        documentation)."""
        del host
        return Path(f"/proc/{pid}/cgroup").read_text()

    def job_cgroup_dir(self, host: str, uid: int, job: int, step: str = "extern",
                       controller: str = "memory") -> Path:
        """A job step's cgroup dir, seen from the host. cgroup v1 dirs are host-wide: every
        generation's lab sees the same tree. On a v2 generation ``controller`` is moot:
        the step is in the host's cgroup2 hierarchy, and its processes are in its
        ``slurm`` and ``user/...`` children (read them with :meth:`cgroup_pids`)."""
        node = self.node(host)
        if self.gen.cgroup == "v2":
            scope = Path(f"/sys/fs/cgroup/unified/system.slice/{node}_slurmstepd.scope")
            name = self.job_cgroup_name(host, job)
            return scope / name / f"step_{step}"
        return Path(f"/sys/fs/cgroup/{controller}/slurm_{node}/uid_{uid}/job_{job}"
                    f"/step_{step}")

    def job_cgroup_name(self, host: str, job: int) -> str:
        """The job's cgroup dir name on a v2 node: its SLUID (Slurm 26.05), as its
        extern stepd tells, else ``job_<id>``."""
        sluid = _ask_sluid(self.stepd_socket(host, job), job, 5)
        return sluid if sluid is not None else f"job_{job}"

    def job_of_sluid(self, sluid: str) -> int | None:
        """The job a SLUID names (asked of this generation's stepds, or remembered)."""
        for host in COMPUTE:
            found = _sluid_job(self.node(host), sluid)
            if found is not None:
                return found[0]
        return None

    @staticmethod
    def cgroup_pids(directory: Path) -> set[int]:
        """Every pid in a cgroup and the cgroups below it."""
        pids: set[int] = set()
        for procs in [directory / "cgroup.procs", *directory.rglob("*/cgroup.procs")]:
            with contextlib.suppress(OSError):  # removed meanwhile
                pids.update(int(p) for p in procs.read_text().split())
        return pids

    def listpids(self, host: str, job: int) -> list[tuple[int, str]]:
        """``scontrol listpids JOB`` run on ``host``: [(pid, step), ...] (real pids only)."""
        out = self.exec(host, "scontrol", "listpids", str(job), check=False).stdout
        result = []
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0].lstrip("-").isdigit() and int(cols[0]) > 0:
                result.append((int(cols[0]), cols[2]))
        return result

    # ------------------------------------------------------------------ X11

    @contextlib.contextmanager
    def x_server(self, user: str) -> Iterator[XDisplay]:
        """An X server (Xvfb) of ``user`` on the login host, as their desktop would be.

        Its cookie is in the user's ~/.Xauthority (as ``ssh -X`` or a display manager leaves
        it; salloc --x11 reads it there) and the server carries a root-window property
        ``_SSHD_ADOPT_LAB`` with a fresh token: a client that prints the token reached this
        very server. The display number is the generation's own (71, 72, ...) so that the
        labs' servers never meet. Stopped, and the cookie removed, afterwards.
        """
        number = 71 + list(GENERATIONS).index(self.generation)
        display = f":{number}"
        cookie = uuid.uuid4().hex
        token = uuid.uuid4().hex[:16]
        self.exec("login", "xauth", "add", display, "MIT-MAGIC-COOKIE-1", cookie, user=user)
        auth = self.home(user) / ".lab" / f"xserver-{number}.auth"
        self.exec("login", "mkdir", "-p", str(auth.parent), user=user)
        self.exec("login", "xauth", "-f", str(auth), "add", display, "MIT-MAGIC-COOKIE-1",
                  cookie, user=user)
        # -noreset: a server resets (and loses its root properties) when its last client goes
        server = self.spawn("login", "Xvfb", display, "-noreset", "-nolisten", "tcp", "-auth",
                            str(auth), "-screen", "0", "320x240x8", user=user)
        try:
            wait_until(lambda: self.exec("login", "env", f"DISPLAY={display}", "xdpyinfo",
                                         user=user, check=False).returncode == 0
                       or server.poll() is not None, 20, f"Xvfb {display} on login")
            if server.poll() is not None:
                raise HarnessError(f"Xvfb {display} exited: {server.communicate()[1][-2000:]}")
            self.exec("login", "env", f"DISPLAY={display}", "xprop", "-root", "-f",
                      "_SSHD_ADOPT_LAB", "8s", "-set", "_SSHD_ADOPT_LAB", token, user=user)
            yield XDisplay(display, number, token)
        finally:
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(timeout=10)
            self.exec("login", "xauth", "remove", display, user=user, check=False)
            auth.unlink(missing_ok=True)

    def x11_allocation(self, user: str, x: XDisplay, nodes: Sequence[str],
                       timeout: float = 30) -> tuple[int, subprocess.Popen[str]]:
        """``salloc --x11`` of ``user`` from the login host with display ``x``, held by a
        ``sleep`` there (salloc relays the job's X11 connections while it runs); returns
        the job id, once its extern steps are up, and the salloc process (kill it, or
        cancel the job, to end the allocation)."""
        names = ",".join(self.node(n) for n in nodes)
        name = f"x11-{uuid.uuid4().hex[:8]}"
        proc = self.spawn("login", "env", f"DISPLAY={x.display}", "salloc", "--x11",
                          f"--job-name={name}", f"--nodes={len(nodes)}", f"--nodelist={names}",
                          "sleep", "3600", user=user)
        found: list[int] = []

        def granted() -> bool:
            if proc.poll() is not None:
                raise HarnessError(f"salloc --x11 exited: {proc.communicate()[1][-2000:]}")
            out = self.exec("ctl", "squeue", "-h", "-u", user, "-o", "%i %j", check=False)
            found[:] = [int(line.split()[0]) for line in out.stdout.splitlines()
                        if line.split()[1:] == [name]]
            return bool(found)

        wait_until(granted, timeout, f"salloc --x11 of {user} to get its job")
        job = max(found)
        self.wait_running(job, timeout=timeout)
        return job, proc

    # ------------------------------------------------------------------ batch-step commands

    def run_in_batch(self, user: str, nodes: Sequence[str] | int, command: str, *,
                     extra_args: Sequence[str] = (), keep: bool = False,
                     timeout: float = 60) -> BatchResult:
        """Run a shell ``command`` inside the batch step of a new job (on its first node).

        Output (stdout+stderr) and exit status are written to files in the user's home and
        read back. With ``keep`` the job keeps running afterwards (sleeps) so that a test
        can inspect it; otherwise it ends by itself.
        """
        token = uuid.uuid4().hex[:12]
        outdir = self.home(user) / ".lab"
        out, rc = outdir / f"batch-{token}.out", outdir / f"batch-{token}.rc"
        sluid = outdir / f"batch-{token}.sluid"  # Slurm >= 26.05 (v2 cgroups are named by it)
        script = (
            "#!/bin/bash\n"
            f"echo \"$SLURM_JOB_SLUID\" >{sluid}\n"
            f"( {command}\n) >{out} 2>&1 </dev/null\n"
            f"echo $? >{rc}.tmp && mv {rc}.tmp {rc}\n"
            + ("exec sleep 100000\n" if keep else "")
        )
        job = self.submit(user, nodes, script, extra_args=extra_args, wait=False)
        try:
            wait_until(rc.exists, timeout, f"batch command of job {job} to finish", 0.2)
        except HarnessError:
            self.exec("ctl", "scancel", str(job), check=False)
            partial = out.read_text(errors="replace") if out.exists() else ""
            raise HarnessError(f"job {job}: batch command did not finish; output so far:\n"
                               f"{partial}") from None
        result = BatchResult(job, int(rc.read_text().strip()),
                             out.read_text(errors="replace"))
        with contextlib.suppress(FileNotFoundError):
            told = sluid.read_text().strip()
            if told:
                _SLUIDS[told] = (job, self.uid(user))
        for path in (out, rc, sluid):
            path.unlink(missing_ok=True)
        return result

    # ------------------------------------------------------------------ logs

    def syslog(self) -> LogFile:
        """Everything logged to /dev/log inside the lab (pam_slurm_adopt, ...)."""
        return LogFile(self.log / "syslog.log")

    def pam_log(self) -> LogFile:
        """pam_slurm_adopt's syslog lines."""
        return LogFile(self.log / "syslog.log", contains="pam_slurm_adopt[")

    def sshd_log(self, host: str, port: int = 22) -> LogFile:
        return LogFile(self.log / f"sshd-{host}-{port}.log")

    def slurmd_log(self, host: str) -> LogFile:
        return LogFile(self.log / f"slurmd-{self.node(host)}.log")

    def broker_log(self, host: str) -> LogFile:
        return LogFile(self.log / f"sshd-adoptd-{host}.log")

    def broker_socket(self, host: str) -> Path:
        return self.run / host / "broker.sock"
