"""What the lab needs on the machine itself: packages, a chroot root, users, munge key.

The bookworm generation uses the host's own userland (``ensure_packages`` apt-installs
``PACKAGES``); a chroot generation gets a Debian root built once with debootstrap
(``ensure_root``; ``root_exec`` runs a command inside it). The lab users and groups
(``USERS``, ``GROUPS``) are created on the host with ssh keys, and with the same ids in a
chroot root; the lab binds the host's /home, so homes and keys are shared.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from . import generation as lab
from .util import CLEAN_ENV, LabError, run, say

#: What the lab needs on the host (the bookworm generation uses the host's own userland).
PACKAGES = (
    "munge", "slurmctld", "slurmd", "slurm-client", "libpam-slurm-adopt", "openssh-server",
    "openssh-client", "iproute2", "iptables", "python3-venv", "xauth", "procps", "psmisc",
    "rsync", "util-linux", "zsh", "python3-fusepy",
    # systemd-analyze and man(1): the shipped unit is verified as installed
    "systemd", "man-db",
    # the cgroup v2 generation's lab-only LD_PRELOAD library for slurmd (cgroupv2.py)
    "gcc", "libc6-dev",
    # X11 jobs end to end: alice's X server on the login host, X clients on the nodes
    "xvfb", "x11-utils",
    # GSSAPI logins: the lab's Kerberos realm (kerberos.py), kinit on the login host
    "krb5-kdc", "krb5-admin-server", "krb5-user",
)
# Packages of a chroot generation (installed inside it, with policy-rc.d in place).
ROOT_PACKAGES = (
    "munge", "slurmctld", "slurmd", "slurm-client", "libpam-slurm-adopt", "openssh-server",
    "openssh-client", "python3", "python3-venv", "iproute2", "procps", "psmisc", "rsync",
    "util-linux", "xauth", "ca-certificates", "iptables", "zsh", "xvfb", "x11-utils",
    "krb5-kdc", "krb5-admin-server", "krb5-user",
)


def root_packages() -> tuple[str, ...]:
    """ROOT_PACKAGES with the generation's own OpenSSH packages (Generation.ssh_packages)."""
    swap = dict(zip(("openssh-server", "openssh-client"), lab.GEN.ssh_packages, strict=True))
    return tuple(swap.get(name, name) for name in ROOT_PACKAGES)
#: Where the host's /etc/ssl/certs is visible (read-only) inside a generation's root.
HOST_CERTS = "/run/sshd-adopt-host-certs"
#: The host's python3 (lab helpers that run on the host's userland, the bookworm venv).
SYSTEM_PYTHON = "/usr/bin/python3"

USERS = {"alice": 2001, "bob": 2002, "carol": 2003, "zoe": 2004, "erin": 2005, "fay": 2006}
#: Login shells other than bash: zoe's zsh reads ~/.zshenv for every `zsh -c`.
SHELLS = {"zoe": "/usr/bin/zsh"}
#: alice, bob: managed users (bash); carol: an admin the drop-in leaves out; zoe: a managed
#: zsh user; erin: a local account in neither group (deployment, monitoring); fay: a managed
#: user whose home root cannot read on the compute nodes (see scripts/_cluster/rootsquash.py).
GROUPS = {"slurmusers": (2100, ("alice", "bob", "zoe", "fay")),
          "clusteradm": (2101, ("carol",))}
#: The user whose home root cannot read on the compute nodes (rootsquash.py).
SQUASHED_USER = "fay"


def have_packages(names: Sequence[str]) -> list[str]:
    proc = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *names],
               check=False)
    installed = {
        line.split()[0] for line in proc.stdout.splitlines()
        if len(line.split()) > 1 and line.split()[1].startswith("ii")
    }
    return [n for n in names if n not in installed]


def ensure_packages() -> None:
    if lab.GEN.root is not None:
        ensure_root()
        return
    missing = have_packages(PACKAGES)
    if not missing:
        return
    say(f"installing packages: {' '.join(missing)}")
    ensure_host_packages(missing)


def host_key(node: str) -> Path:
    """The ed25519 host key of a lab node's sshds (made by configs.write_configs)."""
    return lab.VAR / "ssh" / node / "ssh_host_ed25519_key"


def root_exec(argv: Sequence[str], *, timeout: float = 600, check: bool = True,
              input_text: str | None = None,
              layer: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` in the generation's root (for building it; the lab itself is not needed):
    a private mount namespace with /dev, /proc, the lab state dir and the host's local
    package indexes (pip configuration) bound in, then chroot. With `layer`, the root is
    the lower layer of an overlay and every change lands in `layer` (a directory; its
    sibling `<layer>.work` is overlayfs' work dir), the root itself stays as it was."""
    assert lab.GEN.root is not None
    r = str(lab.GEN.root)
    lab.VAR.mkdir(parents=True, exist_ok=True)
    mounts = []
    if layer is not None:
        merged, work = Path(f"{layer}.merged"), Path(f"{layer}.work")
        for path in (layer, merged, work):
            path.mkdir(parents=True, exist_ok=True)
        mounts.append(f"mount -t overlay lab-layer -o lowerdir={r},upperdir={layer},"
                      f"workdir={work} {merged}")
        r = str(merged)
    mounts += [f"mount --rbind /dev {r}/dev", f"mount -t proc proc {r}/proc",
              f"mkdir -p {r}{lab.VAR} && mount --bind {lab.VAR} {r}{lab.VAR}"]
    # The host's CA bundle (it may hold a site proxy's CA that pip needs), READ-ONLY and at a
    # path of its own: bound over the root's /etc/ssl/certs, apt's ca-certificates trigger in
    # the root would rewrite the HOST's bundle through the bind mount (it did, once, and
    # dropped the proxy's CA: every pip on the host then failed certificate checks).
    mounts += [f"mkdir -p {r}{HOST_CERTS} && mount --bind /etc/ssl/certs {r}{HOST_CERTS} "
               f"&& mount -o remount,bind,ro {r}{HOST_CERTS}"]
    mounts += [f"mkdir -p {r}{extra} && mount --bind {extra} {r}{extra}"
               for extra in ("/opt/pypi", "/opt/pypi-more", "/opt/wheels")
               if Path(extra).is_dir()]
    script = " && ".join(mounts) + f' && exec chroot {r} "$@"'
    bundle = f"{HOST_CERTS}/ca-certificates.crt"
    env = ["env", "-i", f"PATH={CLEAN_ENV['PATH']}", "LANG=C.UTF-8", "HOME=/root",
           "DEBIAN_FRONTEND=noninteractive", f"PIP_CERT={bundle}", f"SSL_CERT_FILE={bundle}",
           f"REQUESTS_CA_BUNDLE={bundle}"]
    return run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
                "sh", *env, *argv], timeout=timeout, check=check, input_text=input_text)


def host_mirror() -> str:
    """The host's Debian mirror: the first URIs: line of its deb822 sources."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    for line in sources.read_text().splitlines():
        if line.startswith("URIs:") and line.split()[1:]:
            return line.split()[1]
    raise LabError(f"no URIs: line in {sources}")


def ensure_root() -> None:
    """Build (once) and cache the generation's Debian root, with root_packages() installed.

    policy-rc.d exists before apt runs: otherwise maintainer scripts would start munged,
    slurmd and sshd in the host's network namespace."""
    root = lab.GEN.root
    assert root is not None
    stamp = root / ".sshd-adopt-lab-root"
    packages = root_packages()
    if stamp.is_file() and stamp.read_text() == " ".join(packages):
        return
    if not (root / "usr" / "lib" / "os-release").is_file():
        if not shutil.which("debootstrap"):
            ensure_host_packages(["debootstrap"])
        tmp = root.with_name(root.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        mirror = host_mirror()
        say(f"building the {lab.GEN.suite} root {root} (debootstrap from {mirror}; 1-3 minutes)")
        t0 = time.monotonic()
        # bookworm's debootstrap has no script for suites newer than it knows (forky): sid's
        # script builds any current suite.
        scripts = Path("/usr/share/debootstrap/scripts")
        script = [] if (scripts / lab.GEN.suite).exists() else [str(scripts / "sid")]
        run(["debootstrap", "--variant=minbase", lab.GEN.suite, str(tmp), mirror, *script],
            timeout=1800)
        policy = tmp / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\n# sshd-adopt lab: never start daemons from apt\nexit 101\n")
        os.chmod(policy, 0o755)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        say(f"debootstrap done ({time.monotonic() - t0:.0f}s)")
    if not (root / "usr" / "sbin" / "policy-rc.d").exists():
        raise LabError(f"{root}/usr/sbin/policy-rc.d is missing: refusing to run apt there")
    for conf in ("/etc/pip.conf", "/root/.config/pip/pip.conf"):
        if Path(conf).is_file():
            target = lab.GEN.in_root(conf)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(conf, target)
    # Testing suites (forky) sign Release files valid for a week only; a mirror that is not
    # refreshed daily then fails `apt-get update`. The lab root takes the mirror as it is.
    (root / "etc" / "apt" / "apt.conf.d" / "99sshd-adopt-lab").write_text(
        'Acquire::Check-Valid-Until "false";\n')
    say(f"installing packages in {root}: {' '.join(packages)}")
    t0 = time.monotonic()
    root_exec(["sh", "-c", "apt-get update -q && apt-get install -y -q "
               "--no-install-recommends \"$@\" && apt-get clean", "sh", *packages],
              timeout=1800)
    stamp.write_text(" ".join(packages))
    say(f"packages installed ({time.monotonic() - t0:.0f}s)")


def ensure_host_packages(names: Sequence[str]) -> None:
    env = dict(CLEAN_ENV, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", *names]):
        proc = subprocess.run(argv, env=env, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}{proc.stderr}")


def lab_ids(name: str) -> tuple[int, int]:
    """(uid, gid) of a user as the lab's userland knows it (a chroot has its own passwd:
    e.g. munge is uid 100 in trixie)."""
    if lab.GEN.root is None:
        pw = pwd.getpwnam(name)
        return pw.pw_uid, pw.pw_gid
    for line in lab.GEN.in_root("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise LabError(f"no user {name} in {lab.GEN.in_root('/etc/passwd')}")


def ensure_root_users() -> None:
    """The lab users with the host's uids, gids, homes and groups (the lab binds the host's
    /home, so keys and files are the same ones)."""
    ensure_users()  # on the host first: they are the source of truth
    passwd = lab.GEN.in_root("/etc/passwd").read_text()
    group = lab.GEN.in_root("/etc/group").read_text()
    have_users = {line.split(":")[0] for line in passwd.splitlines()}
    have_groups = {line.split(":")[0]: line for line in group.splitlines()}
    commands: list[str] = []
    wanted_groups = {**{g: gid for g, (gid, _m) in GROUPS.items()}}
    for user in USERS:
        pw = pwd.getpwnam(user)
        wanted_groups[grp.getgrgid(pw.pw_gid).gr_name] = pw.pw_gid
    for name, gid in wanted_groups.items():
        if name not in have_groups:
            commands.append(f"groupadd -g {gid} {name}")
    for user in USERS:
        pw = pwd.getpwnam(user)
        if user not in have_users:
            commands.append(f"useradd -M -d {pw.pw_dir} -s {SHELLS.get(user, '/bin/bash')} "
                            f"-u {pw.pw_uid} -g {pw.pw_gid} -p '*' {user}")
        else:
            commands.append(f"usermod -s {SHELLS.get(user, '/bin/bash')} {user}")
    # issue 5: the gate's AuthorizedKeysCommandUser, a locked system user (see ensure_users).
    if "sshd-adopt-gate" not in have_users:
        commands.append("useradd -r -M -d /nonexistent -s /usr/sbin/nologin -U sshd-adopt-gate")
    for name, (_gid, members) in GROUPS.items():
        line = have_groups.get(name, "")
        current = set(line.rsplit(":", 1)[1].split(",")) if line else set()
        commands += [f"gpasswd -a {member} {name} >/dev/null" for member in members
                     if member not in current]
    if commands:
        say(f"creating lab users in {lab.GEN.root}")
        root_exec(["sh", "-ec", "; ".join(commands)], timeout=120)


def ensure_munge_key() -> None:
    """The lab shares the host's munge key; Debian's postinst creates it, but be sure."""
    if lab.GEN.root is not None:
        # apt generated the root's own key: each generation has its own.
        if not lab.GEN.in_root("/etc/munge/munge.key").exists():
            root_exec(["sh", "-c", "mungekey --create --keyfile=/etc/munge/munge.key && "
                       "chown munge:munge /etc/munge/munge.key && "
                       "chmod 600 /etc/munge/munge.key"])
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        say(f"creating {key}")
        run(["mungekey", "--create", f"--keyfile={key}"])
        munge = pwd.getpwnam("munge")
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)


def ensure_users() -> None:
    for group, (gid, _members) in GROUPS.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            gid_free = True
            try:
                grp.getgrgid(gid)
                gid_free = False
            except KeyError:
                pass
            run(["groupadd", *(["-g", str(gid)] if gid_free else []), group])
    for user, uid in USERS.items():
        try:
            pwd.getpwnam(user)
        except KeyError:
            uid_free = True
            try:
                pwd.getpwuid(uid)
                uid_free = False
            except KeyError:
                pass
            run(["useradd", "-m", "-s", SHELLS.get(user, "/bin/bash"), "-U",
                 *(["-u", str(uid)] if uid_free else []), user])
        run(["usermod", "-p", "*", "-s", SHELLS.get(user, "/bin/bash"), user])
    for group, (_gid, members) in GROUPS.items():
        current = set(grp.getgrnam(group).gr_mem)
        for member in members:
            if member not in current:
                run(["gpasswd", "-a", member, group])
    for user in USERS:
        ensure_user_ssh(user)
    # A 0700 home: behind the root-squash mount on the compute nodes, root cannot read it.
    os.chmod(pwd.getpwnam(SQUASHED_USER).pw_dir, 0o700)
    # issue 5: the gate's AuthorizedKeysCommandUser (sshd_config.d/sshd-adopt.conf), a locked
    # system user without a home, as EC2 Instance Connect does for its own command.
    try:
        pwd.getpwnam("sshd-adopt-gate")
    except KeyError:
        run(["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
             "-U", "sshd-adopt-gate"])


def ensure_user_ssh(user: str) -> None:
    pw = pwd.getpwnam(user)
    home = Path(pw.pw_dir)
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    key = ssh_dir / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{user}@sshd-adopt-lab",
             "-f", str(key)])
    pub = (ssh_dir / "id_ed25519.pub").read_text()
    auth = ssh_dir / "authorized_keys"
    existing = auth.read_text() if auth.exists() else ""
    if pub.strip() not in existing:
        auth.write_text(existing + pub)
    (ssh_dir / "config").write_text(
        "# written by sshd-adopt scripts/cluster\n"
        "Host *\n    BatchMode yes\n    StrictHostKeyChecking yes\n"
    )
    for path in (ssh_dir, key, ssh_dir / "id_ed25519.pub", auth, ssh_dir / "config"):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    for path in (key, auth, ssh_dir / "config"):
        os.chmod(path, 0o600)
    os.chmod(ssh_dir, 0o700)
