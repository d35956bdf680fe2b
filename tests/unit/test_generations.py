"""tests/harness.py's record of the lab generations agrees with scripts/cluster's
(scripts/_cluster/generation.py)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.harness import GENERATIONS, HOST_NUM, REPO


def _cluster_script() -> ModuleType:
    """scripts/cluster's record of the generations (a module of plain data, no lab needed)."""
    path = REPO / "scripts/_cluster/generation.py"
    spec = importlib.util.spec_from_file_location("_lab_cluster_generation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_lab_cluster_generation"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_harness_and_cluster_script_agree_on_every_generation() -> None:
    script = _cluster_script()
    assert set(script.GENERATIONS) == set(GENERATIONS)
    assert script.HOST_NUM == HOST_NUM
    for name, mine in GENERATIONS.items():
        theirs = script.GENERATIONS[name]
        assert (mine.root, mine.run, mine.var, mine.log) == (
            theirs.root, theirs.run, theirs.var, theirs.log), name
        assert mine.venv == theirs.prefix / "venv", name
        assert (mine.v4_net, mine.v6_net, mine.node_names) == (
            theirs.v4_net, theirs.v6_net, theirs.node_names), name


def test_slurm_node_names_never_collide_across_generations() -> None:
    # cgroup v1 is host-wide and Slurm's prefix is /slurm_<NodeName>.
    seen: set[str] = set()
    for gen in GENERATIONS.values():
        names = {node for _host, node in gen.node_names}
        assert not names & seen, gen.name
        seen |= names
