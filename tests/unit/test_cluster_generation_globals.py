"""scripts/cluster's modules read the selected lab generation at call time.

``select_generation()`` (scripts/_cluster/generation.py) rebinds module globals (``RUN``,
``VAR``, ...). A module that imported one of them by name (``from .generation import RUN``)
would keep the default generation's value and silently work on bookworm's paths under
``-g trixie``. Checked on the source text: nothing of the lab is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO

SCRIPTS = REPO / "scripts"
GENERATION = SCRIPTS / "_cluster" / "generation.py"


def _harness_sources() -> list[Path]:
    return [SCRIPTS / "cluster", *sorted((SCRIPTS / "_cluster").glob("*.py"))]


def _rebound() -> set[str]:
    """The names select_generation() declares global (and so rebinds)."""
    tree = ast.parse(GENERATION.read_text())
    names = {name for node in ast.walk(tree) if isinstance(node, ast.Global)
             for name in node.names}
    assert {"GEN", "RUN", "VAR", "ETC", "LOG", "VENV"} <= names
    return names


def test_no_module_copies_a_rebound_generation_global() -> None:
    rebound = _rebound()
    for path in _harness_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("generation"):
                copied = {alias.name for alias in node.names} & rebound
                assert not copied, f"{path}:{node.lineno} imports {sorted(copied)} by name"


def test_only_generation_py_rebinds_module_globals() -> None:
    # Other mutable settings are module attributes set from outside (util.VERBOSE).
    for path in _harness_sources():
        if path == GENERATION:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            assert not isinstance(node, ast.Global), \
                f"{path}:{node.lineno}: global {', '.join(node.names)}"
