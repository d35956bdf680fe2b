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


# --------------------------------------------------------------------------- exact bounds


def body_of(items: dict[str, str]) -> bytes:
    return "\0".join(f"{k}={v}" for k, v in items.items()).encode()


def test_a_frame_of_exactly_the_limit_is_taken_one_byte_more_is_not() -> None:
    assert protocol.frame_length(protocol.MAX_FRAME.to_bytes(4, "big")) == protocol.MAX_FRAME
    with pytest.raises(BrokerProtocolError):
        protocol.frame_length((protocol.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(BrokerProtocolError):
        protocol.frame_length((0).to_bytes(4, "big"))
    assert protocol.frame_length((258).to_bytes(4, "big")) == 258  # big-endian
    items = {"v": "1", "op": "adopt", "o.x": "y" * (protocol.MAX_FRAME - 17)}
    frame = protocol.encode(items)
    assert len(frame) == 4 + protocol.MAX_FRAME
    assert protocol.decode(frame[4:]) == items
    with pytest.raises(BrokerProtocolError):
        protocol.encode({**items, "o.x": items["o.x"] + "y"})
    with pytest.raises(BrokerProtocolError):
        protocol.decode(frame[4:] + b"y")


def test_item_count_bound() -> None:
    many = {f"k{i}": "v" for i in range(protocol.MAX_ITEMS)}
    assert protocol.decode(body_of(many)) == many
    with pytest.raises(BrokerProtocolError):
        protocol.decode(body_of({**many, "one-more": "v"}))


@pytest.mark.parametrize("item", [b"noequals", b"=value", b"bad key=v", b"k\xc3=v"])
def test_malformed_items_are_refused(item: bytes) -> None:
    with pytest.raises(BrokerProtocolError):
        protocol.decode(b"v=1\0" + item)


def test_user_name_and_override_bounds() -> None:
    user = "u" * protocol.MAX_USER_CHARS
    assert protocol.parse_request(body_of({"v": "1", "op": "keys", "user": user}))[1] == {
        "user": user}
    for bad in (user + "u", "", "a b", "a/b"):
        with pytest.raises(BrokerProtocolError):
            protocol.parse_request(body_of({"v": "1", "op": "keys", "user": bad}))
    key, value = "o." + "k" * 62, "v" * 256
    assert protocol.parse_request(body_of({"v": "1", "op": "adopt", key: value}))[1] == {
        key[2:]: value}
    for bad_key, bad_value in ((key + "k", "v"), (key, value + "v"), ("x.k", "v")):
        with pytest.raises(BrokerProtocolError):
            protocol.parse_request(body_of({"v": "1", "op": "adopt", bad_key: bad_value}))


def test_a_spawn_request_carries_only_its_terminal_flag_and_sftp_server() -> None:
    frame = protocol.encode(protocol.spawn_request(True, "/usr/lib/openssh/sftp-server"))
    assert protocol.parse_request(frame[protocol.LENGTH_BYTES:]) == (
        "spawn", {"tty": "1", "sftp": "/usr/lib/openssh/sftp-server"})
    frame = protocol.encode(protocol.spawn_request(False, "/x"))
    assert protocol.parse_request(frame[protocol.LENGTH_BYTES:])[1]["tty"] == "0"


@pytest.mark.parametrize("body", [
    b"v=1\0op=spawn\0tty=1",  # no sftp
    b"v=1\0op=spawn\0tty=1\0sftp=/s\0uid=0",  # a claimed fact
    b"v=1\0op=spawn\0tty=1\0sftp=/s\0o.action_unknown=deny",  # options are adopt's
    b"v=1\0op=spawn\0tty=yes\0sftp=/s",
    b"v=1\0op=spawn\0tty=1\0sftp=relative/sftp-server",
    b"v=1\0op=spawn\0tty=1\0sftp=/" + b"a" * protocol.MAX_PATH_CHARS,
    b"v=1\0op=spawn\0tty=1\0sftp=/a\nb",
])
def test_bad_spawn_requests_are_refused(body: bytes) -> None:
    with pytest.raises(BrokerProtocolError):
        protocol.parse_request(body)


@given(st.dictionaries(st.sampled_from(["v", "op", "tty", "sftp", "job", "uid", "o.x"]),
                       st.text(max_size=300).filter(lambda s: "\0" not in s), max_size=7))
def test_spawn_requests_parse_to_the_two_items_or_fail(items: dict[str, str]) -> None:
    items = {"v": "1", "op": "spawn", **{k: v for k, v in items.items() if k not in ("v", "op")}}
    try:
        frame = protocol.encode(items)
    except BrokerProtocolError:
        return
    try:
        op, arguments = protocol.parse_request(frame[protocol.LENGTH_BYTES:])
    except BrokerProtocolError:
        return
    assert op == "spawn"
    assert set(arguments) == {"tty", "sftp"}
    assert arguments["tty"] in ("0", "1")
    assert arguments["sftp"].startswith("/")
    assert len(arguments["sftp"]) <= protocol.MAX_PATH_CHARS
