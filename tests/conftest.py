"""pytest wiring for the lab cluster (see tests/harness.py and scripts/cluster).

Every test under tests/integration/ is marked ``cluster``. The session-scoped ``cluster``
fixture runs ``scripts/cluster up`` once per generation (it starts what is not running and
installs exactly this checkout into the lab venv); if that fails, the tests ERROR - nothing is
skipped. After each cluster test all
jobs are cancelled, so tests leave no job behind and do not depend on their order. Only one
pytest session uses a lab at a time (a flock on <lab state dir>/pytest.lock, per generation:
/var/lib/sshd-adopt-lab/pytest.lock for bookworm; a second session waits up to 15 minutes).

Generations: the ``cluster`` fixture is parametrised over the lab generations named by
``--generations bookworm,trixie,forky`` or ``$SSHD_ADOPT_GENERATIONS`` (default: all of them
when ``$CI`` is set, otherwise bookworm only), so every cluster test runs once per generation,
with ids like ``test_x[trixie]``. Tests written against host names ctl/login/n1..n3 work
unchanged (see tests/harness.py). Tests that are not generation-aware yet are listed in
BOOKWORM_ONLY and skipped on the other generations, with the reason.

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

from tests.harness import DEFAULT_GENERATION, GENERATIONS, VAR, Cluster

INTEGRATION = Path(__file__).resolve().parent / "integration"
LOCK = VAR / "pytest.lock"  # bookworm's; Cluster.var / "pytest.lock" in general
LOCK_WAIT = 900.0

#: Tests that still hard-code the bookworm lab (module constants of tests.harness such as
#: RUN/VAR/ADDRESSES, or fixtures of tests/integration/conftest.py built on them): they run on
#: bookworm only. Keys are module file names, or "file::test" (a prefix of the test name);
#: the fix is to use the Cluster's attributes (cluster.run/var/venv_host, cluster.address(),
#: cluster.broker_pid(), cluster.broker_config()) instead.
BOOKWORM_ONLY: dict[str, str] = {
    "test_lifecycle.py": "asserts on the bookworm RUN/NSDIR/state.json",
    "test_doctor_live.py": "reads VAR/etc of the bookworm lab",
    "test_stepd_live.py": "hard-codes the bookworm node address",
    "test_install.py": "installs into the host userland (bookworm) only",
    "test_install_node.py": "installs the host userland's python and sshd into n3; the "
                            "trixie lab runs from its own chroot",
    "test_harness.py::test_status_is_healthy_and_root_netns_untouched":
        "hard-codes 10.213.0.x / fd5a:213::",
}
#: Fixtures of tests/integration/conftest.py that act on the bookworm lab's files whatever
#: the generation (they would change the bookworm brokers from a trixie test).
BOOKWORM_ONLY_FIXTURES: dict[str, str] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--generations", default=None,
        help="comma-separated lab generations to run cluster tests on "
             f"({', '.join(GENERATIONS)}; default: $SSHD_ADOPT_GENERATIONS, or all of them "
             f"when $CI is set, else {DEFAULT_GENERATION})")


def selected_generations(config: pytest.Config) -> list[str]:
    raw = config.getoption("--generations") or os.environ.get("SSHD_ADOPT_GENERATIONS")
    if not raw:
        raw = ",".join(GENERATIONS) if os.environ.get("CI") else DEFAULT_GENERATION
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in GENERATIONS]
    if unknown or not names:
        raise pytest.UsageError(f"unknown lab generation(s) {unknown}; known: "
                                f"{', '.join(GENERATIONS)}")
    return names


def _in_integration(path: Path) -> bool:
    return INTEGRATION in path.resolve().parents


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``cluster`` (session scope, so one lab per generation per session)."""
    if _in_integration(Path(str(metafunc.definition.path))) \
            and "cluster" not in metafunc.fixturenames:
        # Cluster-marked tests without the fixture still get the lab (up, lock, clean jobs).
        metafunc.fixturenames.append("cluster")
    if "cluster" in metafunc.fixturenames:
        gens = selected_generations(metafunc.config)
        metafunc.parametrize("cluster", gens, indirect=True, scope="session", ids=gens)


def _bookworm_only_reason(item: pytest.Item) -> str | None:
    name = Path(str(item.path)).name
    test = getattr(item, "originalname", item.name)
    for key, why in BOOKWORM_ONLY.items():
        file, _, prefix = key.partition("::")
        if file == name and test.startswith(prefix):
            return why
    for fixture, why in BOOKWORM_ONLY_FIXTURES.items():
        if fixture in getattr(item, "fixturenames", ()):
            return why
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    for item in items:
        if _in_integration(Path(str(item.path))):
            item.add_marker(pytest.mark.cluster)
        callspec = getattr(item, "callspec", None)
        generation = callspec.params.get("cluster") if callspec is not None else None
        if generation is not None and generation != DEFAULT_GENERATION:
            reason = _bookworm_only_reason(item)
            if reason is not None:
                item.add_marker(pytest.mark.skip(
                    reason=f"bookworm-only until generation-aware: {reason}"))


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        raise RuntimeError("the lab cluster tests must run as root")
    generation = getattr(request, "param", DEFAULT_GENERATION)
    lab = Cluster(generation=generation)
    # One pytest session at a time per lab: every cluster test cancels all jobs afterwards
    # (and the lifecycle tests restart the lab), so two concurrent sessions would break each
    # other's jobs. The lock lives in the lab state dir, which `down` keeps.
    lock_path = lab.var / "pytest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"another pytest session holds {lock_path} for more "
                                       f"than {LOCK_WAIT:.0f}s") from None
                time.sleep(1)
        lab.ensure_up()
        yield lab


@pytest.fixture(autouse=True)
def _cluster_clean_jobs(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("cluster") is None or \
            "cluster" not in request.fixturenames:
        yield
        return
    lab: Cluster = request.getfixturevalue("cluster")
    yield
    lab.cancel_all()
