"""The broker wire format: round trips, bounds and malformed input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshd_adopt._internal import protocol
from sshd_adopt.errors import BrokerProtocolError


def test_request_round_trip() -> None:
    frame = protocol.encode({"v": "1", "op": "adopt", "o.action_unknown": "deny"})
    length = protocol.frame_length(frame[:4])
    assert length == len(frame) - 4
    op, overrides = protocol.parse_request(frame[4:])
    assert op == "adopt"
    assert overrides == {"action_unknown": "deny"}


def test_reply_carries_env_and_message() -> None:
    items = protocol.reply(protocol.ADOPTED, job=12, env={"SLURM_JOB_ID": "12"})
    decoded = protocol.decode(protocol.encode(items)[4:])
    assert decoded["job"] == "12"
    assert decoded["env.SLURM_JOB_ID"] == "12"


@pytest.mark.parametrize("header", [b"\0\0\0\0", (protocol.MAX_FRAME + 1).to_bytes(4, "big"),
                                    b"\xff\xff\xff\xff", b"\0\0"])
def test_length_prefix_is_bounded(header: bytes) -> None:
    with pytest.raises(BrokerProtocolError):
        protocol.frame_length(header)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe",  # not UTF-8
        b"v=1\0op=adopt\0v=1",  # duplicate
        b"v=1\0op=format-disk",  # unknown op
        b"v=2\0op=adopt",  # unknown version
        b"v=1\0op=adopt\0uid=0",  # the client may not claim facts
        b"v=1\0op=adopt\0noequals",
        b"v=1\0op=adopt\0bad key=x",
        b"\0".join([b"o.k%d=v" % i for i in range(100)]),  # too many items
    ],
)
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(BrokerProtocolError):
        protocol.parse_request(body)


def test_encode_refuses_nul_and_oversize() -> None:
    with pytest.raises(BrokerProtocolError):
        protocol.encode({"message": "a\0b"})
    with pytest.raises(BrokerProtocolError):
        protocol.encode({"message": "x" * (protocol.MAX_FRAME + 1)})


@given(st.binary(max_size=protocol.MAX_FRAME + 16))
def test_parser_never_raises_anything_but_protocol_errors(body: bytes) -> None:
    with contextlib.suppress(BrokerProtocolError):
        protocol.parse_request(body)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True),
                       st.text(max_size=40).filter(lambda s: "\0" not in s), max_size=20))
def test_encode_decode_round_trip(items: dict[str, str]) -> None:
    if not items:
        return
    assert protocol.decode(protocol.encode(items)[4:]) == items
