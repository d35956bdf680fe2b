"""The TCP 4-tuple of an ssh connection, as the broker found it in /proc."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Connection:
    """One TCP connection seen from this node: ``local`` is sshd's end.

    Addresses are normalised: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``,
    seen on dual-stack listeners) is stored as the IPv4 address, because the
    source host's slurmd matches the client's socket in ``/proc/net/tcp`` by
    family and address bytes.
    """

    local_ip: IPAddress
    local_port: int
    remote_ip: IPAddress
    remote_port: int
    inode: int = 0

    @property
    def family(self) -> int:
        """4 or 6, after normalisation."""
        return self.remote_ip.version

    def __str__(self) -> str:
        return f"{self.remote_ip} port {self.remote_port} -> {self.local_ip} port {self.local_port}"


def normalise(address: IPAddress) -> IPAddress:
    """Map ``::ffff:a.b.c.d`` to ``a.b.c.d``; leave everything else alone."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
