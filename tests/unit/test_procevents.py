"""The proc connector subscription: an event mask where the kernel reads one, and only the
followed events arriving (a live check against this machine's kernel)."""

from __future__ import annotations

import os
import select
import struct
import time

import pytest

from sshd_adopt._internal.node import procevents
from sshd_adopt._internal.node.procevents import (
    FOLLOWED_EVENTS,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    subscription,
)

_LISTEN = 1
_PROC_EVENT_GID = 0x40
_PROC_EVENT_SID = 0x80


@pytest.mark.parametrize("release", ["6.6.0", "6.18.44-fc-v782", "7.0", "10.1.2"])
def test_kernels_from_6_6_get_the_event_mask(release: str) -> None:
    assert subscription(release) == struct.pack("=II", _LISTEN, FOLLOWED_EVENTS)


@pytest.mark.parametrize("release", ["6.1.0-28-amd64", "5.14.0-427.el9.x86_64", "4.19.0",
                                     "6.5.13", "", "custom", "6"])
def test_older_or_unreadable_releases_get_the_bare_operation(release: str) -> None:
    """A 6.1 kernel (Debian 12) ignores an 8-byte subscription: the broker would get no
    events at all, so anything not known to filter gets the 4-byte form."""
    assert subscription(release) == struct.pack("=I", _LISTEN)


def _whats(data: bytes) -> list[tuple[int, bytes]]:
    """(what, detail) of every message of one raw datagram."""
    found = []
    offset = 0
    while offset + 16 <= len(data):
        length = struct.unpack_from("=I", data, offset)[0]
        if length < 16:
            break
        start = offset + 16 + 20
        what = struct.unpack_from("=I", data, start)[0]
        found.append((what, data[start + 16:offset + length]))
        offset += (length + 3) & ~3
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs CAP_NET_ADMIN")
def test_on_this_kernel_only_the_followed_events_arrive() -> None:
    sock = procevents.open_proc_connector()
    try:
        pid = os.fork()
        if pid == 0:  # a child that changes its gid and session, then exits
            try:
                os.setsid()
                os.setgid(65534)  # a change: the kernel reports only changes
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        seen: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not any(
                what == PROC_EVENT_EXIT and struct.unpack_from("=I", detail)[0] == pid
                for what, detail in seen):
            if select.select([sock], [], [], 0.1)[0]:
                seen += _whats(sock.recv(65536))
    finally:
        sock.close()
    child_events = {what for what, detail in seen
                    if len(detail) >= 4 and pid in struct.unpack_from("=II", detail)}
    assert PROC_EVENT_EXIT in child_events, "the connector delivered nothing of the child"
    filtering = subscription(os.uname().release) != struct.pack("=I", _LISTEN)
    others = {what for what, _ in seen} & {_PROC_EVENT_GID, _PROC_EVENT_SID}
    if filtering:
        assert not others, f"the kernel sent events outside the mask: {others}"
    else:
        assert others, "without a mask the gid and sid events should have come too"
    assert PROC_EVENT_FORK in {what for what, _ in seen}


def test_this_test_runs_in_the_initial_namespaces() -> None:
    """The lab's brokers and this host: the connector is usable here."""
    assert procevents.foreign_namespace() is None


@pytest.mark.parametrize(("kind", "name"), [("pid", "pid:[4026532301]"),
                                            ("user", "user:[4026532299]")])
def test_in_a_pid_or_user_namespace_of_its_own_the_broker_does_without(
        monkeypatch: pytest.MonkeyPatch, kind: str, name: str) -> None:
    """A container's broker would get the host's pids: it must not subscribe at all (the
    kernel would ignore it, and other listeners' events would still arrive)."""
    real = os.readlink

    def readlink(path: str) -> str:
        return name if path == f"/proc/self/ns/{kind}" else real(path)

    monkeypatch.setattr(os, "readlink", readlink)
    assert f"not in the initial {kind} namespace ({name})" in (
        procevents.foreign_namespace() or "")
    opened: list[bool] = []
    monkeypatch.setattr(procevents, "_connector_socket", lambda: opened.append(True))
    with pytest.raises(OSError, match=f"initial {kind} namespace"):
        procevents.open_proc_connector()
    assert opened == []
