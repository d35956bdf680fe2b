"""Every lab configuration file, written from the selected generation and scripts/lab/*.in.

``write_configs`` writes slurm.conf and cgroup.conf (and job_container.conf while the lab
runs Slurm's tmpfs job container: jobcontainer.py), /etc/hosts, host keys, known_hosts and
ssh_config, the lab's PAM services, each compute node's sshd-adopt.toml, the shipped
drop-in (``DROPIN``, with its @PLACEHOLDERS@ filled in) and the two sshd configs per node
(port 22: sshd-adopt; port 2222: the real pam_slurm_adopt). It returns a digest per daemon
of what that daemon depends on: ``up`` restarts a daemon whose digest changed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import cgroupv2, jobcontainer, kerberos, sysnode
from . import generation as lab
from .generation import COMPUTE, HOSTS, sname, v4, v6
from .host import host_key, lab_ids
from .lab_venv import repo_digest
from .namespaces import etc_ssh
from .util import REPO, digest, fill, run, write_if_changed

# The shipped drop-in; SSHD_ADOPT_LAB_DROPIN=PATH tries another one.
DROPIN = Path(os.environ.get("SSHD_ADOPT_LAB_DROPIN") or REPO / "sshd_config.d" / "sshd-adopt.conf")


def cgroup_version() -> int:
    if Path("/sys/fs/cgroup/memory/tasks").exists() and Path("/sys/fs/cgroup/freezer").is_dir():
        return 1
    return 2


def broker_exe() -> Path:
    return lab.VENV / "bin" / "sshd-adoptd"


def skip_broker() -> bool:
    return os.environ.get("SSHD_ADOPT_LAB_SKIP_BROKER", "") not in ("", "0")


def skip_dropin() -> bool:
    return os.environ.get("SSHD_ADOPT_LAB_SKIP_DROPIN", "") not in ("", "0")


def sshd_supports(keyword: str) -> bool:
    """Does this sshd know `keyword`? (Its keyword table is lower-case text in the binary;
    `sshd -T` needs /run/sshd, which only exists inside the lab namespaces.)"""
    return keyword.lower().encode() in lab.GEN.in_root("/usr/sbin/sshd").read_bytes()


#: Lab hosts whose users may log in elsewhere by hostbased authentication.
HOSTBASED_CLIENTS = ("login", *COMPUTE)


def write_etc_ssh() -> None:
    """Each lab host's /etc/ssh (bound there by namespaces.etc_binds): the generation's
    own files but its host keys, plus the lab's ssh_config, ssh_known_hosts (sshd reads
    the system one for hostbased logins), shosts.equiv (the lab hosts' addresses: sshd
    checks the client's address, UseDNS being off) and the host's own ed25519 key, which
    ssh-keysign reads from /etc/ssh only."""
    equiv = "".join(f"{v4(h)}\n{v6(h)}\n" for h in HOSTBASED_CLIENTS)
    lab_files = {"ssh_config": (lab.ETC / "ssh_config").read_text(),
                 "ssh_known_hosts": (lab.ETC / "ssh_known_hosts").read_text(),
                 "shosts.equiv": equiv}
    for host in HOSTS:
        target = etc_ssh(host)
        target.mkdir(parents=True, exist_ok=True)
        run(["rsync", "-a", "--delete", "--exclude", "ssh_host_*",
             *(arg for name in lab_files for arg in ("--exclude", name)),
             f"{lab.GEN.in_root('/etc/ssh')}/", f"{target}/"])
        for name, text in lab_files.items():
            write_if_changed(target / name, text)
        key = host_key(host)
        if key.exists():
            write_if_changed(target / key.name, key.read_text(), mode=0o600)
            write_if_changed(target / f"{key.name}.pub", Path(f"{key}.pub").read_text())


def write_configs() -> dict[str, str]:
    """Write every lab config file; return a digest per daemon of what it depends on."""
    for directory in (lab.RUN, lab.VAR, lab.ETC, lab.LOG):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
    slurm = lab_ids("slurm")
    munge = lab_ids("munge")
    values = {"VAR": str(lab.VAR), "RUN": str(lab.RUN), "LOG": str(lab.LOG),
              "PREFIX": str(lab.VENV)}

    node_lines = [f"NodeName={sname(n)} NodeAddr={v4(n)}" for n in COMPUTE]
    more_partitions = ""
    if sysnode.supported():  # the systemd-booted node, in a partition of its own
        node_line, more_partitions = sysnode.slurm_lines()
        node_lines.append(node_line)
    slurm_conf = fill(
        "slurm.conf.in", CLUSTER=lab.GEN.cluster_name, CTL_ADDR=v4("ctl"),
        NODES="\n".join(node_lines), MORE_PARTITIONS=more_partitions,
        NODELIST=",".join(sname(n) for n in COMPUTE) if lab.GEN.root is not None else "n[1-3]",
        **values) + jobcontainer.slurm_conf_lines()
    if cgroupv2.enabled():
        cgroup_conf = cgroupv2.CGROUP_CONF
    elif cgroup_version() == 1:
        cgroup_conf = (
            "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainCores=yes\n"
            "ConstrainRAMSpace=yes\nConstrainDevices=no\n"
        )
    else:
        cgroup_conf = "CgroupPlugin=cgroup/v2\nConstrainCores=yes\nConstrainRAMSpace=yes\n"
    write_if_changed(lab.ETC / "slurm" / "slurm.conf", slurm_conf)
    write_if_changed(lab.ETC / "slurm" / "cgroup.conf", cgroup_conf)
    # The tmpfs job container (`job-container on`, jobcontainer.py): job_container.conf
    # for every node of slurm.conf; nothing (and the digest as before) when it is off.
    container_conf = jobcontainer.write_conf(
        [sname(n) for n in COMPUTE] + ([sysnode.HOST] if sysnode.supported() else []))
    slurm_digest = digest(slurm_conf, cgroup_conf, *([container_conf] if container_conf else []),
                          cgroupv2.ensure_shim() if cgroupv2.enabled() else "")

    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    # Slurm NodeNames that differ from the host name are aliases of it.
    hosts += [f"{v4(h)}\t{h}" + (f" {sname(h)}" if sname(h) != h else "") for h in HOSTS]
    hosts += [f"{v6(h)}\t{h}-v6" + (f" {sname(h)}-v6" if sname(h) != h else "")
              for h in HOSTS]
    if sysnode.supported():
        hosts += [f"{sysnode.address()}\t{sysnode.HOST}",
                  f"{sysnode.address6()}\t{sysnode.HOST}-v6"]
    write_if_changed(lab.ETC / "hosts", "\n".join(hosts) + "\n")

    # Host keys and the lab-wide known_hosts. The login host has a key too: it signs
    # hostbased logins (ssh-keysign) like the compute nodes.
    known = []
    for node in ["login", *COMPUTE, *([sysnode.HOST] if sysnode.supported() else [])]:
        key = host_key(node)
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node}.lab",
                 "-f", str(key)])
        pub = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        if node == sysnode.HOST:
            names = [node, f"{node}-v6", sysnode.address(), sysnode.address6()]
        else:
            names = [node, f"{node}-v6", v4(node), v6(node)]
        if sname(node) != node:
            names += [sname(node), f"{sname(node)}-v6"]
        names += [f"[{n}]:2222" for n in names]
        known.append(f"{','.join(names)} {pub}")
    write_if_changed(lab.ETC / "ssh_known_hosts", "\n".join(known) + "\n")
    # root's lab key lives in the lab state dir, not in the host's /root/.ssh:
    # the lab sshds also read {ETC}/authorized_keys.%u and the lab ssh_config
    # offers {ETC}/id_ed25519.%u, so nothing of root's own ssh setup changes.
    root_key = lab.ETC / "id_ed25519.root"
    if not root_key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@sshd-adopt-lab",
             "-f", str(root_key)])
    write_if_changed(lab.ETC / "authorized_keys.root", Path(f"{root_key}.pub").read_text())
    # A user CA (TrustedUserCAKeys on every lab sshd): tests sign users' keys with it.
    user_ca = lab.ETC / "user_ca"
    if not user_ca.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshd-adopt-lab user CA",
             "-f", str(user_ca)])
    write_if_changed(lab.ETC / "ssh_config", (
        "# sshd-adopt lab ssh_config (bind-mounted over /etc/ssh/ssh_config in the lab)\n"
        "Host *\n"
        f"    GlobalKnownHostsFile {lab.ETC}/ssh_known_hosts\n"
        "    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n"
        "    CheckHostIP no\n"
        "    HashKnownHosts no\n"
        "    ConnectTimeout 10\n"
        "    IdentityFile ~/.ssh/id_ed25519\n"
        f"    IdentityFile {lab.ETC}/id_ed25519.%u\n"
        "    # ssh-keysign reads this: hostbased logins (-o HostbasedAuthentication=yes)\n"
        "    EnableSSHKeysign yes\n"
    ))
    write_etc_ssh()

    # PAM: a copy of the host's /etc/pam.d plus one reference service per node, and the
    # shipped service of managed users under the keyless profile (pam.d/sshd-adopt: the
    # drop-in names it only with --auth-methods hostbased/gssapi on OpenSSH >= 9.8).
    pam_dir = lab.ETC / "pam.d"
    pam_dir.mkdir(parents=True, exist_ok=True)
    run(["rsync", "-a", "--delete", "--exclude", "sshd-psa-*", "--exclude", "sshd-adopt",
         f"{lab.GEN.in_root('/etc/pam.d')}/", f"{pam_dir}/"])
    write_if_changed(pam_dir / "sshd-adopt", (REPO / "pam.d" / "sshd-adopt").read_text())
    pam_texts = {}
    for node in COMPUTE:
        text = fill("pam-sshd-psa.in", NODE=sname(node), **values)
        write_if_changed(pam_dir / f"sshd-psa-{sname(node)}", text)
        pam_texts[node] = text

    # Symlinks giving the reference sshds their PAM service name through argv[0].
    sbin = lab.VAR / "sbin"
    sbin.mkdir(parents=True, exist_ok=True)
    for node in COMPUTE if lab.GEN.pam_service_by == "argv0" else ():
        link = sbin / f"sshd-psa-{node}"
        if not link.is_symlink() or os.readlink(link) != "/usr/sbin/sshd":
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("/usr/sbin/sshd")

    use_dropin = DROPIN.is_file() and not skip_dropin()
    penalties = "PerSourcePenalties no\n" if sshd_supports("PerSourcePenalties") else ""
    digests = {"slurmctld": slurm_digest, "krb5kdc": kerberos.write_configs()}
    for node in COMPUTE:
        node_etc = lab.ETC / node
        node_etc.mkdir(parents=True, exist_ok=True)
        (lab.RUN / node).mkdir(parents=True, exist_ok=True)
        toml = fill("sshd-adopt.toml.in", NODE=sname(node), **values)
        write_if_changed(node_etc / "sshd-adopt.toml", toml)
        dropin_text = ""
        include = ""
        if use_dropin:
            dropin_text = DROPIN.read_text()
            substitutions = dict(values, NODE=sname(node),
                                 CONFIG=str(node_etc / "sshd-adopt.toml"))
            for placeholder, replacement in substitutions.items():
                dropin_text = dropin_text.replace(f"@{placeholder}@", replacement)
            write_if_changed(node_etc / "sshd-adopt.conf", dropin_text)
            # Included before the lab settings: for almost every keyword sshd keeps the first
            # value it reads, so the shipped drop-in's settings win over the lab defaults.
            include = f"Include {node_etc}/sshd-adopt.conf\n"
        common = (
            f"HostKey {host_key(node)}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            f"AuthorizedKeysFile .ssh/authorized_keys {lab.ETC}/authorized_keys.%u\n"
            "KbdInteractiveAuthentication no\nUseDNS no\nLogLevel VERBOSE\n"
            "X11Forwarding yes\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n"
            f"TrustedUserCAKeys {lab.ETC}/user_ca.pub\n"
            "PrintMotd no\nAcceptEnv LANG LC_*\n" + penalties
            # Hostbased logins from the lab's hosts (their keys in /etc/ssh/ssh_known_hosts,
            # their addresses in /etc/ssh/shosts.equiv: write_etc_ssh). The shipped drop-in
            # turns it off for managed users unless --auth-methods allows it.
            + "HostbasedAuthentication yes\nIgnoreUserKnownHosts yes\n"
            # GSSAPI logins with tickets of the lab's realm (kerberos.py; the keytab is
            # krb5.conf's default_keytab_name); off for managed users unless allowed.
            + "GSSAPIAuthentication yes\n"
        )
        # MaxStartups is one of the few keywords where sshd keeps the LAST value: set the lab
        # default before the Include so that the shipped drop-in's value wins.
        startups = "MaxStartups 100:30:200\n"
        adopt = (
            "# sshd-adopt front end (port 22), generated by scripts/cluster\n"
            + startups + include +
            f"ListenAddress {v4(node)}:22\nListenAddress [{v6(node)}]:22\n"
            f"PidFile {lab.RUN}/{node}/sshd-22.pid\nUsePAM no\n" + common
        )
        psa = (
            "# reference sshd with the real pam_slurm_adopt (port 2222), generated\n"
            f"ListenAddress {v4(node)}:2222\nListenAddress [{v6(node)}]:2222\n"
            f"PidFile {lab.RUN}/{node}/sshd-2222.pid\nUsePAM yes\n"
            + (f"PAMServiceName sshd-psa-{sname(node)}\n"
               if lab.GEN.pam_service_by == "config" else "")
            + startups + common
        )
        write_if_changed(node_etc / "sshd_config-22", adopt)
        write_if_changed(node_etc / "sshd_config-2222", psa)
        digests[f"slurmd-{node}"] = slurm_digest
        digests[f"sshd-{node}-22"] = digest(adopt, dropin_text)
        digests[f"sshd-{node}-2222"] = digest(psa, pam_texts[node])
        digests[f"sshd-adoptd-{node}"] = digest(toml, repo_digest())

    # Directories the daemons need, with the ownership they expect.
    for path, owner, mode in (
        (lab.VAR / "slurmctld", slurm, 0o755),
        (lab.VAR / "munge", munge, 0o700),
        (lab.RUN / "munge", munge, 0o755),
    ):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *owner)
        os.chmod(path, mode)
    for node in COMPUTE:
        (lab.VAR / f"slurmd-{sname(node)}").mkdir(parents=True, exist_ok=True)
    for logname, owner in (("slurmctld.log", slurm), ("munged.log", munge)):
        path = lab.LOG / logname
        path.touch()
        os.chown(path, *owner)
    return digests
