"""The lab's daemons: what runs where, starting them, their readiness, the state file.

``daemons()`` lists every daemon of the selected generation in start order (syslog sink,
munged, slurmctld, the slurmds, two sshds per compute node, the root-squash FUSE mounts
and the sshd-adopt brokers), each with its host, argv, log and a readiness probe.
``start_daemon`` starts one inside its host's namespaces and returns the entry that
``save_state`` records in ``lab.STATE_FILE`` (pid and start time, log, config digest);
``stop_entries`` stops recorded ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import cgroupv2, kerberos
from . import generation as lab
from .configs import broker_exe, skip_broker, skip_dropin
from .generation import COMPUTE, sname
from .host import SQUASHED_USER, SYSTEM_PYTHON
from .namespaces import in_host, layout_digest, nsenter, nsenter_host_userland
from .processes import kill_and_wait, listening, pid_matches, proc_start_time, reap
from .util import CLEAN_ENV, REPO, LabError, tail, wait_for

#: The lab's helper programs (run as scripts, not imported).
SYSLOG_SINK = Path(__file__).resolve().parent / "syslog_sink.py"
ROOTSQUASH = Path(__file__).resolve().parent / "rootsquash.py"
#: sshd's oom_score_adj in the lab. Sites run sshd at -1000 (OOM immunity, which sessions
#: then inherit); setting a negative value needs CAP_SYS_RESOURCE, which this machine does
#: not grant (writing -500 to /proc/self/oom_score_adj as root: EACCES), so the lab shows
#: the same inheritance with a positive value.
SSHD_OOM_SCORE_ADJ = "500"


@dataclass
class Daemon:
    """One lab daemon: where and how it runs, where it logs, how to tell it is ready."""

    name: str
    host: str
    argv: list[str]
    log: Path  # stdout/stderr go here
    own_log: Path | None = None  # the daemon's own log file, if different
    ready: Callable[[int], bool] | None = None
    ready_timeout: float = 20.0
    stale: list[Path] = field(default_factory=list)  # pid files / sockets to clear first
    optional: bool = False  # failure to become ready is a warning, not an error
    in_root: bool = True  # run inside the generation's root (chroot generations)
    #: a cgroup (v2) of the lab's own to start in, as systemd's Delegate=yes gives a service
    cgroup: Path | None = None


def munge_ready(_pid: int) -> bool:
    proc = subprocess.run(
        [*nsenter("ctl"), "sh", "-c", "munge -n | unmunge >/dev/null"],
        capture_output=True, env=CLEAN_ENV, check=False, timeout=20,
    )
    return proc.returncode == 0


def slurmctld_ready(_pid: int) -> bool:
    proc = in_host("ctl", "scontrol", "ping", check=False, timeout=20)
    return "is UP" in proc.stdout


def port_listening(port: int, pid: int) -> bool:
    return listening(pid, port)


def path_exists(path: Path, _pid: int) -> bool:
    return path.exists()


def fuse_mounted(host: str, path: Path, _pid: int) -> bool:
    """Is the root-squash mount at ``path`` up in ``host``'s mount namespace?"""
    proc = subprocess.run([*nsenter_host_userland(host), "findmnt", "-n", "-o", "SOURCE",
                           "--mountpoint", str(path)], capture_output=True, text=True,
                          env=CLEAN_ENV, check=False, timeout=20)
    return proc.stdout.strip() == "lab-rootsquash"


def daemons() -> list[Daemon]:
    result = [
        Daemon("syslog", "ctl", [lab.GEN.python, str(SYSLOG_SINK), str(lab.RUN / "dev-log"),
                                 str(lab.LOG / "syslog.log")],
               lab.LOG / "syslog-sink.stderr",
               ready=lambda _p: (lab.RUN / "dev-log").exists()),
        Daemon("munged", "ctl", [
            "setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "--",
            "/usr/sbin/munged", "--foreground", "--force", "--num-threads=4",
            "--socket=/run/munge/munge.socket.2", "--pid-file=/run/munge/munged.pid",
            f"--seed-file={lab.VAR}/munge/munged.seed", f"--log-file={lab.LOG}/munged.log",
        ], lab.LOG / "munged.stderr", own_log=lab.LOG / "munged.log", ready=munge_ready,
            stale=[lab.RUN / "munge" / "munged.pid"]),
        Daemon("krb5kdc", "ctl", kerberos.kdc_argv(), lab.LOG / "krb5kdc.stderr",
               own_log=lab.LOG / "krb5kdc.log", ready=partial(port_listening, 88)),
        Daemon("slurmctld", "ctl", ["/usr/sbin/slurmctld", "-D", "-i"],
               lab.LOG / "slurmctld.stderr", own_log=lab.LOG / "slurmctld.log",
               ready=slurmctld_ready, ready_timeout=40, stale=[lab.RUN / "slurmctld.pid"]),
    ]
    result.extend(
        Daemon(f"slurmd-{node}", node,
               [*(cgroupv2.slurmd_prefix() if cgroupv2.enabled() else []),
                "/usr/sbin/slurmd", "-D", "-N", sname(node)],
               lab.LOG / f"slurmd-{sname(node)}.stderr",
               own_log=lab.LOG / f"slurmd-{sname(node)}.log",
               stale=[lab.RUN / f"slurmd-{sname(node)}.pid"])
        for node in COMPUTE
    )
    for node in COMPUTE:
        psa_exe = (str(lab.VAR / "sbin" / f"sshd-psa-{node}") if lab.GEN.pam_service_by == "argv0"
                   else "/usr/sbin/sshd")
        for port, exe in ((22, "/usr/sbin/sshd"), (2222, psa_exe)):
            sshd_log = lab.LOG / f"sshd-{node}-{port}.log"
            # Started with an oom_score_adj other than a job task's, as sites run sshd at
            # -1000: a session inside a job must get the task's value, not sshd's.
            result.append(Daemon(
                f"sshd-{node}-{port}", node,
                ["choom", "-n", SSHD_OOM_SCORE_ADJ, "--", exe, "-D", "-f",
                 str(lab.ETC / node / f"sshd_config-{port}"), "-E", str(sshd_log)],
                lab.LOG / f"sshd-{node}-{port}.stderr", own_log=sshd_log,
                ready=partial(port_listening, port),
                stale=[lab.RUN / node / f"sshd-{port}.pid"]))
    for node in COMPUTE:
        home = lab.GEN.in_root(pwd.getpwnam(SQUASHED_USER).pw_dir)
        result.append(Daemon(
            f"rootsquash-{node}", node, [SYSTEM_PYTHON, str(ROOTSQUASH), str(home)],
            lab.LOG / f"rootsquash-{node}.log", ready=partial(fuse_mounted, node, home),
            in_root=False))
    if lab.GEN.in_root(broker_exe()).exists() and not skip_broker():
        for node in COMPUTE:
            # sshd-adopt-spawn.socket as systemd runs it (Accept=yes: one helper per
            # connection, its standard input the connection), outside the broker's sandbox.
            spawn_dir = lab.RUN / node / "spawn"
            spawn_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            result.append(Daemon(
                f"sshd-adopt-spawn-{node}", node,
                ["systemd-socket-activate", "--listen=/run/sshd-adopt/spawn/spawn.sock",
                 "--accept", "--inetd", "--", str(lab.VENV / "bin" / "python3"), "-I", "-m",
                 "sshd_adopt._internal.node.nsexec"],
                lab.LOG / f"sshd-adopt-spawn-{node}.log",
                ready=partial(path_exists, spawn_dir / "spawn.sock"), ready_timeout=10,
                stale=[spawn_dir / "spawn.sock"], optional=True))
            sock = lab.RUN / node / "broker.sock"
            result.append(Daemon(
                f"sshd-adoptd-{node}", node,
                [*as_the_unit_runs_it(), str(broker_exe()), "--foreground", "--config",
                 str(lab.ETC / node / "sshd-adopt.toml")],
                lab.LOG / f"sshd-adoptd-{node}.log",
                ready=partial(path_exists, sock), ready_timeout=10,
                stale=[sock], optional=True, cgroup=broker_cgroup(node)))
    return result


#: The shipped systemd unit: the lab runs every broker with its privileges.
UNIT = REPO / "packaging" / "systemd" / "sshd-adoptd.service"


def unit_capabilities() -> list[str]:
    """The unit's ``CapabilityBoundingSet``, as setpriv(1) names them (``sys_ptrace``...)."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [cap.removeprefix("CAP_").lower() for cap in line.split("=", 1)[1].split()]
    raise LabError(f"{UNIT}: no CapabilityBoundingSet= line")


#: What the lab grants the broker beyond the unit: its nodes are network namespaces, and
#: the kernel offers the proc connector in the initial one only, which the broker enters
#: (setns) to subscribe. A real node's broker runs in the host's namespace and needs no
#: setns (the unit sets no NetworkNamespacePath).
LAB_ONLY_CAPABILITIES = ("sys_admin",)


def as_the_unit_runs_it() -> list[str]:
    """setpriv(1) giving the broker what the shipped unit gives it: its capability
    bounding set (for root after exec, also its permitted and effective sets) plus
    LAB_ONLY_CAPABILITIES, no inheritable capabilities, and NoNewPrivileges. The whole
    test suite thus proves the unit's capability list (there is no systemd here)."""
    caps = ",".join(["-all", *(f"+{cap}" for cap in
                               [*unit_capabilities(), *LAB_ONLY_CAPABILITIES])])
    return ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all", "--no-new-privs", "--"]


LAB_CGROUPS = cgroupv2.LAB_CGROUPS


def broker_cgroup(node: str) -> Path | None:
    """The cgroup a node's broker starts in, writable by it as its own (the unit's
    Delegate=yes): it warms the cgroup-migration path in two children of it. None when
    this host has no cgroup v2 hierarchy where the lab expects it."""
    if not LAB_CGROUPS.parent.is_dir():
        return None
    return LAB_CGROUPS / f"{lab.GEN.name}-{node}"


def join_cgroup(cgroup: Path) -> None:
    """In the daemon's child before exec: move itself into ``cgroup``."""
    (cgroup / "cgroup.procs").write_text("0")


def load_state_file() -> dict[str, object]:
    try:
        data = json.loads(lab.STATE_FILE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_state() -> dict[str, dict[str, object]]:
    daemons_state = load_state_file().get("daemons", {})
    return daemons_state if isinstance(daemons_state, dict) else {}


def apply_recorded_options() -> None:
    """Make `status`/`reinstall` expect what the last `up` was asked to start."""
    options = load_state_file().get("options", {})
    if isinstance(options, dict):
        for key in ("skip_broker", "skip_dropin"):
            if options.get(key):
                os.environ[f"SSHD_ADOPT_LAB_{key.upper()}"] = "1"


def save_state(state: dict[str, dict[str, object]]) -> None:
    lab.RUN.mkdir(parents=True, exist_ok=True)
    tmp = lab.STATE_FILE.with_suffix(".tmp")
    options = {"skip_broker": skip_broker(), "skip_dropin": skip_dropin()}
    data = {"daemons": state, "options": options, "layout": layout_digest()}
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(lab.STATE_FILE)


def entry_alive(entry: dict[str, object] | None) -> bool:
    if not entry:
        return False
    pid, start = entry.get("pid"), entry.get("start")
    return isinstance(pid, int) and isinstance(start, int) and pid_matches(pid, start)


def entry_target(entry: dict[str, object]) -> tuple[int, int] | None:
    pid, start = entry.get("pid"), entry.get("start")
    if isinstance(pid, int) and isinstance(start, int):
        return pid, start
    return None


def start_daemon(d: Daemon) -> dict[str, object]:
    for path in d.stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    d.log.parent.mkdir(parents=True, exist_ok=True)
    with d.log.open("ab") as out:
        out.write(f"==== {time.strftime('%F %T')} scripts/cluster starting {d.name}\n".encode())
        out.flush()
        enter = nsenter(d.host) if d.in_root else nsenter_host_userland(d.host)
        if d.cgroup is not None:
            d.cgroup.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [*enter, *d.argv], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env=CLEAN_ENV, close_fds=True,
            preexec_fn=partial(join_cgroup, d.cgroup) if d.cgroup is not None else None,
        )
    # nsenter execs the daemon itself (no fork), so this pid is the daemon's.
    start = None
    for _ in range(50):
        start = proc_start_time(proc.pid)
        if start is not None:
            break
        time.sleep(0.01)
    if start is None:
        raise LabError(f"{d.name} exited at once; log {d.log}:\n{tail(d.log)}")
    return {"pid": proc.pid, "start": start, "host": d.host, "log": str(d.own_log or d.log),
            "argv": d.argv}


def failure(d: Daemon, why: str) -> LabError:
    logs = [d.log] + ([d.own_log] if d.own_log and d.own_log != d.log else [])
    text = f"{d.name} on {d.host}: {why}"
    for path in logs:
        text += f"\n--- tail of {path}\n{tail(path)}"
    return LabError(text)


def wait_ready(d: Daemon, entry: dict[str, object]) -> None:
    target = entry_target(entry)
    assert target is not None
    pid = target[0]

    def check() -> bool:
        reap()
        if not pid_matches(*target):
            raise failure(d, "exited during startup")
        return d.ready is None or d.ready(pid)

    if not wait_for(check, d.ready_timeout, 0.1):
        raise failure(d, f"not ready after {d.ready_timeout:.0f}s")


def stop_entries(entries: Iterable[dict[str, object]]) -> None:
    targets = [t for t in (entry_target(e) for e in entries) if t is not None]
    kill_and_wait(targets)


def validate_sshd_configs() -> None:
    for node in COMPUTE:
        for port in (22, 2222):
            cfg = lab.ETC / node / f"sshd_config-{port}"
            proc = in_host(node, "/usr/sbin/sshd", "-t", "-f", str(cfg), check=False)
            if proc.returncode != 0:
                raise LabError(f"sshd -t rejects {cfg}:\n{proc.stderr.strip()}")
