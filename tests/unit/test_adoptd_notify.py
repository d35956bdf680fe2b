"""``sshd-adoptd --foreground`` under systemd (Type=notify): READY=1 with a STATUS= line."""

from __future__ import annotations

import dataclasses
import socket
import tempfile
from pathlib import Path

import pytest

from sshd_adopt._internal.broker.server import Broker
from sshd_adopt.cli import adoptd
from tests.unit.fakes import broker_state


def test_ready_carries_a_status_line_for_systemctl_status(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "notify")
        systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        systemd.bind(path)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            adoptd._notify_ready("node n1; process events: proc connector\nsecond line")
            datagram = systemd.recv(4096)
        finally:
            systemd.close()
    assert datagram == b"READY=1\nSTATUS=node n1; process events: proc connector second line"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    adoptd._notify_ready("anything")  # no socket, no error


def test_the_status_names_the_node_the_events_source_and_a_slurm_problem() -> None:
    broker = Broker(broker_state)
    assert broker.status() == "node n1; process events: none: not started"
    unread = dataclasses.replace(broker_state(slurm=False), slurm_problem="no slurm.conf")
    missing = Broker(lambda: unread)
    assert missing.status() == ("node ?; process events: none: not started; "
                                "Slurm problem: no slurm.conf")


def test_the_status_is_told_again_when_missing_slurm_facts_are_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    unread = dataclasses.replace(broker_state(slurm=False), slurm_problem="no slurm.conf")
    answers = [unread, broker_state()]
    broker = Broker(lambda: answers.pop(0))
    monkeypatch.setattr(broker.node, "reloaded", lambda old: None)
    told: list[str] = []
    broker._ready = told.append  # as serve() sets it once the socket listens
    assert broker.retry_slurm() is True
    assert told == ["node n1; process events: none: not started"]
