"""slurm.conf as text: hostlists, ``Key=Value`` tokens, includes, NodeName records.

A parser for the handful of keys the broker needs, not a validator: Slurm
itself refuses a broken file; we read what we use and skip the rest without
complaint. :mod:`.facts` turns the result into what the broker knows.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from sshd_adopt.errors import SlurmConfigError

#: Hard bound on one hostlist expansion: a typo such as ``n[1-99999999]``
#: must not make a root daemon allocate gigabytes.
MAX_HOSTLIST: Final = 65536
#: Bound on Include nesting: an include cycle must end, not recurse forever.
MAX_INCLUDE_DEPTH: Final = 16

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
class Parsed:
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


def parse(path: str) -> Parsed:
    parsed = Parsed()
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
class Node:
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


def nodes(parsed: Parsed) -> list[Node]:
    """Expand every NodeName line, applying NodeName=DEFAULT values seen before it."""
    defaults: dict[str, str] = {}
    nodes: list[Node] = []
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
            nodes.append(Node(name, hostnames[i], addrs[i], port))
    return nodes


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


