"""The facts the broker needs from the installed Slurm, read once at start and on SIGHUP.

We parse slurm.conf ourselves (:mod:`.conf`) instead of asking ``scontrol show
config`` because the broker must work when slurmctld is down and must not
depend on a network round trip at login time.

Environment variables are never consulted (no ``SLURM_CONF``, no
``SLURMD_NODENAME``). The broker is root and answers requests from users;
pam_slurm_adopt refuses non-sshd services for exactly this reason: an
environment variable could point libslurm at a user-written slurm.conf
(another spool dir, another node name) and so at another user's job.
Everything here comes from root-owned files and explicit arguments, and the
Slurm tools we run get a fixed, minimal environment (:mod:`sshd_adopt._internal.run`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Final

import psutil

from sshd_adopt._internal import run
from sshd_adopt._internal.core.connection import IPAddress
from sshd_adopt._internal.slurm.conf import (
    Node,
    expand_hostlist,
    nodes,
    parse,
    parse_auth_info,
    parse_comm_params,
)
from sshd_adopt._internal.slurm.stepd import NEWEST_PROTOCOL, PROTOCOL_VERSIONS
from sshd_adopt.errors import SlurmConfigError

DEFAULT_CONF: Final = "/etc/slurm/slurm.conf"
#: Where slurmd links its cached copy of the config in configless mode (21.08+).
CONFIGLESS_CONF: Final = "/run/slurm/conf/slurm.conf"
DEFAULT_SPOOL_DIR: Final = "/var/spool/slurmd"
DEFAULT_SLURMD_PORT: Final = 6818
#: Slurm's built-in defaults for the plugin types we report (22.05 → 26.05).
DEFAULT_PROCTRACK: Final = "proctrack/cgroup"
DEFAULT_TASK_PLUGINS: Final = ("task/none",)

#: How long ``slurmd -V`` may take. It prints a constant and exits; anything
#: slower is a broken installation and we carry on without a version.
VERSION_TIMEOUT: Final = 5.0
#: Fixed locations of the Slurm tools: the broker's PATH is not trusted either.
VERSION_COMMANDS: Final = (
    "/usr/sbin/slurmd",
    "/usr/local/sbin/slurmd",
    "/usr/bin/scontrol",
    "/usr/local/bin/scontrol",
)
#: How long resolving every node's address may take in all, at start and on
#: SIGHUP (names in /etc/hosts resolve in microseconds; a dead DNS server must
#: not stall the broker's start).
RESOLVE_TIMEOUT: Final = 10.0



@dataclass(frozen=True)
class SlurmFacts:
    """What the broker knows about the local Slurm installation and this node."""

    conf_path: str  # the slurm.conf actually read (may be the configless copy)
    cluster_name: str
    nodename: str | None  # this host's NodeName, None if it could not be determined
    node_hostname: str | None
    node_addr: str | None
    spool_dir: str | None  # SlurmdSpoolDir, %n/%h expanded; None if it needs an unknown node
    slurmd_port: int
    slurm_user: str
    slurm_user_uid: int
    prolog_flags: frozenset[str]  # lower-case, e.g. {"contain", "x11"}
    proctrack_type: str
    task_plugins: tuple[str, ...]
    version: str | None  # e.g. "22.05.8"; None if no Slurm tool answered
    protocol_version: int  # SLURM_PROTOCOL_VERSION of ``version``; NEWEST if unknown
    #: SlurmdUser's uid (root by default): the only uid a callerid credential may decode as.
    slurmd_user_uid: int = 0
    #: ``AuthInfo`` ``socket=`` and ``ttl=`` (None: munged's defaults, as in libslurm).
    auth_socket: str | None = None
    auth_ttl: int | None = None
    #: ``CommunicationParameters``, lower-case names (``enableipv6``, ...), values dropped.
    comm_params: frozenset[str] = frozenset()
    #: Every configured node's slurmd: its addresses (NodeAddr, NodeHostname, resolved in the
    #: families slurmd listens on) and the port it listens on. The only places a callerid
    #: request may go.
    slurmds: Mapping[IPAddress, int] = field(default_factory=dict)
    #: Node addresses that did not resolve (logged; connections from there are "not a node").
    unresolved: tuple[str, ...] = ()
    #: The plugin that gives jobs namespaces of their own, lower-case: ``JobContainerType``
    #: (``job_container/tmpfs``, 22.05 to 25.05) or ``NamespaceType`` (25.11 on:
    #: ``namespace/tmpfs``, ``namespace/linux``); "" when neither is set.
    namespace_plugin: str = ""

    @property
    def job_namespaces(self) -> bool:
        """Whether jobs on this node may have namespaces of their own (private /tmp)."""
        return self.namespace_plugin not in ("", "job_container/none", "namespace/none")

    @property
    def ipv6(self) -> bool:
        """Whether slurmd listens on IPv6 (``CommunicationParameters=EnableIPv6``).

        Without it slurmd binds 0.0.0.0 only (``slurm_init_msg_engine_port``), so
        ``[v6 address]:SlurmdPort`` is free for any user on every host.
        """
        return "enableipv6" in self.comm_params

    @property
    def ipv4(self) -> bool:
        """Whether slurmd listens on IPv4 (not ``DisableIPv4``)."""
        return "disableipv4" not in self.comm_params


# -- this node ----------------------------------------------------------------


def _short(hostname: str) -> str:
    return hostname.split(".", 1)[0]


def host_addresses() -> frozenset[IPAddress]:
    """Every IP address configured on this host's interfaces (its network namespace)."""
    found: set[IPAddress] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(ValueError):
                    found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
    return frozenset(found)


def _literal_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None  # a host name: we do not resolve it


def _resolve_node(
    nodes: list[Node],
    *,
    nodename: str | None,
    hostname: str | None,
    addresses: frozenset[IPAddress] | None = None,
) -> Node | None:
    """Which configured node this host is, the way libslurm guesses it (reference §1.10).

    An explicit ``nodename`` wins. Otherwise the short hostname is looked up
    as a NodeHostname (which defaults to the NodeName, so plain setups match
    by name), then as a NodeName; then a node whose NodeAddr is a literal IP
    address of this host (exactly one: several nodes on one address are
    multiple slurmds, which need ``nodename``); then ``localhost`` as a
    NodeHostname. The address step stands in for libslurm's DNS alias lookup
    (``slurm_conf_get_aliased_nodename``), which we do not do: a resolver
    that is slow or down must not decide which node this is.
    """
    if nodename is not None:
        for node in nodes:
            if node.name == nodename:
                return node
        return Node(nodename, nodename, nodename, None)
    short = _short(hostname if hostname is not None else socket.gethostname())
    for candidates in (
        [n for n in nodes if _short(n.hostname) == short],
        [n for n in nodes if n.name == short],
    ):
        if candidates:
            return candidates[0]
    mine = host_addresses() if addresses is None else addresses
    by_address = [n for n in nodes if _literal_ip(n.addr) in mine]
    if len(by_address) == 1:
        return by_address[0]
    if by_address:
        return None  # ambiguous: refuse to guess between slurmds sharing this address
    local = [n for n in nodes if n.hostname == "localhost"]
    return local[0] if local else None


def expand_spool_dir(
    template: str, nodename: str | None, node_hostname: str | None = None
) -> str | None:
    """Expand ``%n`` (NodeName) and ``%h`` (NodeHostname) in SlurmdSpoolDir.

    ``%h`` defaults to the node name, as NodeHostname does. Returns None when
    the template needs a node name we do not know: guessing would point the
    broker at another node's sockets.
    """
    if nodename is None:
        return None if re.search(r"%[nh]", template) else template
    return template.replace("%n", nodename).replace("%h", node_hostname or nodename)


# -- where a callerid request may go ---------------------------------------------


Resolver = Callable[[str, int], list[IPAddress]]


def resolve_name(name: str, family: int) -> list[IPAddress]:
    """Every address ``name`` resolves to in ``family`` (AF_INET, AF_INET6 or AF_UNSPEC)."""
    literal = _literal_ip(name)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    found: list[IPAddress] = []
    for info in infos:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    return found


def slurmd_addresses(
    nodes: Iterable[tuple[str, Iterable[str], int]],
    *,
    ipv4: bool,
    ipv6: bool,
    resolve: Resolver = resolve_name,
    timeout: float = RESOLVE_TIMEOUT,
) -> tuple[Mapping[IPAddress, int], tuple[str, ...]]:
    """Map every address of the given nodes' slurmds to the port it listens on.

    ``nodes`` gives, per node, its NodeName, the names to resolve (NodeAddr
    and NodeHostname) and its port. Only the families slurmd listens on
    count. Names are resolved in parallel under one ``timeout`` (seconds); the
    NodeNames of nodes that got no address at all are returned second. The
    first node of an address keeps it (several slurmds on one host need
    per-node ``Port=`` values; any of them answers).
    """
    family = socket.AF_UNSPEC if ipv4 and ipv6 else socket.AF_INET6 if ipv6 else socket.AF_INET
    table = [(label, list(dict.fromkeys(names)), port) for label, names, port in nodes]
    unique = list(dict.fromkeys(name for _, names, _ in table for name in names))
    results = {name: resolve(name, family) for name in unique if _literal_ip(name) is not None}
    pending = [name for name in unique if name not in results]
    if pending:
        deadline = time.monotonic() + timeout
        pool = ThreadPoolExecutor(max_workers=min(8, len(pending)),
                                  thread_name_prefix="resolve")
        try:
            futures = {pool.submit(resolve, name, family): name for name in pending}
            wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()))
            for future, name in futures.items():
                if future.done() and future.exception() is None:
                    results[name] = future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    addresses: dict[IPAddress, int] = {}
    unresolved: list[str] = []
    for label, names, port in table:
        found = [a for name in names for a in results.get(name, [])
                 if (a.version == 4 and ipv4) or (a.version == 6 and ipv6)]
        if not found:
            unresolved.append(label)
        for address in found:
            addresses.setdefault(address, port)
    return addresses, tuple(unresolved)


# -- Slurm version ------------------------------------------------------------


def slurm_version(commands: tuple[str, ...] = VERSION_COMMANDS) -> str | None:
    """The installed Slurm version from ``slurmd -V`` or ``scontrol -V``, e.g. ``22.05.8``.

    Runs the first tool that exists, from fixed paths, with a fixed
    environment and a :data:`VERSION_TIMEOUT` bound. Returns None if none
    answers sensibly; the protocol then falls back to the newest version.
    """
    for command in commands:
        if not os.access(command, os.X_OK):
            continue
        try:
            done = run.run([command, "-V"], timeout=VERSION_TIMEOUT, max_output=4096)
        except run.ToolError:
            continue
        if done.returncode != 0:
            continue
        output = done.text()
        match = re.search(r"\b(\d+\.\d+\.\d+\S*)", output)
        if match:
            return match.group(1)
    return None


def protocol_for(version: str | None, table: Mapping[str, int] = PROTOCOL_VERSIONS) -> int:
    """SLURM_PROTOCOL_VERSION of a release string; the newest we know if unknown."""
    if version is None:
        return NEWEST_PROTOCOL
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return NEWEST_PROTOCOL
    key = f"{int(match.group(1)):02d}.{int(match.group(2)):02d}"
    return table.get(key, NEWEST_PROTOCOL)


# -- entry point --------------------------------------------------------------


def _find_conf(conf_path: str) -> str:
    """The slurm.conf to read: ``conf_path``, else the configless cache copy."""
    for candidate in (conf_path, CONFIGLESS_CONF):
        if os.path.isfile(candidate):
            return candidate
    raise SlurmConfigError(
        f"no slurm.conf: neither {conf_path} nor the configless copy {CONFIGLESS_CONF} exists"
    )


def _slurm_user(name: str, path: str, key: str = "SlurmUser") -> tuple[str, int]:
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError) as err:
        raise SlurmConfigError(f"{path}: {key} {name!r} is not a known user") from err
    return entry.pw_name, entry.pw_uid


def _int(value: str, key: str, path: str) -> int:
    try:
        return int(value)
    except ValueError as err:
        raise SlurmConfigError(f"{path}: {key}={value!r} is not a number") from err


def _plugins(value: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in value.split(",") if p.strip())


def load_slurm_facts(
    conf_path: str = DEFAULT_CONF,
    *,
    nodename: str | None = None,
    hostname: str | None = None,
    addresses: frozenset[IPAddress] | None = None,
    version: str | None = None,
    resolve: Resolver | None = None,
) -> SlurmFacts:
    """Read slurm.conf (and its includes) and the Slurm version into :class:`SlurmFacts`.

    ``nodename`` is the site's explicit node name (the ``nodename=`` option)
    and wins over any guess; ``hostname`` replaces ``socket.gethostname()``
    (for tests and the doctor), ``addresses`` this host's IP addresses.
    ``version`` skips running ``slurmd -V``; ``resolve`` replaces the
    resolver of node addresses (tests).
    Raises :class:`SlurmConfigError` if no slurm.conf can be read or a value
    we need is malformed. An unknown node is not an error here: the facts say
    ``nodename=None`` and the decision applies ``action_generic_failure``.
    """
    path = _find_conf(conf_path)
    parsed = parse(path)
    glob_ = parsed.globals
    cluster = glob_.get("clustername")
    if not cluster:
        raise SlurmConfigError(f"{path}: ClusterName is not set")
    node = _resolve_node(
        nodes(parsed), nodename=nodename, hostname=hostname, addresses=addresses
    )
    slurmd_port = _int(glob_.get("slurmdport", str(DEFAULT_SLURMD_PORT)), "SlurmdPort", path)
    port = node.port if node is not None and node.port is not None else slurmd_port
    user, uid = _slurm_user(glob_.get("slurmuser", "root"), path)
    _, slurmd_uid = _slurm_user(glob_.get("slurmduser", "root"), path, key="SlurmdUser")
    auth_socket, auth_ttl = parse_auth_info(glob_.get("authinfo"))
    comm_params = parse_comm_params(glob_.get("communicationparameters"))
    ipv4, ipv6 = "disableipv4" not in comm_params, "enableipv6" in comm_params
    all_nodes = nodes(parsed)
    slurmds, unresolved = slurmd_addresses(
        ((n.name, (n.addr, n.hostname), n.port if n.port is not None else slurmd_port)
         for n in all_nodes),
        ipv4=ipv4, ipv6=ipv6, resolve=resolve or resolve_name,
    )
    if version is None:
        version = slurm_version()
    return SlurmFacts(
        conf_path=path,
        cluster_name=cluster,
        nodename=node.name if node else None,
        node_hostname=node.hostname if node else None,
        node_addr=node.addr if node else None,
        spool_dir=expand_spool_dir(
            glob_.get("slurmdspooldir", DEFAULT_SPOOL_DIR),
            node.name if node else None,
            node.hostname if node else None,
        ),
        slurmd_port=port,
        slurm_user=user,
        slurm_user_uid=uid,
        prolog_flags=frozenset(
            f.strip().lower() for f in glob_.get("prologflags", "").split(",") if f.strip()
        ),
        proctrack_type=glob_.get("proctracktype", DEFAULT_PROCTRACK).lower(),
        task_plugins=_plugins(glob_.get("taskplugin", "")) or DEFAULT_TASK_PLUGINS,
        version=version,
        protocol_version=protocol_for(version),
        slurmd_user_uid=slurmd_uid,
        auth_socket=auth_socket,
        auth_ttl=auth_ttl,
        comm_params=comm_params,
        slurmds=slurmds,
        unresolved=unresolved,
        namespace_plugin=(glob_.get("namespacetype") or glob_.get("jobcontainertype")
                          or "").strip().lower(),
    )


__all__ = [
    "CONFIGLESS_CONF",
    "DEFAULT_CONF",
    "DEFAULT_SLURMD_PORT",
    "DEFAULT_SPOOL_DIR",
    "SlurmFacts",
    "expand_hostlist",
    "expand_spool_dir",
    "load_slurm_facts",
    "protocol_for",
    "slurm_version",
]
