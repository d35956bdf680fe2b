"""Parsing /proc/net/tcp{,6}: native-endian address words, mapped IPv4, bad lines."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from sshd_adopt._internal import procfs
from sshd_adopt.errors import ProcError

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
          "   uid  timeout inode\n")


def word(addr: bytes) -> str:
    """How the kernel prints 4 address bytes: one native-endian 32-bit word in hex."""
    return f"{struct.unpack('=I', addr)[0]:08X}"


def row(local: str, lport: int, remote: str, rport: int, inode: int) -> str:
    return (f"   0: {local}:{lport:04X} {remote}:{rport:04X} 01 00000000:00000000 00:00000000 "
            f"00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")


def v4(text: str) -> str:
    return word(socket.inet_aton(text))


def v6(text: str) -> str:
    raw = ipaddress.IPv6Address(text).packed
    return "".join(word(raw[i:i + 4]) for i in range(0, 16, 4))


def test_ipv4_row() -> None:
    text = HEADER + row(v4("10.213.0.11"), 22, v4("10.213.0.5"), 50540, 4242)
    (conn,) = procfs.parse_tcp_table(text, "tcp")
    assert str(conn.local_ip) == "10.213.0.11"
    assert conn.local_port == 22
    assert str(conn.remote_ip) == "10.213.0.5"
    assert conn.remote_port == 50540
    assert conn.inode == 4242
    assert conn.family == 4


def test_ipv6_and_mapped_ipv4_rows() -> None:
    text = HEADER + row(v6("fd5a:213::11"), 22, v6("fd5a:213::5"), 40000, 1)
    text += row(v6("::ffff:10.213.0.11"), 22, v6("::ffff:10.213.0.12"), 40001, 2)
    plain, mapped = procfs.parse_tcp_table(text, "tcp6")
    assert str(plain.remote_ip) == "fd5a:213::5"
    assert plain.family == 6
    # A dual-stack listener shows IPv4 clients as ::ffff:a.b.c.d; the source
    # host's slurmd matches them only as IPv4, so they are normalised.
    assert str(mapped.remote_ip) == "10.213.0.12"
    assert mapped.family == 4


@pytest.mark.parametrize("line", ["   0: 0100007F:0016\n", "   0: XYZ:0016 0100007F:0016 01 a b c"
                                  " d e 5\n", "   0: 0100:0016 0100007F:0016 01 a b c d e 5\n"])
def test_malformed_rows_name_the_file_and_line(line: str) -> None:
    with pytest.raises(ProcError, match=r"/proc/1/net/tcp line 2"):
        procfs.parse_tcp_table(HEADER + line, "/proc/1/net/tcp")
