"""slurm.conf parsing, hostlists, node name resolution and spool dir expansion."""

from __future__ import annotations

import ipaddress
import pwd
import socket
import time
from pathlib import Path

import pytest

from sshd_adopt._internal.core.connection import IPAddress
from sshd_adopt._internal.slurm import facts as slurmconf
from sshd_adopt._internal.slurm.conf import expand_hostlist, parse_auth_info, parse_comm_params
from sshd_adopt._internal.slurm.facts import (
    SlurmFacts,
    expand_spool_dir,
    load_slurm_facts,
    protocol_for,
    slurm_version,
    slurmd_addresses,
)
from sshd_adopt._internal.slurm.stepd import NEWEST_PROTOCOL, PROTOCOL_VERSIONS
from sshd_adopt.errors import SlurmConfigError

# -- hostlists ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-3,5],gpu[01-02]", ["n1", "n2", "n3", "n5", "gpu01", "gpu02"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[007]", ["n007"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
        ("a, b ,c", ["a", "b", "c"]),
        ("", []),
    ],
)
def test_expand_hostlist(expr: str, names: list[str]) -> None:
    assert expand_hostlist(expr) == names


@pytest.mark.parametrize(
    "expr", ["n[1-3", "n1-3]", "n[[1]]", "n[a-b]", "n[3-1]", "n[1-]", "n[]", "n[\u0661-3]"]
)
def test_expand_hostlist_rejects_malformed(expr: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(expr)


def test_expand_hostlist_is_bounded() -> None:
    with pytest.raises(ValueError, match="too large"):
        expand_hostlist("n[1-99999999]")
    with pytest.raises(ValueError, match="too many"):
        expand_hostlist("a[1-1000]b[1-1000]")


# -- spool dir and protocol ---------------------------------------------------


def test_expand_spool_dir() -> None:
    assert expand_spool_dir("/var/spool/slurmd", None) == "/var/spool/slurmd"
    assert expand_spool_dir("/var/lib/slurmd-%n", "n1") == "/var/lib/slurmd-n1"
    assert expand_spool_dir("/s/%h/%n", "n1", "host1") == "/s/host1/n1"
    assert expand_spool_dir("/s/%h", "n1") == "/s/n1"
    assert expand_spool_dir("/s/%n", None) is None


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("22.05.8", PROTOCOL_VERSIONS["22.05"]),
        ("24.11.5", PROTOCOL_VERSIONS["24.11"]),
        ("23.02.0-0rc1", PROTOCOL_VERSIONS["23.02"]),
        ("30.05.1", NEWEST_PROTOCOL),
        ("garbage", NEWEST_PROTOCOL),
        (None, NEWEST_PROTOCOL),
    ],
)
def test_protocol_for(version: str | None, expected: int) -> None:
    assert protocol_for(version) == expected


def test_slurm_version_runs_a_fixed_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "slurmd"
    tool.write_text(
        '#!/bin/sh\n[ "$1" = -V ] && [ -z "$SLURM_CONF" ] && echo "slurm-wlm 22.05.8"\n'
    )
    tool.chmod(0o755)
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent")  # must not reach the tool
    assert slurm_version((str(tmp_path / "missing"), str(broken), str(tool))) == "22.05.8"
    assert slurm_version((str(tmp_path / "missing"),)) is None


def test_slurm_version_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "slurmd"
    tool.write_text("#!/bin/sh\nexec sleep 30\n")
    tool.chmod(0o755)
    monkeypatch.setattr(slurmconf, "VERSION_TIMEOUT", 0.3)
    assert slurm_version((str(tool),)) is None


# -- slurm.conf ---------------------------------------------------------------

ROOT = pwd.getpwuid(0).pw_name


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


#: The names test configurations resolve (no real DNS in unit tests).
DNS = {"g-a": ["10.9.0.1", "fd00::1"], "g-b": ["10.9.0.2"]}


def fake_resolve(name: str, family: int) -> list[IPAddress]:
    found = [ipaddress.ip_address(a) for a in DNS.get(name, [name] if _is_ip(name) else [])]
    wanted = {4} if family == socket.AF_INET else {6} if family == socket.AF_INET6 else {4, 6}
    return [a for a in found if a.version in wanted]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def load(conf: Path, *, nodename: str | None = None, hostname: str | None = None,
         addresses: tuple[str, ...] = ()) -> SlurmFacts:
    return load_slurm_facts(str(conf), nodename=nodename, hostname=hostname,
                            addresses=frozenset(ipaddress.ip_address(a) for a in addresses),
                            version="22.05.8", resolve=fake_resolve)


LAB = """\
# Lab slurm.conf
ClusterName=lab
SlurmUser=root   # trailing comment
slurmdport=6820
SlurmdSpoolDir=/var/lib/lab/slurmd-%n
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
PrologFlags=Contain,X11
NodeName=DEFAULT CPUs=2 RealMemory=2000 Port=7000
NodeName=n[1-3] NodeAddr=10.213.0.[11-13]
NodeName=DEFAULT Port=7100
NodeName=gpu[01-02] NodeHostname=g-a,g-b
PartitionName=lab Nodes=n[1-3] Default=YES
"""


def test_lab_conf_explicit_nodename(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", LAB), nodename="n2")
    assert facts == SlurmFacts(
        conf_path=str(tmp_path / "slurm.conf"),
        cluster_name="lab",
        nodename="n2",
        node_hostname="n2",
        node_addr="10.213.0.12",
        spool_dir="/var/lib/lab/slurmd-n2",
        slurmd_port=7000,  # per-node Port (from DEFAULT) overrides SlurmdPort
        slurm_user=ROOT,
        slurm_user_uid=0,
        prolog_flags=frozenset({"contain", "x11"}),
        proctrack_type="proctrack/cgroup",
        task_plugins=("task/cgroup", "task/affinity"),
        version="22.05.8",
        protocol_version=PROTOCOL_VERSIONS["22.05"],
        slurmds=({
            ipaddress.ip_address("10.213.0.11"): 7000, ipaddress.ip_address("10.213.0.12"): 7000,
            ipaddress.ip_address("10.213.0.13"): 7000, ipaddress.ip_address("10.9.0.1"): 7100,
            ipaddress.ip_address("10.9.0.2"): 7100}),
    )


def test_nodename_from_hostname(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", LAB)
    assert load(conf, hostname="n3.cluster.example").nodename == "n3"
    gpu = load(conf, hostname="g-b")  # matched through NodeHostname
    assert (gpu.nodename, gpu.node_hostname, gpu.node_addr) == ("gpu02", "g-b", "g-b")
    assert gpu.slurmd_port == 7100  # the later DEFAULT line applies to later nodes
    assert gpu.spool_dir == "/var/lib/lab/slurmd-gpu02"
    assert load(conf, hostname="gpu01").nodename == "gpu01"  # NodeName as a fallback


def test_unknown_node(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", LAB), hostname="elsewhere")
    assert facts.nodename is None
    assert facts.spool_dir is None  # %n cannot be expanded: never guess
    assert facts.slurmd_port == 6820


def test_explicit_nodename_wins_even_if_unknown(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", LAB), nodename="x9", hostname="n1")
    assert (facts.nodename, facts.spool_dir, facts.slurmd_port) == (
        "x9", "/var/lib/lab/slurmd-x9", 6820)


def test_nodename_from_this_hosts_address(tmp_path: Path) -> None:
    """NodeName t1 on host n1 (the 24.11 lab): found by NodeAddr, without DNS."""
    conf = write(tmp_path / "slurm.conf", LAB)
    facts = load(conf, hostname="elsewhere", addresses=("127.0.0.1", "10.213.0.12", "fe80::1"))
    assert (facts.nodename, facts.spool_dir) == ("n2", "/var/lib/lab/slurmd-n2")
    # The host name still wins over the address, as in libslurm.
    assert load(conf, hostname="n3", addresses=("10.213.0.12",)).nodename == "n3"
    # A NodeAddr that is a host name is never resolved.
    assert load(conf, hostname="elsewhere", addresses=("10.213.0.99",)).nodename is None


def test_address_shared_by_several_nodes_is_ambiguous(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf",
                 "ClusterName=c\nNodeName=a,b NodeAddr=10.0.0.5 Port=[7001-7002]\n")
    assert load(conf, hostname="host", addresses=("10.0.0.5",)).nodename is None
    v6 = write(tmp_path / "v6.conf", "ClusterName=c\nNodeName=x NodeAddr=fd00::5\n")
    assert load(v6, hostname="host", addresses=("fd00::5",)).nodename == "x"


def test_host_addresses_lists_loopback() -> None:
    assert ipaddress.ip_address("127.0.0.1") in slurmconf.host_addresses()


def test_localhost_node(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "ClusterName=c\nNodeName=vm NodeHostname=localhost\n")
    assert load(conf, hostname="whatever").nodename == "vm"


def test_defaults(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", "ClusterName=c\nNodeName=a\n"), hostname="a")
    assert facts.spool_dir == "/var/spool/slurmd"
    assert facts.slurmd_port == 6818
    assert facts.slurm_user == ROOT
    assert facts.prolog_flags == frozenset()
    assert facts.proctrack_type == "proctrack/cgroup"
    assert facts.task_plugins == ("task/none",)


def test_spool_dir_with_hostname(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "slurm.conf",
        "ClusterName=c\nSlurmdSpoolDir=/spool/%h/%n\nNodeName=n[1-2] NodeHostname=h[1-2]\n",
    )
    assert load(conf, hostname="h2").spool_dir == "/spool/h2/n2"


def test_includes_relative_glob_and_case(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "nodes.d" / "10-a.conf", "NodeName=a[1-2] Port=7001\n")
    write(etc / "nodes.d" / "20-b.conf", "NodeName=b1\n")
    write(etc / "more.conf", 'include nodes.d/*.conf\nSlurmdSpoolDir="/spool dir/%n"\n')
    conf = write(
        etc / "slurm.conf",
        "CLUSTERNAME=c\n  Include more.conf\nInclude /nonexistent-dir/*.conf\n",
    )
    facts = load(conf, hostname="a2")
    assert (facts.nodename, facts.slurmd_port) == ("a2", 7001)
    assert facts.spool_dir == "/spool dir/a2"
    assert load(conf, hostname="b1").nodename == "b1"


def test_missing_include_is_an_error(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "ClusterName=c\nInclude missing.conf\n")
    with pytest.raises(SlurmConfigError, match=r"missing\.conf: cannot read"):
        load(conf)


def test_include_loop_ends(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "ClusterName=c\nInclude slurm.conf\n")
    with pytest.raises(SlurmConfigError, match="nested deeper"):
        load(conf)


def test_comments_and_escaped_hash(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "slurm.conf",
        "# ClusterName=commented\nClusterName=c\\#1 # real comment\nNodeName=a # NodeName=b\n",
    )
    facts = load(conf, hostname="a")
    assert facts.cluster_name == "c#1"
    assert load(conf, hostname="b").nodename is None


def test_parse_errors_name_the_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "slurm.conf", "ClusterName=c\nNodeName=n[1-\n")
    with pytest.raises(SlurmConfigError, match=r"slurm\.conf:2"):
        load(conf)
    conf = write(tmp_path / "bad.conf", "ClusterName=c\nNodeName=n[1-3] NodeAddr=a,b\n")
    with pytest.raises(SlurmConfigError, match="NodeAddr lists 2 values for 3"):
        load(conf)
    conf = write(tmp_path / "noise.conf", "ClusterName=c\n=oops\n")
    with pytest.raises(SlurmConfigError, match="cannot parse"):
        load(conf)


def test_missing_cluster_name_and_unknown_slurm_user(tmp_path: Path) -> None:
    with pytest.raises(SlurmConfigError, match="ClusterName"):
        load(write(tmp_path / "a.conf", "SlurmUser=root\n"))
    with pytest.raises(SlurmConfigError, match="SlurmUser 'no-such-user-x'"):
        load(write(tmp_path / "b.conf", "ClusterName=c\nSlurmUser=no-such-user-x\n"))


def test_no_conf_names_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurmconf, "CONFIGLESS_CONF", str(tmp_path / "run" / "slurm.conf"))
    with pytest.raises(SlurmConfigError) as info:
        load(tmp_path / "etc" / "slurm.conf")
    assert str(tmp_path / "etc" / "slurm.conf") in str(info.value)
    assert str(tmp_path / "run" / "slurm.conf") in str(info.value)


def test_configless_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write(tmp_path / "run" / "slurm.conf", "ClusterName=cl\nNodeName=a\n")
    monkeypatch.setattr(slurmconf, "CONFIGLESS_CONF", str(cached))
    facts = load(tmp_path / "etc" / "slurm.conf", hostname="a")
    assert (facts.conf_path, facts.cluster_name) == (str(cached), "cl")


def test_environment_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = write(tmp_path / "evil.conf", "ClusterName=evil\nNodeName=a\nSlurmdSpoolDir=/tmp\n")
    monkeypatch.setenv("SLURM_CONF", str(other))
    monkeypatch.setenv("SLURMD_NODENAME", "a")
    facts = load(write(tmp_path / "slurm.conf", LAB), hostname="n1")
    assert (facts.cluster_name, facts.nodename) == ("lab", "n1")


# -- what callerid needs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, (None, None)),
        ("", (None, None)),
        ("/var/run/munge/alt.socket.2", ("/var/run/munge/alt.socket.2", None)),  # old format
        ("socket=/run/m.sock,ttl=30", ("/run/m.sock", 30)),
        ("ttl=60", (None, 60)),
        ("cred_expire=120,socket=/s", ("/s", None)),
        ("ttl=-5", (None, None)),
        ("ttl=abc,socket=/s", ("/s", None)),
    ],
)
def test_auth_info_is_read_as_libslurm_reads_it(
        value: str | None, expected: tuple[str | None, int | None]) -> None:
    assert parse_auth_info(value) == expected


def test_comm_params_are_names() -> None:
    assert parse_comm_params("EnableIPv6,keepaliveinterval=30, block_zero_hash") == frozenset(
        {"enableipv6", "keepaliveinterval", "block_zero_hash"})


CALLERID_CONF = """\
ClusterName=c
SlurmdUser=nobody
SlurmdPort=6818
AuthInfo=socket=/run/munge/slurm.socket,ttl=20
NodeName=a[1-2] NodeAddr=10.0.0.[1-2]
NodeName=b1 NodeHostname=g-a
NodeName=c1 NodeAddr=10.0.0.9 Port=7001
NodeName=lost NodeHostname=nowhere
"""


def test_slurmds_are_every_node_address_with_its_port(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", CALLERID_CONF), nodename="a1")
    assert dict(facts.slurmds) == {
        ipaddress.ip_address("10.0.0.1"): 6818, ipaddress.ip_address("10.0.0.2"): 6818,
        ipaddress.ip_address("10.9.0.1"): 6818,  # g-a's IPv4 address only: no EnableIPv6
        ipaddress.ip_address("10.0.0.9"): 7001,
    }
    assert facts.unresolved == ("lost",)
    assert (facts.slurmd_user_uid, facts.auth_socket, facts.auth_ttl) == (
        pwd.getpwnam("nobody").pw_uid, "/run/munge/slurm.socket", 20)
    assert (facts.ipv4, facts.ipv6) == (True, False)


def test_ipv6_addresses_count_only_with_enable_ipv6(tmp_path: Path) -> None:
    text = CALLERID_CONF + "CommunicationParameters=EnableIPv6\n"
    facts = load(write(tmp_path / "slurm.conf", text), nodename="a1")
    assert facts.slurmds[ipaddress.ip_address("fd00::1")] == 6818
    only6 = load(write(tmp_path / "slurm.conf", text.replace("EnableIPv6", "EnableIPv6,"
                                                              "DisableIPv4")), nodename="a1")
    assert set(only6.slurmds) == {ipaddress.ip_address("fd00::1")}


def test_slurmd_user_defaults_to_root(tmp_path: Path) -> None:
    facts = load(write(tmp_path / "slurm.conf", LAB), nodename="n1")
    assert facts.slurmd_user_uid == 0
    assert (facts.auth_socket, facts.auth_ttl, facts.comm_params) == (None, None, frozenset())


def test_a_hung_resolver_costs_the_timeout_not_more() -> None:
    def hang(name: str, family: int) -> list[IPAddress]:
        if name == "slow":
            time.sleep(5)
            return [ipaddress.ip_address("10.1.1.1")]
        return [ipaddress.ip_address(name)]

    started = time.monotonic()
    slurmds, unresolved = slurmd_addresses(
        [("fast", ["10.0.0.1"], 1), ("slow", ["slow"], 2)], ipv4=True, ipv6=False,
        resolve=hang, timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert dict(slurmds) == {ipaddress.ip_address("10.0.0.1"): 1}
    assert unresolved == ("slow",)
