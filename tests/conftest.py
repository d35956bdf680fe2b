"""pytest wiring for the lab cluster (see tests/harness.py and scripts/cluster).

Every test under tests/integration/ is marked ``cluster``. The session-scoped ``cluster``
fixture brings the lab up once (``scripts/cluster up`` unless ``scripts/cluster status`` says
it is healthy); if that fails, the tests ERROR - nothing is skipped. After each cluster test all
jobs are cancelled, so tests leave no job behind and do not depend on their order. Only one
pytest session uses the lab at a time (a flock on /var/lib/sshd-adopt-lab/pytest.lock; a
second session waits up to 15 minutes for it).

Environment: SSHD_ADOPT_LAB_SKIP_BROKER=1 / SSHD_ADOPT_LAB_SKIP_DROPIN=1 are passed on to
``scripts/cluster up``.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import VAR, Cluster

INTEGRATION = Path(__file__).resolve().parent / "integration"
LOCK = VAR / "pytest.lock"
LOCK_WAIT = 900.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        raise RuntimeError("the lab cluster tests must run as root")
    # One pytest session at a time per lab: every cluster test cancels all jobs afterwards
    # (and the lifecycle tests restart the lab), so two concurrent sessions would break each
    # other's jobs. The lock lives in the lab state dir, which `down` keeps.
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another pytest session holds {LOCK} for more than "
                                       f"{LOCK_WAIT:.0f}s") from None
                time.sleep(1)
        lab = Cluster()
        lab.ensure_up()
        yield lab


@pytest.fixture(autouse=True)
def _cluster_clean_jobs(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("cluster") is None:
        yield
        return
    lab: Cluster = request.getfixturevalue("cluster")
    yield
    lab.cancel_all()
