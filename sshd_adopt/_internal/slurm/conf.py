"""The facts the broker needs from the installed Slurm, read once at start and on SIGHUP.

We parse slurm.conf ourselves instead of asking ``scontrol show config``
because the broker must work when slurmctld is down and must not depend on a
network round trip at login time. Only the handful of keys we need are
interpreted; everything else is skipped without complaint, as Slurm skips
nothing but we have no reason to validate what we do not use.

Environment variables are never consulted (no ``SLURM_CONF``, no
``SLURMD_NODENAME``). The broker is root and answers requests from users; the
reference (§1.10) records that pam_slurm_adopt refuses non-sshd services for
exactly this reason: an environment variable could point libslurm at a
user-written slurm.conf (another spool dir, another node name) and so at
another user's job. Everything here comes from root-owned files and explicit
arguments, and the Slurm tools we run get a fixed, minimal environment.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import pwd
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Final

import psutil
import sh

from sshd_adopt._internal.core.connection import IPAddress
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

#: Hard bound on one hostlist expansion: a typo such as ``n[1-99999999]``
#: must not make a root daemon allocate gigabytes.
MAX_HOSTLIST: Final = 65536
#: Bound on Include nesting: an include cycle must end, not recurse forever.
MAX_INCLUDE_DEPTH: Final = 16
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
_TOOL_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
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


# -- hostlists ----------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in hostlist {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append("".join(current))
    return parts


_RANGE_RE: Final = re.compile(r"([0-9]+)(?:-([0-9]+))?", re.ASCII)


def _expand_range(body: str, whole: str) -> list[str]:
    """Expand the inside of one bracket, e.g. ``01-03,7`` → 01 02 03 7."""
    out: list[str] = []
    for item in body.split(","):
        match = _RANGE_RE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"bad range {item!r} in hostlist {whole!r}")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            out.append(lo)
            continue
        start, end = int(lo), int(hi)
        if end < start:
            raise ValueError(f"descending range {item!r} in hostlist {whole!r}")
        if end - start + 1 > MAX_HOSTLIST:
            raise ValueError(f"range {item!r} in hostlist {whole!r} is too large")
        # Slurm pads to the width of the lower bound when it has leading zeros.
        width = len(lo) if len(lo) > 1 and lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(start, end + 1))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist such as ``n[1-3,5],gpu[01-02]`` into names, in order.

    Supports comma-separated terms, ranges and single numbers in brackets,
    zero padding taken from the lower bound (``[08-10]`` → 08 09 10), and
    several bracket groups in one term (``r[1-2]n[1-2]`` → r1n1 r1n2 r2n1 r2n2).
    Duplicates are kept, as Slurm keeps them. Raises :class:`ValueError` on
    malformed input or more than :data:`MAX_HOSTLIST` names.
    """
    names: list[str] = []
    for raw_term in _split_top_level(expr.strip()):
        term = raw_term.strip()
        if not term:
            continue
        expanded = [""]
        for piece in re.split(r"(\[[^\]]*\])", term):
            if piece.startswith("["):
                choices = _expand_range(piece[1:-1], expr)
            elif "[" in piece or "]" in piece:
                raise ValueError(f"unbalanced brackets in hostlist {expr!r}")
            else:
                choices = [piece]
            if len(expanded) * len(choices) > MAX_HOSTLIST:
                raise ValueError(f"hostlist {expr!r} expands to too many names")
            expanded = [prefix + choice for prefix in expanded for choice in choices]
        names.extend(expanded)
        if len(names) > MAX_HOSTLIST:
            raise ValueError(f"hostlist {expr!r} expands to too many names")
    return names


# -- slurm.conf tokens --------------------------------------------------------

# Slurm's own key=value regex (s_p_parse_line): optional operator before '=',
# value either double-quoted or up to the next blank.
_PAIR_RE: Final = re.compile(
    r'\s*([A-Za-z0-9_.]+)\s*[-*+/]?=\s*(?:"([^"]*)"|(\S+))(?=\s|$)'
)
_INCLUDE_RE: Final = re.compile(r"^\s*include\s+(.+?)\s*$", re.IGNORECASE)
_GLOB_CHARS: Final = re.compile(r"[*?\[]")


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment; ``\\#`` is a literal ``#`` as in Slurm."""
    out: list[str] = []
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\" and i + 1 < len(line) and line[i + 1] == "#":
            out.append("#")
            i += 2
            continue
        if char == "#":
            break
        out.append(char)
        i += 1
    return "".join(out)


def _pairs(line: str, where: str) -> list[tuple[str, str]]:
    """Parse ``Key=Value Key2="a b"`` into (lower-case key, value) pairs."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    text = line.rstrip()
    while pos < len(text):
        match = _PAIR_RE.match(text, pos)
        if match is None:
            rest = text[pos:].strip()
            if not rest:
                break
            raise SlurmConfigError(f"{where}: cannot parse {rest!r}")
        key, quoted, bare = match.groups()
        pairs.append((key.lower(), quoted if quoted is not None else bare))
        pos = match.end()
    return pairs


@dataclass
class _Parsed:
    """slurm.conf after includes: global keys (last wins) and NodeName lines."""

    globals: dict[str, str] = field(default_factory=dict)
    node_lines: list[tuple[list[tuple[str, str]], str]] = field(default_factory=list)


def _logical_lines(path: str, conf_dir: str, depth: int) -> Iterator[tuple[str, str]]:
    """Yield (line, "file:lineno") of ``path``, following Include directives.

    Relative include paths are taken relative to the directory of the main
    slurm.conf (as ``_handle_include_path`` does in 22.05), not of the file
    that includes them. Globs are expanded in sorted order.
    """
    if depth > MAX_INCLUDE_DEPTH:
        raise SlurmConfigError(f"{path}: Include nested deeper than {MAX_INCLUDE_DEPTH}")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise SlurmConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    for number, raw in enumerate(lines, 1):
        where = f"{path}:{number}"
        line = _strip_comment(raw)
        if not line.strip():
            continue
        include = _INCLUDE_RE.match(line)
        if include and "=" not in include.group(1).split()[0]:
            target = include.group(1).strip().strip('"')
            if not os.path.isabs(target):
                target = os.path.join(conf_dir, target)
            matches = sorted(glob.glob(target)) if _GLOB_CHARS.search(target) else [target]
            for included in matches:
                yield from _logical_lines(included, conf_dir, depth + 1)
            continue
        yield line, where


def _parse(path: str) -> _Parsed:
    parsed = _Parsed()
    conf_dir = os.path.dirname(os.path.abspath(path))
    for line, where in _logical_lines(path, conf_dir, 0):
        pairs = _pairs(line, where)
        if not pairs:
            continue
        if pairs[0][0] == "nodename":
            parsed.node_lines.append((pairs, where))
        elif pairs[0][0] in {"partitionname", "nodeset", "downnodes", "frontendname", "switchname"}:
            continue  # other multi-key records we do not need
        else:
            # A repeated key overrides the earlier one, as in Slurm.
            parsed.globals.update(pairs)
    return parsed


# -- nodes --------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    name: str
    hostname: str
    addr: str
    port: int | None


def _paired(values: list[str], names: list[str], key: str, where: str) -> list[str]:
    """Pair a NodeHostname/NodeAddr/Port list with the node names of its line."""
    if len(values) == len(names):
        return values
    if len(values) == 1:
        return values * len(names)
    raise SlurmConfigError(
        f"{where}: {key} lists {len(values)} values for {len(names)} node names"
    )


def _nodes(parsed: _Parsed) -> list[_Node]:
    """Expand every NodeName line, applying NodeName=DEFAULT values seen before it."""
    defaults: dict[str, str] = {}
    nodes: list[_Node] = []
    seen: set[str] = set()
    for pairs, where in parsed.node_lines:
        record = dict(pairs[1:])  # a repeated key: the last one wins, as in Slurm
        names_expr = pairs[0][1]
        if names_expr.lower() == "default":
            defaults.update(record)
            continue
        merged = {**defaults, **record}
        try:
            names = expand_hostlist(names_expr)
            hostnames = expand_hostlist(merged["nodehostname"]) if "nodehostname" in merged else []
            addrs = expand_hostlist(merged["nodeaddr"]) if "nodeaddr" in merged else []
            ports = expand_hostlist(merged["port"]) if "port" in merged else []
        except ValueError as err:
            raise SlurmConfigError(f"{where}: {err}") from err
        hostnames = _paired(hostnames, names, "NodeHostname", where) if hostnames else names
        # NodeAddr defaults to NodeHostname (slurm.conf(5)).
        addrs = _paired(addrs, names, "NodeAddr", where) if addrs else hostnames
        port_list = _paired(ports, names, "Port", where) if ports else []
        for i, name in enumerate(names):
            if name in seen:
                continue  # Slurm rejects duplicates; keep the first definition
            seen.add(name)
            port: int | None = None
            if port_list:
                try:
                    port = int(port_list[i])
                except ValueError as err:
                    raise SlurmConfigError(f"{where}: bad Port {port_list[i]!r}") from err
            nodes.append(_Node(name, hostnames[i], addrs[i], port))
    return nodes


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
    nodes: list[_Node],
    *,
    nodename: str | None,
    hostname: str | None,
    addresses: frozenset[IPAddress] | None = None,
) -> _Node | None:
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
        return _Node(nodename, nodename, nodename, None)
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


# -- what callerid needs: credentials, families, the slurmds ---------------------


def parse_auth_info(value: str | None) -> tuple[str | None, int | None]:
    """``AuthInfo``'s munge ``socket=`` and ``ttl=``, as libslurm reads them.

    ``slurm_auth_opts_to_socket`` and ``slurm_get_auth_ttl`` in
    ``src/common/slurm_protocol_api.c``: options are comma-separated
    ``key=value``; a value without any ``=`` is the socket path (the old
    format); a ttl that is not a positive number means munged's default.
    """
    if not value:
        return None, None
    if "=" not in value:
        return value.strip() or None, None
    options: dict[str, str] = {}
    for item in value.split(","):
        key, sep, text = item.partition("=")
        if sep:
            options.setdefault(key.strip().lower(), text.strip())
    ttl: int | None = None
    with contextlib.suppress(ValueError):
        ttl = int(options.get("ttl", "")) or None
    if ttl is not None and ttl < 0:
        ttl = None
    return options.get("socket") or None, ttl


def parse_comm_params(value: str | None) -> frozenset[str]:
    """``CommunicationParameters`` as lower-case names (``keepaliveinterval=30`` → name only)."""
    return frozenset(
        item.split("=", 1)[0].strip().lower() for item in (value or "").split(",") if item.strip()
    )


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
            output = str(
                sh.Command(command)("-V", _timeout=VERSION_TIMEOUT, _env=_TOOL_ENV, _tty_out=False)
            )
        except (sh.ErrorReturnCode, sh.TimeoutException, sh.CommandNotFound, OSError):
            continue
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
    parsed = _parse(path)
    glob_ = parsed.globals
    cluster = glob_.get("clustername")
    if not cluster:
        raise SlurmConfigError(f"{path}: ClusterName is not set")
    node = _resolve_node(
        _nodes(parsed), nodename=nodename, hostname=hostname, addresses=addresses
    )
    slurmd_port = _int(glob_.get("slurmdport", str(DEFAULT_SLURMD_PORT)), "SlurmdPort", path)
    port = node.port if node is not None and node.port is not None else slurmd_port
    user, uid = _slurm_user(glob_.get("slurmuser", "root"), path)
    _, slurmd_uid = _slurm_user(glob_.get("slurmduser", "root"), path, key="SlurmdUser")
    auth_socket, auth_ttl = parse_auth_info(glob_.get("authinfo"))
    comm_params = parse_comm_params(glob_.get("communicationparameters"))
    ipv4, ipv6 = "disableipv4" not in comm_params, "enableipv6" in comm_params
    all_nodes = _nodes(parsed)
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
