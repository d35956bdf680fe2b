"""The lab hosts' namespaces: creating them, entering them, removing them.

Each lab host (ctl, login, n1..n3) is a network + UTS + mount namespace, kept alive by
bind mounts of its /proc ns files under ``lab.NSDIR``; ``nsenter`` gives the argv prefix
that enters one (and, in a chroot generation, its root). ``mount_script`` is what runs
inside a new mount namespace: the lab's /run, /dev (with /dev/log at the lab syslog sink)
and the lab copies of /etc/slurm, /etc/hosts, /etc/ssh and /etc/pam.d.
``create_namespaces`` also wires the hosts to a bridge in ctl's network namespace, and
makes the mount namespaces where no later one gets a lower id (``next_mnt_ns_ids``: Slurm's
tmpfs job container needs that on Linux 6.18).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from functools import partial
from pathlib import Path

from . import cgroupv2
from . import generation as lab
from .generation import HOSTS, v4, v6
from .util import CLEAN_ENV, REPO, digest, run

BRIDGE = "br0"


def ns_file(host: str, kind: str) -> Path:
    return lab.NSDIR / f"{host}.{kind}"


def nsenter(host: str, *, wd: str = "/") -> list[str]:
    if lab.GEN.root is not None:
        # chroot(8) and env(1) exec, like nsenter: the pid stays the command's own.
        return [
            "nsenter", f"--net={ns_file(host, 'net')}", f"--uts={ns_file(host, 'uts')}",
            f"--mount={ns_file(host, 'mnt')}", "--wd=/", "--", "chroot", str(lab.GEN.root),
            *(["env", "-C", wd] if wd != "/" else []),
        ]
    return [
        "nsenter", f"--net={ns_file(host, 'net')}", f"--uts={ns_file(host, 'uts')}",
        f"--mount={ns_file(host, 'mnt')}", f"--wd={wd}", "--",
    ]


def nsenter_host_userland(host: str) -> list[str]:
    """A lab host's namespaces with the host's own userland (no chroot): lab helpers that
    run on the host's Python, such as the root-squash FUSE daemon."""
    return ["nsenter", f"--net={ns_file(host, 'net')}", f"--uts={ns_file(host, 'uts')}",
            f"--mount={ns_file(host, 'mnt')}", "--wd=/", "--"]


def in_host(host: str, *argv: str, check: bool = True, timeout: float = 60,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return run([*nsenter(host), *argv], check=check, timeout=timeout, input_text=input_text)


def mountpoints() -> set[str]:
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.add(line.split()[4].replace("\\040", " "))
    return points


def is_ns_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def namespaces_ok() -> bool:
    mounts = mountpoints()
    return all(
        str(ns_file(h, k)) in mounts for h in HOSTS for k in ("net", "uts", "mnt")
    )


def remove_namespaces() -> None:
    mounts = mountpoints()
    for host in HOSTS:
        for kind in ("net", "uts", "mnt"):
            path = ns_file(host, kind)
            if str(path) in mounts:
                run(["umount", "-l", str(path)], check=False)
    if str(lab.NSDIR) in mounts:
        run(["umount", "-l", str(lab.NSDIR)], check=False)


def etc_binds(host: str) -> list[tuple[Path, str]]:
    """The lab's files bound over a host's /etc: the same for every host, but /etc/ssh,
    which holds the host's own key (ssh-keysign reads it there, for hostbased logins)."""
    return [
        (lab.ETC / "slurm", "/etc/slurm"),
        (lab.ETC / "hosts", "/etc/hosts"),
        (etc_ssh(host), "/etc/ssh"),
        (lab.ETC / "pam.d", "/etc/pam.d"),
        (lab.ETC / "krb5.conf", "/etc/krb5.conf"),  # kerberos.py
    ]


def etc_ssh(host: str) -> Path:
    """A host's /etc/ssh in the lab (configs.write_etc_ssh): the generation's own, with
    the lab's ssh_config, known hosts, shosts.equiv and this host's key."""
    return lab.ETC / "etc-ssh" / host


def mount_script_root(host: str, root: Path) -> str:
    """Namespaces of a chroot generation: the same view as mount_script() gives a host,
    built under `root` (nothing is mounted under it outside the lab's mount namespaces)."""
    r = str(root)
    binds = etc_binds(host)
    lines = [
        "set -e",
        f"hostname {host}",
        "mount --make-rprivate /",
        # The root the lab's processes chroot into is a mount point, as any "/" is: Slurm's
        # tmpfs job container makes "/" private in each job's mount namespace (EINVAL on a
        # mere directory).
        f"mount --bind {r} {r}",
        f"mount --rbind /proc {r}/proc",
        f"mount --rbind /sys {r}/sys",  # brings the cgroup v1 controller mounts along
        *(cgroupv2.mount_lines(r) if cgroupv2.enabled() else []),
        f"mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m lab-run-{host} {r}/run",
        f"mkdir -p {r}{lab.RUN} {r}/run/sshd {r}/run/munge {r}/run/lock {r}/run/sshd-adopt"
        f" {r}/run/.labdev/orig {r}/run/.labdev/upper {r}/run/.labdev/work",
        f"mount --bind {lab.RUN} {r}{lab.RUN}",
        f"mount --bind {lab.RUN}/munge {r}/run/munge",
        f"mount --bind {lab.RUN}/{host} {r}/run/sshd-adopt",
        # /dev: an overlay whose /dev/log is the lab sink. Never the host's /dev/log (its
        # rsyslogd), and never a syslogd in the chroot (devtmpfs is shared with the host).
        f"mount --rbind /dev {r}/run/.labdev/orig",
        f"mount -t overlay lab-dev-{host} -o lowerdir=/dev,upperdir={r}/run/.labdev/upper,"
        f"workdir={r}/run/.labdev/work {r}/dev",
        "for sub in pts shm mqueue hugepages; do"
        f" if mountpoint -q {r}/run/.labdev/orig/$sub; then"
        f" mkdir -p {r}/dev/$sub; mount --bind {r}/run/.labdev/orig/$sub {r}/dev/$sub; fi; done",
        f"ln -sfn {lab.RUN}/dev-log {r}/dev/log",
        # Same paths inside as outside: lab state, logs, the repo (syslog sink, probes) and
        # the host's /home (same users and uids; tests read and write homes from outside).
        f"mkdir -p {r}{lab.VAR} {r}{lab.LOG} {r}{REPO}",
        f"mount --bind {lab.VAR} {r}{lab.VAR}",
        f"mount --bind {lab.LOG} {r}{lab.LOG}",
        f"mount --bind {REPO} {r}{REPO}",
        f"mount --bind /home {r}/home",
    ]
    lines += [f"mount --bind {src} {r}{dst}" for src, dst in binds]
    return "\n".join(lines) + "\n"


def mount_script(host: str) -> str:
    if lab.GEN.root is not None:
        return mount_script_root(host, lab.GEN.root)
    stage = lab.VAR / "stage" / host
    binds = etc_binds(host)
    lines = [
        "set -e",
        f"hostname {host}",
        "mount --make-rprivate /",
        # Keep the lab run dir reachable, then give the host its own /run.
        f"mount --bind {lab.RUN} {stage}",
        f"mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m lab-run-{host} /run",
        f"mkdir -p {lab.RUN} /run/sshd /run/munge /run/lock /run/.labdev/orig /run/.labdev/upper"
        " /run/.labdev/work",
        f"mount --move {stage} {lab.RUN}",
        f"mount --bind {lab.RUN}/munge /run/munge",
        # The broker's default socket dir, /run/sshd-adopt, is {RUN}/<host> seen from outside.
        f"mkdir -p /run/sshd-adopt && mount --bind {lab.RUN}/{host} /run/sshd-adopt",
        # /dev: an overlay so that /dev/log can point at the lab syslog sink.
        "mount --rbind /dev /run/.labdev/orig",
        f"mount -t overlay lab-dev-{host} -o lowerdir=/dev,upperdir=/run/.labdev/upper,"
        "workdir=/run/.labdev/work /dev",
        "for sub in pts shm mqueue hugepages; do"
        " if mountpoint -q /run/.labdev/orig/$sub; then"
        " mkdir -p /dev/$sub; mount --bind /run/.labdev/orig/$sub /dev/$sub; fi; done",
        f"ln -sfn {lab.RUN}/dev-log /dev/log",
    ]
    lines += [f"mount --bind {src} {dst}" for src, dst in binds]
    return "\n".join(lines) + "\n"


def layout_digest() -> str:
    """Changes whenever the namespaces would be set up differently (then `up` recreates)."""
    return digest(*(mount_script(h) for h in HOSTS), *(f"{h}={v4(h)},{v6(h)}" for h in HOSTS))


#: ioctl(2) on a mount namespace file: the namespace's id (linux/nsfs.h, Linux 6.8 on).
NS_GET_MNTNS_ID = 0x8008B705
#: Run in a new mount namespace: print its id.
_PROBE = ("import fcntl, struct\n"
          "with open('/proc/self/ns/mnt') as f:\n"
          f"    print(struct.unpack('Q', fcntl.ioctl(f, {NS_GET_MNTNS_ID}, bytes(8)))[0])\n")


def mnt_ns_id(path: Path) -> int | None:
    """The id of the mount namespace ``path`` (an nsfs file) names; None if the kernel
    cannot tell (before 6.8)."""
    try:
        with path.open("rb") as ns:
            raw = fcntl.ioctl(ns, NS_GET_MNTNS_ID, bytes(8))
    except OSError:
        return None
    return int(struct.unpack("Q", raw)[0])


def next_mnt_ns_ids() -> dict[int, int]:
    """The id a new mount namespace gets on each CPU this process may run on (one throwaway
    namespace per CPU); empty if the kernel cannot tell.

    Since Linux 6.18 ("mnt: support ns lookup") namespace ids come from per-CPU batches of
    a counter, so a newer namespace may have a lower id than an older one; yet the kernel
    still refuses (EINVAL, mnt_ns_loop) to bind-mount the file of a mount namespace whose id
    is not above the caller's own. Slurm's tmpfs job container does exactly that: a job's
    stepd, in its node's mount namespace, binds its child's fresh namespace onto
    ``<base>/<job>/.ns``; it fails whenever that child runs on a CPU whose batch is below the
    node namespace's id (snapd works around the same bug: canonical/snapd#17376).
    """
    ids: dict[int, int] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        proc = subprocess.run(
            ["unshare", "--mount", "--", "/usr/bin/python3", "-c", _PROBE],
            capture_output=True, text=True, env=CLEAN_ENV, check=False, timeout=30,
            preexec_fn=partial(os.sched_setaffinity, 0, {cpu}))
        if proc.returncode != 0 or not proc.stdout.strip().isdigit():
            return {}
        ids[cpu] = int(proc.stdout)
    return ids


def oldest_mnt_ns_cpu() -> int | None:
    """The CPU whose next mount namespace id is the lowest: a namespace made there has an id
    below every namespace made after it, on any CPU (see next_mnt_ns_ids)."""
    ids = next_mnt_ns_ids()
    return min(ids, key=lambda cpu: ids[cpu]) if ids else None


def pinned_to_oldest_mnt_ns_cpu() -> list[str]:
    """argv prefix (taskset) that runs a command on the CPU of oldest_mnt_ns_cpu: the mount
    namespace it makes is older by id than any made later; empty if the kernel cannot tell."""
    cpu = oldest_mnt_ns_cpu()
    return ["taskset", "--cpu-list", str(cpu)] if cpu is not None else []


def unpinned() -> list[str]:
    """argv prefix (taskset) that gives a command every CPU this process may use again."""
    return ["taskset", "--cpu-list", ",".join(map(str, sorted(os.sched_getaffinity(0))))]


def mnt_ns_below_new_ones(hosts: tuple[str, ...]) -> bool:
    """Is every one of these hosts' mount namespaces older (by id) than any namespace made
    from now on? Then the stepds in them can bind their jobs' namespaces (see
    next_mnt_ns_ids). True when the kernel cannot tell ids (they were ordered then)."""
    ids = next_mnt_ns_ids()
    if not ids:
        return True
    lowest = min(ids.values())
    for host in hosts:
        found = mnt_ns_id(ns_file(host, "mnt"))
        if found is not None and found >= lowest:
            return False
    return True


def create_namespaces() -> None:
    lab.NSDIR.mkdir(parents=True, exist_ok=True)
    # Made on the CPU with the lowest next mount namespace id, so that the hosts' mount
    # namespaces are older by id than any a job makes later (next_mnt_ns_ids).
    pin = pinned_to_oldest_mnt_ns_cpu()
    if str(lab.NSDIR) not in mountpoints():
        run(["mount", "--bind", str(lab.NSDIR), str(lab.NSDIR)])
    run(["mount", "--make-private", str(lab.NSDIR)])
    for host in HOSTS:
        (lab.VAR / "stage" / host).mkdir(parents=True, exist_ok=True)
        (lab.RUN / host).mkdir(parents=True, exist_ok=True)
        for kind in ("net", "uts", "mnt"):
            ns_file(host, kind).touch()
        run([
            *pin, "unshare", f"--net={ns_file(host, 'net')}", f"--uts={ns_file(host, 'uts')}",
            f"--mount={ns_file(host, 'mnt')}", "--propagation", "private", "--",
            "/bin/sh", "-c", mount_script(host),
        ])
    ctl_net = str(ns_file("ctl", "net"))
    batch = [
        "link set lo up",
        f"link add {BRIDGE} type bridge",
        f"link set {BRIDGE} up",
        f"addr add {v4('ctl')}/24 dev {BRIDGE}",
        f"addr add {v6('ctl')}/64 dev {BRIDGE} nodad",
    ]
    for host in HOSTS:
        if host == "ctl":
            continue
        batch += [
            f"link add v-{host} type veth peer name eth0 netns {ns_file(host, 'net')}",
            f"link set v-{host} master {BRIDGE}",
            f"link set v-{host} up",
        ]
    run(["nsenter", f"--net={ctl_net}", "ip", "-batch", "-"], input_text="\n".join(batch) + "\n")
    for host in HOSTS:
        if host == "ctl":
            continue
        batch = [
            "link set lo up",
            f"addr add {v4(host)}/24 dev eth0",
            f"addr add {v6(host)}/64 dev eth0 nodad",
            "link set eth0 up",
        ]
        run(["nsenter", f"--net={ns_file(host, 'net')}", "ip", "-batch", "-"],
            input_text="\n".join(batch) + "\n")
