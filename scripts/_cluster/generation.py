"""The lab generations (Debian bookworm, trixie), the lab hosts, and the selected generation.

A generation is a complete lab (ctl, login, n1..n3) with its own userland, paths, networks
and Slurm NodeNames; ``GENERATIONS`` holds them (docs/generations.md explains them;
tests/harness.py keeps a copy that tests/unit/test_generations.py checks against this one).

The selected generation: scripts/cluster calls ``select_generation()`` once, after parsing
``-g``, and it REBINDS the module globals ``GEN``, ``RUN``, ``NSDIR``, ``STATE_FILE``,
``VAR``, ``ETC``, ``LOG``, ``PREFIX`` and ``VENV``. Read those through the module at call
time::

    from . import generation as lab
    ... lab.RUN / "state.json" ...

never as ``from .generation import RUN``: that copy keeps the default generation's value,
and ``-g trixie`` would silently work on bookworm's paths. What is never rebound
(``HOSTS``, ``COMPUTE``, ``HOST_NUM``, ``GENERATIONS``) and the functions (``sname``,
``v4``, ``v6``: they look at ``GEN`` when called) may be imported by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: The lab hosts (the same names in every generation) and the last octet of their addresses.
HOST_NUM = {"ctl": 1, "login": 5, "n1": 11, "n2": 12, "n3": 13}
HOSTS = tuple(HOST_NUM)
COMPUTE = ("n1", "n2", "n3")


@dataclass(frozen=True)
class Generation:
    """Everything that differs between the lab generations (the rest of the lab is shared).

    Host names (ctl, login, n1..n3) are the same in every generation: each host is its own
    UTS namespace and each generation has its own /etc/hosts, so `ssh n1` means "n1 of this
    generation". Slurm NodeNames must NOT be shared: cgroup v1 hierarchies are host-wide and
    Slurm's prefix is /slurm_<NodeName>, so a second generation names its nodes differently
    (t1..t3) and lists the host names as /etc/hosts aliases of them.
    """

    name: str
    suite: str  # Debian suite
    root: Path | None  # chroot with that suite's userland; None: the host itself
    run: Path  # run dir: namespaces, state.json, sockets (same path inside the lab)
    var: Path  # configs, keys, spool and state dirs (same path inside the lab)
    log: Path  # daemon logs (same path inside the lab)
    prefix: Path  # install prefix INSIDE the lab (the venv is prefix/venv)
    v4_net: str  # first three octets and a dot
    v6_net: str  # /64 prefix ending in ::
    cluster_name: str
    node_names: tuple[tuple[str, str], ...]  # (host, Slurm NodeName)
    #: how the port-2222 sshd gets its own PAM service: an argv[0] symlink (OpenSSH < 10)
    #: or the PAMServiceName keyword (OpenSSH >= 10)
    pam_service_by: str
    pam_module: str  # where the distribution puts pam_slurm_adopt.so (inside the lab)
    python: str  # the lab's python3 (inside the lab)
    #: the cgroup version the lab's slurmds run: "v1" (the host's v1 hierarchies) or "v2"
    #: (the host's controller-less cgroup2 hierarchy bound at each node's /sys/fs/cgroup,
    #: docs/generations.md "cgroup v2 on a hybrid host")
    cgroup: str = "v1"
    #: OpenSSH's server and client packages: Debian 14 builds GSSAPI (Kerberos) only into
    #: its *-gssapi variants, which replace the plain ones (the lab's realm: kerberos.py)
    ssh_packages: tuple[str, str] = ("openssh-server", "openssh-client")

    def in_root(self, path: Path | str) -> Path:
        """A path inside the lab's userland, seen from the host."""
        return Path(f"{self.root}{path}") if self.root is not None else Path(path)

    def slurm_name(self, host: str) -> str:
        return dict(self.node_names).get(host, host)


GENERATIONS = {
    "bookworm": Generation(
        name="bookworm", suite="bookworm", root=None, run=Path("/run/sshd-adopt-lab"),
        var=Path("/var/lib/sshd-adopt-lab"), log=Path("/var/log/sshd-adopt-lab"),
        prefix=Path("/opt/sshd-adopt-lab"), v4_net="10.213.0.", v6_net="fd5a:213::",
        cluster_name="lab", node_names=(("n1", "n1"), ("n2", "n2"), ("n3", "n3")),
        pam_service_by="argv0", pam_module="/lib/security/pam_slurm_adopt.so",
        python="/usr/bin/python3"),
    "trixie": Generation(
        name="trixie", suite="trixie",
        root=Path(os.environ.get("SSHD_ADOPT_LAB_TRIXIE_ROOT")
                  or "/var/lib/sshd-adopt-lab-trixie/root"),
        run=Path("/run/sshd-adopt-lab-trixie"), var=Path("/var/lib/sshd-adopt-lab-trixie/lab"),
        log=Path("/var/log/sshd-adopt-lab-trixie"),
        # The same in-lab prefix as bookworm, so in-lab paths (the ForceCommand) are equal.
        prefix=Path("/opt/sshd-adopt-lab"), v4_net="10.214.0.", v6_net="fd5a:214::",
        cluster_name="labt", node_names=(("n1", "t1"), ("n2", "t2"), ("n3", "t3")),
        pam_service_by="config",
        pam_module="/usr/lib/x86_64-linux-gnu/security/pam_slurm_adopt.so",
        python="/usr/bin/python3"),
    "forky": Generation(
        name="forky", suite="forky",
        root=Path(os.environ.get("SSHD_ADOPT_LAB_FORKY_ROOT")
                  or "/var/lib/sshd-adopt-lab-forky/root"),
        run=Path("/run/sshd-adopt-lab-forky"), var=Path("/var/lib/sshd-adopt-lab-forky/lab"),
        log=Path("/var/log/sshd-adopt-lab-forky"),
        prefix=Path("/opt/sshd-adopt-lab"), v4_net="10.215.0.", v6_net="fd5a:215::",
        cluster_name="labf", node_names=(("n1", "f1"), ("n2", "f2"), ("n3", "f3")),
        pam_service_by="config",
        pam_module="/usr/lib/x86_64-linux-gnu/security/pam_slurm_adopt.so",
        python="/usr/bin/python3", cgroup="v2",
        ssh_packages=("openssh-server-gssapi", "openssh-client-gssapi")),
}
DEFAULT_GENERATION = "bookworm"

# The selected generation; select_generation() rebinds these module globals (read them as
# lab.RUN etc. at call time, see the module docstring).
GEN: Generation
RUN: Path
NSDIR: Path
STATE_FILE: Path
VAR: Path
ETC: Path
LOG: Path
PREFIX: Path  # inside the lab; on the host: GEN.in_root(PREFIX)
VENV: Path


def select_generation(name: str) -> None:
    """Make ``name`` the generation every function of the lab works on."""
    global GEN, RUN, NSDIR, STATE_FILE, VAR, ETC, LOG, PREFIX, VENV
    GEN = GENERATIONS[name]
    RUN = GEN.run
    NSDIR = RUN / "ns"
    STATE_FILE = RUN / "state.json"
    VAR = GEN.var
    ETC = VAR / "etc"
    LOG = GEN.log
    PREFIX = GEN.prefix
    VENV = PREFIX / "venv"


select_generation(DEFAULT_GENERATION)


def sname(host: str) -> str:
    """Slurm NodeName of a compute host in the selected generation."""
    return GEN.slurm_name(host)


def v4(host: str) -> str:
    return f"{GEN.v4_net}{HOST_NUM[host]}"


def v6(host: str) -> str:
    return f"{GEN.v6_net}{HOST_NUM[host]}"
