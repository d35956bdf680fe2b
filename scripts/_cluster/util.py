"""Small helpers the whole lab harness uses: messages, running commands, files, waiting.

``say`` prints ``cluster: MESSAGE`` on stderr; ``debug`` does so only with ``-v``
(scripts/cluster sets ``VERBOSE``; it changes after import, so read it as
``util.VERBOSE``). ``run`` runs a fixed argv in ``CLEAN_ENV`` and raises ``LabError``
when it fails; ``LabError`` is what the commands report as ``cluster: ERROR: ...``.
``write_if_changed``, ``fill`` (the scripts/lab/*.in templates), ``digest``, ``tail``
and ``wait_for`` are what the configuration and daemon code builds on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: scripts/cluster, the entry point (`up` names it in its last message).
SCRIPT = Path(__file__).resolve().parent.parent / "cluster"
#: The checkout: what the lab installs, and the scripts/lab/*.in config templates.
REPO = SCRIPT.parent.parent
TEMPLATES = SCRIPT.parent / "lab"
#: The environment of every command the lab runs (lab daemons too).
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": os.environ.get("TERM", "dumb"),
}


class LabError(Exception):
    """A failure that `up`/`down` reports and turns into a non-zero exit."""


#: -v: show every command run (set by scripts/cluster after parsing its arguments).
VERBOSE = False


def say(msg: str) -> None:
    print(f"cluster: {msg}", file=sys.stderr, flush=True)


def debug(msg: str) -> None:
    if VERBOSE:
        say(msg)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input_text: str | None = None,
    timeout: float = 120,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    debug("$ " + " ".join(argv))
    proc = subprocess.run(
        list(argv), input=input_text, capture_output=True, text=True, timeout=timeout,
        env=CLEAN_ENV, check=False,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"command failed ({proc.returncode}): {' '.join(argv)}\n{detail}")
    if not quiet and VERBOSE and proc.stderr.strip():
        debug(proc.stderr.strip())
    return proc


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Write in place (never rename: some files are bind-mounted by inode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else None
    if old != content:
        with path.open("w") as fh:
            fh.write(content)
    os.chmod(path, mode)
    return old != content


def fill(template: str, **values: str) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def tail(path: Path, lines: int = 25) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"  ({path} does not exist)"
    return "\n".join("  | " + line for line in content[-lines:])


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
