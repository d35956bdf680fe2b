"""REQUEST_NETWORK_CALLERID on the wire: Slurm's framing, packed and parsed (pure).

The request: Slurm's message header (protocol version, flags, message type, body
length, no forwarding), the MUNGE auth block whose credential payload is the body's
hash (libslurm's binding: ``_compute_hash`` in ``src/common/slurm_protocol_api.c``),
and the body -- the connection's two addresses and ports
(``_pack_network_callerid_msg`` in ``src/common/slurm_protocol_pack.c``). The answer:
the same header and auth block, then a job id, Slurm rc and node name
(``_unpack_network_callerid_resp_msg``), or a RESPONSE_SLURM_RC. Every read is
bounded; anything malformed is a :class:`ProtocolFailure` (fuzzed in
``tests/unit/test_fuzz.py``). The transport and the deadline are
:mod:`sshd_adopt._internal.slurm.callerid`'s.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from Crypto.Hash import KangarooTwelve

from sshd_adopt._internal.core.connection import Connection
from sshd_adopt.errors import CallerIdError

# --- Slurm constants (reference §3.2, §3.5) --------------------------------------------------

REQUEST_NETWORK_CALLERID = 5035
RESPONSE_NETWORK_CALLERID = 5036
RESPONSE_SLURM_RC = 8001
AUTH_PLUGIN_MUNGE = 101
HASH_PLUGIN_NONE = 1
HASH_PLUGIN_K12 = 2  # slurm.h hash_plugin_type
K12_BYTES = 32
NO_VAL = 0xFFFFFFFE
AF_INET = 2  # Slurm packs Linux's numbers; spelled out so the wire does not follow the host
AF_INET6 = 10

PROTOCOL_22_05 = 0x2600  # 9728: verified live (reference §6)
PROTOCOL_24_11 = 0x2A00  # 10752
PROTOCOL_25_11 = 0x2C00  # 11264: the response body carries a full step id from here on
PROTOCOL_26_05 = 0x2D00  # 11520
#: Versions whose request framing we know (reference §3.5): the 22.05 header is
#: unchanged for forward_cnt = ret_cnt = 0 through 26.05. Older peers (< 22.05)
#: have another header and no hash in the credential; newer ones are unknown.
#: Versions above 24.11 are documented but not verified live.
SPOKEN_VERSIONS = range(PROTOCOL_22_05, PROTOCOL_26_05 + 0x100, 0x100)

#: Largest response we read. A callerid answer is ~200 bytes (header, a
#: ~150-byte credential, a node name); the bound stops a garbage length
#: prefix from making the root broker allocate or wait for megabytes.
MAX_RESPONSE = 64 * 1024
_HEADER_MIN = 16  # version, flags, type, body length, forward_cnt, ret_cnt, orig family


class ProtocolFailure(CallerIdError):
    """The native path cannot get an answer it understands.

    Raised by the pure pack/parse helpers; :func:`query_callerid` never lets
    it escape (it becomes UNREACHABLE, or a fallback to scontrol for
    :class:`Rejected`).
    """


class Rejected(ProtocolFailure):
    """The slurmd will not take our request (closed without answering, or a
    protocol version we do not speak): the one case where scontrol may do better."""


@dataclass(frozen=True)
class Reply:
    """A parsed callerid response: a job id (``None`` = NO_VAL), Slurm rc, node name."""

    job_id: int | None
    rc: int
    node_name: str


# --- packing (pure) --------------------------------------------------------------------------


def _address16(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Slurm's 16-byte address field: network order, IPv4 in the first 4 bytes."""
    return address.packed.ljust(16, b"\0")


def pack_request_body(conn: Connection) -> bytes:
    """The 52-byte ``network_callerid_msg_t`` (reference §3.3).

    ``ip_src`` is the ssh client (whose slurmd we ask), ``ip_dst`` this node.
    """
    af = AF_INET if conn.family == 4 else AF_INET6
    return b"".join(
        (
            struct.pack(">I", 16),
            _address16(conn.remote_ip),
            struct.pack(">I", 16),
            _address16(conn.local_ip),
            struct.pack(">III", conn.remote_port, conn.local_port, af),
        )
    )


def hash_payload(body: bytes, msg_type: int = REQUEST_NETWORK_CALLERID) -> bytes:
    """The munge payload that binds a credential to one message, as libslurm makes it.

    ``_compute_hash`` in ``src/common/slurm_protocol_api.c`` (22.05 → 26.05):
    the hash plugin id (K12 = 2), then KangarooTwelve over the packed body
    with the message type in network byte order as the customisation string,
    32 bytes; 33 bytes in all. The receiving slurmd (``_check_hash``)
    recomputes it over the body it received, so a captured credential is
    good for this exact request and nothing else.
    """
    digest = KangarooTwelve.new(data=body, custom=struct.pack(">H", msg_type)).read(K12_BYTES)
    return bytes([HASH_PLUGIN_K12]) + digest


def _packstr(data: bytes) -> bytes:
    """Slurm packstr: BE u32 length including the NUL, the bytes, the NUL."""
    return struct.pack(">I", len(data) + 1) + data + b"\0"


def pack_request(body: bytes, credential: bytes, protocol_version: int) -> bytes:
    """The full length-prefixed frame: header, munge auth, body.

    The 22.05 header (``slurm_send_node_msg``), unchanged for forward_cnt =
    ret_cnt = 0 through 26.05.
    """
    if protocol_version not in SPOKEN_VERSIONS:
        raise Rejected(f"protocol version {protocol_version:#x} not spoken natively")
    header = struct.pack(
        ">HHHIHHH", protocol_version, 0, REQUEST_NETWORK_CALLERID, len(body), 0, 0, 0
    )
    auth = struct.pack(">I", AUTH_PLUGIN_MUNGE) + _packstr(credential)
    message = header + auth + body
    return struct.pack(">I", len(message)) + message


# --- parsing (pure) --------------------------------------------------------------------------


class _Reader:
    """Bounds-checked big-endian reads over one response; short data is a ProtocolFailure."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self._data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise ProtocolFailure(f"response cut short in {what}")
        chunk = self._data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack(">I", self.take(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, what))[0]
        return value

    def packstr(self, what: str) -> bytes | None:
        length = self.u32(what)
        if length == 0:
            return None
        data = self.take(length, what)
        return data[:-1] if data.endswith(b"\0") else data


def response_length(prefix: bytes) -> int:
    """Parse and bound the 4-byte length prefix of a response."""
    if len(prefix) != 4:
        raise ProtocolFailure("response cut short in its length prefix")
    length: int = struct.unpack(">I", prefix)[0]
    if not _HEADER_MIN <= length <= MAX_RESPONSE:
        raise ProtocolFailure(f"response length {length} outside {_HEADER_MIN}..{MAX_RESPONSE}")
    return length


def _skip_header_and_auth(reader: _Reader) -> tuple[int, int]:
    """Read the 22.05-style header and skip the auth; return (version, msg_type).

    The response's munge credential is skipped, not verified, on purpose:
    we opened the TCP connection to the source address ourselves, so a
    forger would have to sit on that path, and the answer can only *choose*
    among this user's own jobs: the broker adopts a job only if it is one
    of the user's jobs with an extern step on this node. Verifying would
    cost an unmunge per login and buy nothing the decision relies on.
    """
    version = reader.u16("header")
    reader.u16("header")  # flags
    msg_type = reader.u16("header")
    body_length = reader.u32("header")
    if reader.u16("header") != 0:
        raise ProtocolFailure("response asks for forwarding")
    if reader.u16("header") != 0:
        raise ProtocolFailure("response carries a ret list")
    family = reader.u16("header")
    if family == AF_INET:
        reader.take(6, "orig_addr")
    elif family == AF_INET6:
        reader.take(reader.u32("orig_addr"), "orig_addr")
        reader.take(2, "orig_addr")
    elif family != 0:
        raise ProtocolFailure(f"response orig_addr family {family}")
    plugin = reader.u32("auth")
    if plugin != AUTH_PLUGIN_MUNGE:
        raise ProtocolFailure(f"response signed by auth plugin {plugin}, not munge")
    reader.packstr("auth credential")
    # Exact, as slurm itself checks since CVE-2023-49933: garbage rarely fits.
    if body_length != reader.remaining():
        raise ProtocolFailure(
            f"response body is {reader.remaining()} bytes, header says {body_length}"
        )
    return version, msg_type


def parse_response(message: bytes) -> Reply:
    """Parse a response *after* its length prefix: header, auth, body.

    The body layout follows the version in the response header (the slurmd
    answers with the request's version): below 25.11 it starts with a u32
    job id, from 25.11 with a full step id (reference §3.3).
    """
    reader = _Reader(message)
    version, msg_type = _skip_header_and_auth(reader)
    if msg_type == RESPONSE_SLURM_RC:
        rc = reader.u32("rc body")
        if rc != 0:
            raise ProtocolFailure(f"slurmd answered RESPONSE_SLURM_RC {rc}")
        # 22.05's libslurm leaves the job id unset on rc 0; we call it "no job".
        return Reply(None, 0, "")
    if msg_type != RESPONSE_NETWORK_CALLERID:
        raise ProtocolFailure(f"unexpected response type {msg_type}")
    if version >= PROTOCOL_25_11:
        reader.u64("step id")  # sluid
        job_id = reader.u32("step id")
        reader.take(8, "step id")  # step_id, step_het_comp
    else:
        job_id = reader.u32("job id")
    rc = reader.u32("return code")
    node = reader.packstr("node name") or b""
    if reader.remaining():
        raise ProtocolFailure("response body has trailing bytes")
    known = job_id not in (0, NO_VAL, 0xFFFFFFFF)
    return Reply(job_id if known else None, rc, node.decode(errors="replace"))
