"""The lab's Kerberos realm, for GSSAPI logins: an MIT KDC on ctl, one principal per lab
user (password ``password(user)``), and ``host/<node>`` for each compute node's sshd.

Every lab host reads the same /etc/krb5.conf (``krb5_conf``, bound there by
namespaces.etc_binds): the realm, the KDC by address (no DNS anywhere), no reverse
lookups, and the one keytab that holds every node's host key (sshd, with
``GSSAPIStrictAcceptorCheck yes``, accepts only ``host/<its own host name>`` from it).
The database lives in the lab state dir and is made once (``ensure_realm``); the KDC
runs in the foreground as a lab daemon (daemons.py).
"""

from __future__ import annotations

from pathlib import Path

from . import generation as lab
from .generation import COMPUTE, v4
from .host import root_exec
from .util import digest, run, say, write_if_changed

REALM = "LAB.TEST"
#: The lab users with a principal (the managed ones and the admin).
USERS = ("alice", "bob", "carol", "zoe")


def password(user: str) -> str:
    """A lab user's Kerberos password (a lab, not a secret)."""
    return f"{user}-lab-krb5"


def kdc_dir() -> Path:
    return lab.VAR / "krb5kdc"


def keytab() -> Path:
    return lab.VAR / "krb5" / "krb5.keytab"


def krb5_conf_path() -> Path:
    return lab.ETC / "krb5.conf"


def kdc_conf_path() -> Path:
    return lab.ETC / "kdc.conf"


def krb5_conf() -> str:
    return (
        "# sshd-adopt lab /etc/krb5.conf, written by scripts/cluster (kerberos.py)\n"
        "[libdefaults]\n"
        f"    default_realm = {REALM}\n"
        "    dns_lookup_kdc = false\n    dns_lookup_realm = false\n"
        # no reverse lookups; a Slurm NodeName alias (t1, f1) finds host/n1 as fallback
        "    rdns = false\n    dns_canonicalize_hostname = fallback\n"
        "    forwardable = true\n"
        f"    default_keytab_name = FILE:{keytab()}\n"
        "[realms]\n"
        f"    {REALM} = {{\n        kdc = {v4('ctl')}\n    }}\n"
    )


def kdc_conf() -> str:
    return (
        "# sshd-adopt lab kdc.conf, written by scripts/cluster (kerberos.py)\n"
        "[kdcdefaults]\n"
        f"    kdc_listen = {v4('ctl')}:88\n    kdc_tcp_listen = {v4('ctl')}:88\n"
        "[realms]\n"
        f"    {REALM} = {{\n"
        f"        database_name = {kdc_dir()}/principal\n"
        f"        key_stash_file = {kdc_dir()}/stash\n"
        "        max_life = 10h 0m 0s\n"
        "        default_principal_flags = +preauth\n"
        "    }\n"
        "[logging]\n"
        f"    kdc = FILE:{lab.LOG}/krb5kdc.log\n"
    )


def environment() -> list[str]:
    """``env`` arguments that point the MIT tools at the lab's files."""
    return ["env", f"KRB5_CONFIG={krb5_conf_path()}", f"KRB5_KDC_PROFILE={kdc_conf_path()}"]


def write_configs() -> str:
    """Write krb5.conf and kdc.conf; return the KDC's digest (a change restarts it)."""
    krb5, kdc = krb5_conf(), kdc_conf()
    write_if_changed(krb5_conf_path(), krb5)
    write_if_changed(kdc_conf_path(), kdc)
    return digest(krb5, kdc)


def _tool(*argv: str) -> None:
    """Run an MIT admin tool on the lab's realm (in the generation's userland)."""
    command = [*environment(), *argv]
    if lab.GEN.root is not None:
        root_exec(command, timeout=120)
    else:
        run(command, timeout=120)


def ensure_realm() -> None:
    """The realm's database, the users' and nodes' principals and the nodes' keytab,
    made once (a stamp names what they were made for)."""
    stamp = kdc_dir() / ".lab-realm"
    want = f"{REALM} {' '.join(USERS)} {' '.join(COMPUTE)}"
    if stamp.is_file() and stamp.read_text() == want and keytab().is_file():
        return
    say(f"creating the Kerberos realm {REALM} (KDC database in {kdc_dir()})")
    for path in (kdc_dir(), keytab().parent):
        if path.exists():
            run(["rm", "-rf", str(path)])
        path.mkdir(parents=True, mode=0o700)
    _tool("/usr/sbin/kdb5_util", "create", "-s", "-r", REALM, "-P", "lab-master-key")
    for user in USERS:
        _tool("/usr/sbin/kadmin.local", "-q", f"addprinc -pw {password(user)} {user}")
    hosts = [f"host/{node}" for node in COMPUTE]
    for principal in hosts:
        _tool("/usr/sbin/kadmin.local", "-q", f"addprinc -randkey {principal}")
    _tool("/usr/sbin/kadmin.local", "-q", f"ktadd -k {keytab()} {' '.join(hosts)}")
    keytab().chmod(0o600)
    stamp.write_text(want)


def kdc_argv() -> list[str]:
    return [*environment(), "/usr/sbin/krb5kdc", "-n"]
