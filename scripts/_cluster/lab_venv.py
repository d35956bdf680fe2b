"""The lab venv: this checkout installed, as a site would install it, for every lab host.

``ensure_venv`` creates ``lab.VENV`` (a path inside the lab; in a chroot generation it is
``lab.GEN.in_root(lab.VENV)`` from outside), installs ``VENV_DEPS`` and then the project
from a fresh copy of the checkout whenever ``repo_digest`` changed, and checks with
``verify_installed`` that the installed package is byte for byte the checkout's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import generation as lab
from .host import SYSTEM_PYTHON, root_exec
from .util import REPO, LabError, digest, run, say

# Runtime deps of the project, the build backend (we build without isolation) and what the
# test suite imports (pytest, hypothesis), so that the venv python can run tests/.
VENV_DEPS = ("psutil", "tenacity", "python-daemon", "sh", "pycryptodome>=3.11",
             "setuptools>=61", "wheel", "pytest", "hypothesis")


def repo_digest() -> str:
    parts: list[bytes | str] = []
    candidates = [REPO / "pyproject.toml", REPO / "README.md", REPO / "setup.cfg"]
    for top in (REPO / "sshd_adopt", REPO / "bin"):  # bin/: the launchers pip installs
        if top.is_dir():
            candidates += sorted(
                p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
    for path in candidates:
        if path.is_file():
            parts += [str(path.relative_to(REPO)), path.read_bytes()]
    return digest(*parts)


def ensure_venv(force: bool = False) -> bool:
    """Build the venv and (re)install the project when it changed. True if installed now."""
    # VENV/PREFIX are lab paths; host_venv/host_prefix the same directories from outside.
    run_in = root_exec if lab.GEN.root is not None else run
    host_venv, host_prefix = lab.GEN.in_root(lab.VENV), lab.GEN.in_root(lab.PREFIX)
    pip = lab.VENV / "bin" / "pip"
    if not (host_venv / "bin" / "python").exists():
        say(f"creating venv {host_venv}")
        host_prefix.mkdir(parents=True, exist_ok=True)
        os.chmod(host_prefix, 0o755)
        run_in([lab.GEN.python if lab.GEN.root is not None else SYSTEM_PYTHON, "-m", "venv",
                str(lab.VENV)], timeout=300)
    deps_stamp = host_venv / ".lab-deps"
    if not deps_stamp.exists() or deps_stamp.read_text() != " ".join(VENV_DEPS):
        say(f"installing venv dependencies: {' '.join(VENV_DEPS)}")
        run_in([str(pip), "install", "-q", *VENV_DEPS], timeout=900)
        deps_stamp.write_text(" ".join(VENV_DEPS))
    stamp = host_venv / ".lab-project"
    want = repo_digest()
    if not force and stamp.exists() and stamp.read_text() == want:
        try:
            verify_installed(host_venv)
            return False
        except LabError as err:  # changed behind the stamp's back (another checkout's install)
            say(f"{err}: reinstalling")
    # Build from a fresh copy every time: the repo never gets build/ or *.egg-info litter,
    # and no build/ of an earlier checkout survives. setuptools reuses a module already in
    # build/ whenever that copy is newer than the source, so a kept build/ let an install
    # from a checkout with older file times report success and leave the previous code.
    src = lab.VAR / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    run(["rsync", "-a", "--exclude", ".git", "--exclude", "build",
         "--exclude", "*.egg-info", "--exclude", "__pycache__", "--exclude", ".venv",
         f"{REPO}/", f"{src}/"])
    say(f"installing the project from {REPO} into {host_venv}")
    proc = run_in([str(pip), "install", "-q", "--no-deps", "--force-reinstall",
                   "--no-build-isolation", str(src)], check=False, timeout=600)
    if proc.returncode != 0:
        raise LabError(f"pip install of {REPO} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    # As scripts/install does: the per-login launchers start with `python -IS`.
    for name in ("sshd-adopt", "sshd-adopt-keys"):
        launcher = host_venv / "bin" / name
        _, _, rest = launcher.read_text().partition("\n")
        launcher.write_text(f"#!{lab.VENV}/bin/python3 -IS\n{rest}")
    verify_installed(host_venv)
    stamp.write_text(want)
    run(["chmod", "-R", "a+rX,go-w", str(host_prefix)])
    return True


def verify_installed(host_venv: Path) -> None:
    """Fail unless the venv's copy of the package is byte for byte the checkout's."""
    found = list(host_venv.glob("lib/python3*/site-packages/sshd_adopt"))
    if len(found) != 1:
        raise LabError(f"expected one installed sshd_adopt package in {host_venv}, found {found}")
    installed = found[0]
    ours = {p.relative_to(REPO / "sshd_adopt"): p.read_bytes()
            for p in (REPO / "sshd_adopt").rglob("*.py")}
    theirs = {p.relative_to(installed): p.read_bytes() for p in installed.rglob("*.py")}
    if ours != theirs:
        differ = sorted(str(p) for p in set(ours) | set(theirs) if ours.get(p) != theirs.get(p))
        raise LabError(f"the venv's sshd_adopt differs from {REPO}/sshd_adopt after the "
                       f"install: {', '.join(differ[:10])}")
