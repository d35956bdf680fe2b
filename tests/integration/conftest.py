"""Fixtures for tests of sshd-adopt itself on the lab cluster."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests.harness import Cluster, wait_until


def reload_broker(cluster: Cluster, node: str) -> None:
    """SIGHUP the broker and wait until it logged the reload."""
    log = cluster.broker_log(node)
    mark = log.mark()
    os.kill(cluster.broker_pid(node), signal.SIGHUP)
    log.wait_for("reloaded", mark=mark, timeout=10)


@pytest.fixture
def broker_policy(cluster: Cluster) -> Iterator[Callable[..., None]]:
    """Change a node broker's configuration for one test, then restore it.

    ``broker_policy("n1", policy={"action_unknown": "allow"})`` appends keys to
    the lab config's sections and reloads the broker with SIGHUP, as an admin
    would. The original file is put back (and reloaded) after the test.
    """
    saved: dict[str, str] = {}

    def apply(node: str, **sections: dict[str, object]) -> None:
        path = cluster.broker_config(node)
        original = saved.setdefault(node, path.read_text())
        text = original
        for section, values in sections.items():
            lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
            header = f"[{section}]\n"
            if header in text:
                text = text.replace(header, header + "\n".join(lines) + "\n", 1)
            else:
                text += "\n" + header + "\n".join(lines) + "\n"
        path.write_text(text)
        reload_broker(cluster, node)

    yield apply
    for node, text in saved.items():
        cluster.broker_config(node).write_text(text)
        reload_broker(cluster, node)


@pytest.fixture
def broker_restart(cluster: Cluster) -> Iterator[None]:
    """Make sure every broker is running again after a test that stops one."""
    yield
    cluster.run_script("up", timeout=300)
    for node in ("n1", "n2", "n3"):
        wait_until(cluster.broker_socket(node).exists, 15, f"broker socket on {node}")
    time.sleep(0.2)
