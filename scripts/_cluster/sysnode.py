"""A lab compute node booted with systemd as its init (cgroup v2 generations: forky).

Every other lab host is a set of namespaces whose daemons the lab starts by hand. This one
(``HOST``, Slurm NodeName the same, address ``.21``, partition ``systemd``) boots systemd as
PID 1 of its own pid, mount, UTS, IPC and cgroup namespaces, so that the shipped unit runs
under a real service manager: slurmd, munged and sshd run from their Debian units,
``scripts/install`` installs sshd-adopt as a site would (unit, drop-in, configuration), and
logind with ``pam_systemd`` sits in sshd's PAM stack (port 22 through the drop-in; port 2222
through the real pam_slurm_adopt). What keeps the host safe, and must stay:

* its root is an overlay: the generation's root (read-only), an image layer with dbus and
  libpam-systemd (built once, ``image``), and a per-boot upper dir thrown away at ``down``;
* /sys is a fresh read-only sysfs with a cgroup2 mount on /sys/fs/cgroup whose root is the
  node's own cgroup (``cgroup_dir``, in the lab's part of the host's controller-less
  hierarchy): systemd never sees a v1 hierarchy, and removes what it made when it stops;
* /proc/sys read-only (no global sysctls), a tmpfs /dev with a few character devices, and a
  bounding set without CAP_SYS_MODULE (systemd's modprobe units would load host modules),
  CAP_SYS_TIME, CAP_SYS_RAWIO, CAP_MKNOD, CAP_BPF and the like (``DROPPED_CAPABILITIES``).

Like the other v2 nodes, slurmd runs under the lab's LD_PRELOAD shim (cgroupv2.py), named
in a drop-in of slurmd.service. The broker, in its own pid namespace, cannot follow the
kernel's proc connector (the kernel ignores subscriptions from there): it runs as on any
node without it, adopting through the wrapper and sweeping by periodic scans.

Commands: ``scripts/cluster -g forky sysnode up|down|status``; ``exec s1 -- CMD`` enters it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import cgroupv2, jobcontainer
from . import generation as lab
from .host import host_key, root_exec
from .lab_venv import VENV_DEPS
from .namespaces import BRIDGE, ns_file, pinned_to_oldest_mnt_ns_cpu, unpinned
from .util import REPO, LabError, digest, run, say, tail, wait_for

HOST = "s1"
NUM = 21
PARTITION = "systemd"
#: What the image layer adds to the generation's root: logind needs dbus, and
#: libpam-systemd puts pam_systemd into common-session (pam-auth-update).
IMAGE_PACKAGES = ("dbus", "libpam-systemd")
#: Units of the root that must not start in the node: the controller and the KDC run on
#: ctl, and the rest would only wait for hardware or the network a lab node has not got.
MASKED = ("slurmctld.service", "krb5-kdc.service", "krb5-admin-server.service",
          "console-getty.service", "getty@tty1.service",
          "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
          "e2scrub_all.timer", "fstrim.timer", "man-db.timer", "systemd-networkd-wait-online"
          ".service", "systemd-timesyncd.service")
DROPPED_CAPABILITIES = (
    "sys_module", "sys_time", "sys_rawio", "syslog", "mac_admin", "mac_override",
    "audit_control", "audit_write", "audit_read", "wake_alarm", "block_suspend", "sys_pacct",
    "mknod", "perfmon", "bpf", "checkpoint_restore", "lease", "linux_immutable")
#: Where pip finds the broker's dependencies inside the node (no index is reachable there).
WHEELS_DIR = "wheelhouse"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def supported() -> bool:
    """The node needs a cgroup v2 Slurm (systemd sees only cgroup2): forky."""
    return cgroupv2.enabled()


def address() -> str:
    return f"{lab.GEN.v4_net}{NUM}"


def address6() -> str:
    return f"{lab.GEN.v6_net}{NUM}"


def base() -> Path:
    return lab.VAR / "sysnode"


def image() -> Path:
    return base() / "image"


def node_dir() -> Path:
    return base() / HOST


def wheels() -> Path:
    return base() / WHEELS_DIR


def cgroup_dir() -> Path:
    return cgroupv2.LAB_CGROUPS / f"{lab.GEN.name}-{HOST}"


def record() -> Path:
    return lab.RUN / f"{HOST}.json"


def console_log() -> Path:
    return lab.LOG / f"{HOST}-console.log"


# ---------------------------------------------------------------------- configuration

def slurm_lines() -> tuple[str, str]:
    """slurm.conf's NodeName line for the node, and its partition (not the default one)."""
    return (f"NodeName={HOST} NodeAddr={address()}",
            f"PartitionName={PARTITION} Nodes={HOST} Default=NO MaxTime=INFINITE State=UP "
            "DefMemPerCPU=100 OverSubscribe=FORCE:8")


#: cgroup.conf on the node: as on the other v2 nodes, but slurmd asks systemd (over dbus)
#: for the scope its stepds live in, as on a real node.
CGROUP_CONF = cgroupv2.CGROUP_CONF.replace("IgnoreSystemd=yes\n", "")


def sshd_lab_conf(host_key: Path) -> str:
    """/etc/ssh/sshd_config.d/00-lab.conf: only what the lab needs (keys, logging). Read
    before the shipped drop-in; it sets none of the drop-in's global keywords."""
    return (
        "# sshd-adopt lab settings of the systemd node, written by scripts/cluster\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile .ssh/authorized_keys {lab.ETC}/authorized_keys.%u\n"
        f"TrustedUserCAKeys {lab.ETC}/user_ca.pub\n"
        "LogLevel VERBOSE\nUseDNS no\nPerSourcePenalties no\nMaxStartups 100:30:200\n"
    )


def sshd_psa_conf(host_key: Path) -> str:
    """The port-2222 sshd: the real pam_slurm_adopt in its own PAM service, sshd-psa."""
    return (
        "# reference sshd with the real pam_slurm_adopt and pam_systemd (port 2222)\n"
        "Port 2222\nPidFile /run/sshd-psa.pid\nUsePAM yes\nPAMServiceName sshd-psa\n"
        + sshd_lab_conf(host_key).split("\n", 1)[1]
        + "PubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nX11Forwarding yes\nPrintMotd no\n"
        "Subsystem sftp internal-sftp\nAcceptEnv LANG LC_*\n"
    )


PSA_UNIT = """\
[Unit]
Description=OpenSSH with the real pam_slurm_adopt (port 2222, lab reference)
After=network.target

[Service]
ExecStartPre=/usr/sbin/sshd -t -f /etc/ssh/sshd_config-psa
ExecStart=/usr/sbin/sshd -D -f /etc/ssh/sshd_config-psa
KillMode=process
Type=notify
RuntimeDirectory=sshd
RuntimeDirectoryPreserve=yes

[Install]
WantedBy=multi-user.target
"""


def pam_psa(sshd_pam: str) -> str:
    """Debian's /etc/pam.d/sshd (pam_systemd through common-session) with pam_slurm_adopt
    in its account stack, as a site following Slurm's README but keeping logind would."""
    line = ("account    required     pam_slurm_adopt.so service=sshd-psa "
            "action_adopt_failure=deny log_level=debug")
    if "@include common-account" not in sshd_pam:
        raise LabError("the root's /etc/pam.d/sshd has no '@include common-account'")
    return sshd_pam.replace("@include common-account", f"@include common-account\n{line}", 1)


def write_upper(upper: Path, host_key: Path) -> None:
    """The node's own files, written into the overlay's upper dir before it boots."""
    def put(path: str, text: str, mode: int = 0o644) -> None:
        target = upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)

    put("/etc/hostname", f"{HOST}\n")
    put("/etc/machine-id", digest(lab.GEN.name, HOST, str(time.time_ns()))[:32] + "\n")
    put("/etc/slurm/cgroup.conf", CGROUP_CONF)
    put("/etc/systemd/system/slurmd.service.d/lab.conf",
        "# the lab's cgroup v2 shim (scripts/_cluster/cgroupv2.py)\n"
        f"[Service]\nEnvironment=LD_PRELOAD={cgroupv2.shim()}\n")
    put("/etc/ssh/sshd_config.d/00-lab.conf", sshd_lab_conf(host_key))
    put("/etc/ssh/sshd_config-psa", sshd_psa_conf(host_key))
    put("/etc/systemd/system/ssh-psa.service", PSA_UNIT)
    sshd_pam = (image() / "etc/pam.d/sshd")
    if not sshd_pam.exists():
        sshd_pam = lab.GEN.in_root("/etc/pam.d/sshd")
    put("/etc/pam.d/sshd-psa", pam_psa(sshd_pam.read_text()))
    wants = upper / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "ssh-psa.service").symlink_to("/etc/systemd/system/ssh-psa.service")
    for unit in MASKED:
        (upper / "etc/systemd/system" / unit).symlink_to("/dev/null")


def stage_script(upper: Path, work: Path, merged: Path) -> str:
    """PID 1 of the new namespaces (the host's userland): join the node's cgroup, then a
    new cgroup namespace rooted there; build the root, pivot into it, exec systemd."""
    r = str(merged)
    lower = f"{image()}:{lab.GEN.root}"
    binds = [(lab.VAR, lab.VAR), (lab.LOG, lab.LOG), (lab.RUN, lab.RUN), (REPO, REPO),
             (Path("/home"), Path("/home")), (lab.ETC / "hosts", Path("/etc/hosts")),
             (lab.ETC / "ssh_config", Path("/etc/ssh/ssh_config")),
             (lab.ETC / "slurm" / "slurm.conf", Path("/etc/slurm/slurm.conf"))]
    if jobcontainer.enabled() and jobcontainer.conf_path().is_file():  # slurm.conf names it
        binds.append((jobcontainer.conf_path(), Path(f"/etc/slurm/{jobcontainer.CONF_NAME}")))
    bounding = ",".join(f"-{cap}" for cap in DROPPED_CAPABILITIES)
    lines = [
        "set -e",
        f"mount -t overlay lab-{HOST} -o lowerdir={lower},upperdir={upper},workdir={work} {r}",
        f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc",
        f"mount --bind {r}/proc/sys {r}/proc/sys",
        f"mount -o remount,bind,ro {r}/proc/sys",
        f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {r}/sys",
        f"mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 {r}/sys/fs/cgroup",
        f"mount -t tmpfs -o mode=755,nosuid,size=16m dev {r}/dev",
        "for d in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do"
        f' IFS=: read n a b <<<"$d"; mknod -m 666 {r}/dev/$n c $a $b; done',
        f"mkdir {r}/dev/pts {r}/dev/shm",
        f"mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts"
        f" {r}/dev/pts",
        f"ln -s pts/ptmx {r}/dev/ptmx",
        f"mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m shm {r}/dev/shm",
        f"ln -s /proc/self/fd {r}/dev/fd",
        f"ln -s /proc/self/fd/0 {r}/dev/stdin; ln -s /proc/self/fd/1 {r}/dev/stdout;"
        f" ln -s /proc/self/fd/2 {r}/dev/stderr",
        f"touch {r}/dev/console; mount --bind {console_log()} {r}/dev/console",
        f"mount -t tmpfs -o mode=755,nosuid,nodev,size=64m run {r}/run",
        f"mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m tmp {r}/tmp",
    ]
    for src, dst in binds:
        kind = "-d" if src.is_dir() else "-f"
        make = f"mkdir -p {r}{dst}" if src.is_dir() else f"touch {r}{dst}"
        lines.append(f"[ {kind} {r}{dst} ] || {make}; mount --bind {src} {r}{dst}")
    lines += [
        f"cd {r}; mkdir -p .oldroot; pivot_root . .oldroot",
        "exec /usr/sbin/chroot . /bin/sh -c 'umount -l /.oldroot && rmdir /.oldroot && "
        "exec /usr/bin/env -i container=sshd-adopt-lab TERM=dumb "
        f"/usr/bin/setpriv --bounding-set {bounding} -- /usr/lib/systemd/systemd "
        "systemd.unit=multi-user.target'",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- build steps

def ensure_image() -> None:
    """The image layer (``IMAGE_PACKAGES`` over the generation's root), built once per
    root: a stamp names the packages and the root's dpkg status it was built on."""
    status = lab.GEN.in_root("/var/lib/dpkg/status")
    want = digest(" ".join(IMAGE_PACKAGES), status.read_bytes())
    stamp = base() / "image.stamp"
    if image().is_dir() and stamp.is_file() and stamp.read_text() == want:
        return
    say(f"{HOST}: building the image layer ({', '.join(IMAGE_PACKAGES)})")
    for path in (image(), Path(f"{image()}.work"), Path(f"{image()}.merged")):
        shutil.rmtree(path, ignore_errors=True)
    root_exec(["sh", "-ec", "apt-get update -q >/dev/null; apt-get install -y -q "
               f"--no-install-recommends {' '.join(IMAGE_PACKAGES)} >/dev/null; apt-get clean;"
               " rm -rf /var/lib/apt/lists/*"], layer=image(), timeout=900)
    for path in (Path(f"{image()}.work"), Path(f"{image()}.merged")):
        shutil.rmtree(path, ignore_errors=True)
    stamp.write_text(want)


def ensure_wheels() -> None:
    """The broker's dependencies as wheels for the root's Python: scripts/install runs in
    the node with ``PIP_NO_INDEX`` and this directory as ``PIP_FIND_LINKS``."""
    deps = [d for d in VENV_DEPS if not d.startswith(("pytest", "hypothesis"))]
    stamp = wheels() / ".deps"
    if stamp.is_file() and stamp.read_text() == " ".join(deps):
        return
    say(f"{HOST}: downloading wheels for the node's install")
    wheels().mkdir(parents=True, exist_ok=True)
    root_exec([str(lab.VENV / "bin" / "pip"), "download", "-q", "-d", str(wheels()), *deps],
              timeout=900)
    stamp.write_text(" ".join(deps))


def ensure_network() -> None:
    """The node's network namespace, wired to the lab's bridge like every host."""
    net = ns_file(HOST, "net")
    if net.exists() and str(net) in _mountpoints():
        return
    net.touch()
    run(["unshare", f"--net={net}", "true"])
    run(["nsenter", f"--net={ns_file('ctl', 'net')}", "ip", "-batch", "-"], input_text=(
        f"link add v-{HOST} type veth peer name eth0 netns {net}\n"
        f"link set v-{HOST} master {BRIDGE}\nlink set v-{HOST} up\n"))
    run(["nsenter", f"--net={net}", "ip", "-batch", "-"], input_text=(
        f"link set lo up\naddr add {address()}/24 dev eth0\n"
        f"addr add {address6()}/64 dev eth0 nodad\nlink set eth0 up\n"))


def _mountpoints() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


# ---------------------------------------------------------------------- running

def init_pid() -> int | None:
    """The host pid of the node's systemd, if it runs."""
    try:
        data = json.loads(record().read_text())
        unshare = int(data["unshare"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
        if Path(f"/proc/{unshare}/cmdline").read_bytes().split(b"\0")[0] != b"unshare":
            return None
    except OSError:
        return None
    return int(children[0]) if children else None


def enter(*argv: str) -> list[str]:
    """argv that runs ``argv`` as root inside the node (all its namespaces, its root)."""
    pid = init_pid()
    if pid is None:
        raise LabError(f"the systemd node {HOST} is not running (scripts/cluster -g "
                       f"{lab.GEN.name} sysnode up)")
    return ["nsenter", "-t", str(pid), "-a", "--", "/usr/bin/env", "-i", f"PATH={PATH}",
            "TERM=dumb", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "HOME=/root", "LANG=C.UTF-8",
            *argv]


def in_node(*argv: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return run(enter(*(["/usr/bin/env", *extra] if extra else []), *argv), check=check,
               timeout=timeout)


def boot() -> None:
    node = node_dir()
    shutil.rmtree(node, ignore_errors=True)
    upper, work, merged = node / "upper", node / "work", node / "merged"
    for path in (upper, work, merged):
        path.mkdir(parents=True)
    write_upper(upper, host_key(HOST))
    cgroup_dir().mkdir(parents=True, exist_ok=True)
    lab.LOG.mkdir(parents=True, exist_ok=True)
    console_log().write_bytes(b"")
    stage = node / "stage.sh"
    stage.write_text(stage_script(upper, work, merged))
    inner = (f"echo 0 > {cgroup_dir()}/cgroup.procs && "
             f"exec unshare --cgroup /bin/bash {stage}")
    with console_log().open("ab") as log:
        proc = subprocess.Popen(
            # its mount namespace older by id than its jobs' (namespaces.next_mnt_ns_ids);
            # the node itself on every CPU again
            ["nsenter", f"--net={ns_file(HOST, 'net')}", "--", *pinned_to_oldest_mnt_ns_cpu(),
             "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--propagation",
             "private", "--kill-child", *unpinned(), "/bin/sh", "-c", inner],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env={"PATH": PATH})
    record().write_text(json.dumps({"unshare": proc.pid}) + "\n")
    if not wait_for(lambda: init_pid() is not None, 10):
        raise LabError(f"{HOST}: systemd did not start:\n{tail(console_log())}")
    state = ""
    for _ in range(2):
        proc2 = in_node("systemctl", "is-system-running", "--wait", check=False, timeout=120)
        state = proc2.stdout.strip()
        if state in ("running", "degraded"):
            break
        time.sleep(1)
    if state != "running":
        failed = in_node("systemctl", "--failed", "--no-legend", check=False).stdout
        raise LabError(f"{HOST}: systemd says {state!r}; failed units:\n{failed}"
                       f"\n--- console\n{tail(console_log())}")


def install_broker() -> None:
    """scripts/install in the node, as an admin runs it; then start the unit and reload
    sshd, the two steps its summary names."""
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels())}
    proc = in_node("systemd-run", "--wait", "--pipe", "--collect", "-q",
                   *(f"--setenv={k}={v}" for k, v in env.items()),
                   str(REPO / "scripts" / "install"), check=False, timeout=600)
    if proc.returncode != 0:
        raise LabError(f"{HOST}: scripts/install failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    in_node("systemctl", "enable", "--now", "sshd-adoptd", timeout=60)
    in_node("sh", "-c", "sshd -t && systemctl reload ssh", timeout=30)


def cmd_up() -> None:
    if not supported():
        raise LabError(f"the systemd node needs a cgroup v2 generation (forky), not "
                       f"{lab.GEN.name}")
    if not (lab.NSDIR / "ctl.net").exists():
        raise LabError(f"the {lab.GEN.name} lab is not up (scripts/cluster -g "
                       f"{lab.GEN.name} up)")
    if init_pid() is not None:
        say(f"{HOST}: already running (pid {init_pid()})")
        return
    t0 = time.monotonic()
    cmd_down(quiet=True)
    ensure_image()
    ensure_wheels()
    ensure_network()
    boot()
    install_broker()
    say(f"{HOST}: up in {time.monotonic() - t0:.1f}s (systemd pid {init_pid()}); "
        f"enter with: scripts/cluster -g {lab.GEN.name} exec {HOST} -- CMD")


def cmd_down(quiet: bool = False) -> None:
    """Power the node off (systemd's SIGRTMIN+4), end what is left, remove its cgroups,
    network namespace and upper dir."""
    pid = init_pid()
    if pid is not None:
        if not quiet:
            say(f"{HOST}: powering off")
        os.kill(pid, signal.SIGRTMIN + 4)
        wait_for(lambda: init_pid() is None, 30, 0.5)
    kill = cgroup_dir() / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
        wait_for(lambda: not (cgroup_dir() / "cgroup.procs").read_text().strip()
                 if (cgroup_dir() / "cgroup.procs").exists() else True, 10)
    if cgroup_dir().is_dir():
        for path in sorted((p for p in cgroup_dir().rglob("*") if p.is_dir()),
                           key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            cgroup_dir().rmdir()
    net = ns_file(HOST, "net")
    if str(net) in _mountpoints():
        run(["umount", "-l", str(net)], check=False)
    with contextlib.suppress(FileNotFoundError):
        net.unlink()
    record().unlink(missing_ok=True)
    shutil.rmtree(node_dir(), ignore_errors=True)


def cmd_status() -> int:
    pid = init_pid()
    if pid is None:
        print(f"{HOST}: not running")
        return 1
    state = in_node("systemctl", "is-system-running", check=False).stdout.strip()
    units = in_node("systemctl", "is-active", "slurmd", "munge", "ssh", "ssh-psa",
                    "sshd-adoptd", "systemd-logind", check=False).stdout.split()
    print(f"{HOST}: systemd pid {pid}, {state}; slurmd, munge, ssh, ssh-psa, sshd-adoptd, "
          f"logind: {' '.join(units)}")
    return 0 if state == "running" else 1
