"""Slurm's tmpfs job container in the lab: a private /tmp and /dev/shm per job.

Off by default. ``scripts/cluster job-container on`` leaves a flag file in the lab state
dir (``flag``), and from then on every ``up`` writes what the flag asks for
(``configs.write_configs``): a line in slurm.conf (``slurm_conf_lines``) and
``job_container.conf`` beside it (``write_conf``); ``off`` removes the flag, the line and
the file. The config digest of slurmctld and the slurmds changes with them, so ``up``
restarts those daemons (``commands.cmd_job_container`` cancels the jobs first).

Slurm 22.05 and 24.11 name the plugin ``JobContainerType=job_container/tmpfs``; from 25.11
(26.05 in the lab) it is ``NamespaceType=namespace/tmpfs``, still configured by
job_container.conf. 26.05 maps the old key onto the new one (read_config.c: "JobContainerType
has been replaced with NamespaceType", a warning of slurmctld; namespace.c strips the
``job_container/`` prefix), but the lab writes the new key where the generation's Slurm
ships ``namespace_tmpfs.so``.

``BasePath`` is ``base_path()`` in the lab state dir, with ``AutoBasePath=true``; Debian's
slurmd is built with MULTIPLE_SLURMD, which appends ``/<NodeName>``, so the jobs of node n1
live in ``<base>/n1/<jobid>`` (``<jobid>/.ns`` holds the job's mount namespace, in the
node's mount namespace only). Slurm 22.05 refuses to start a slurmd for which no line of
the file matches, so the one line names every node of the generation's slurm.conf.

On a chroot generation (trixie, forky) slurmd and its stepds run chrooted into the
generation's root, so the job's mounts are ``<root><base>/<NodeName>/<jobid>`` and its
``.ns`` in the node's mount namespace, and inside the job's namespace its private /tmp is
``<root>/tmp``. A process that enters that namespace (setns) has its root reset to the
namespace's root, the host's "/": Slurm's own tasks do, and run on the host's userland and
the host's /tmp there (tests/integration/test_job_container_lab.py).
The lab's namespaces are made for the container (namespaces.py): the generation's root is a
mount point, and the nodes' mount namespaces are older by id than their jobs' (Linux 6.18).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from . import generation as lab
from .util import write_if_changed

#: The file Slurm's tmpfs plugin reads beside slurm.conf (every release in the lab).
CONF_NAME = "job_container.conf"


def flag() -> Path:
    """Present (containing "on"): the lab runs with the job container."""
    return lab.VAR / "job-container.on"


def base_path() -> Path:
    """job_container.conf's BasePath (slurmd appends /<NodeName>)."""
    return lab.VAR / "job-container"


def conf_path() -> Path:
    return lab.ETC / "slurm" / CONF_NAME


def enabled() -> bool:
    return flag().is_file()


def set_enabled(on: bool) -> bool:
    """Set the flag; return whether it changed."""
    if on == enabled():
        return False
    if on:
        flag().parent.mkdir(parents=True, exist_ok=True)
        flag().write_text("on\n")
    else:
        flag().unlink(missing_ok=True)
    return True


def namespace_plugins() -> bool:
    """Does the generation's Slurm call the plugin namespace/tmpfs (25.11 and later)?"""
    return any(lab.GEN.in_root("/usr/lib").glob("*/slurm-wlm/namespace_tmpfs.so"))


def slurm_conf_lines() -> str:
    """What slurm.conf gets beyond the template: nothing when off."""
    if not enabled():
        return ""
    key = ("NamespaceType=namespace/tmpfs" if namespace_plugins()
           else "JobContainerType=job_container/tmpfs")
    return ("# scripts/cluster job-container on: the tmpfs job container "
            f"({CONF_NAME})\n{key}\n")


def conf_text(node_names: Sequence[str]) -> str:
    """job_container.conf: one line for every node (22.05 wants a line for each slurmd)."""
    return (
        "# job_container.conf, written by scripts/cluster (job-container on).\n"
        "# Debian's slurmd (MULTIPLE_SLURMD) appends /<NodeName> to BasePath.\n"
        f"NodeName={','.join(node_names)} AutoBasePath=true BasePath={base_path()}\n"
    )


def write_conf(node_names: Sequence[str]) -> str:
    """Write job_container.conf when the container is on, remove it when off; return its
    text ("" when off) for the Slurm daemons' config digest."""
    if not enabled():
        with contextlib.suppress(FileNotFoundError):
            conf_path().unlink()
        return ""
    text = conf_text(node_names)
    write_if_changed(conf_path(), text)
    return text


def mounts(pid: int) -> list[str]:
    """Mount points under the base path in the mount namespace of ``pid`` (a slurmd): each
    running job's ``<base>/<NodeName>/<jobid>`` and its ``.ns``; none once every job's
    container is gone. On a chroot generation they are under the generation's root."""
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return []
    base = f"{base_path()}/"
    return [point for point in (line.split()[4] for line in text.splitlines())
            if base in point + "/"]


def remove_empty_base() -> None:
    """After `off`: remove the base path's directories if nothing is left in them."""
    base = base_path()
    if enabled() or not base.is_dir():
        return
    for node in base.iterdir():
        with contextlib.suppress(OSError):
            node.rmdir()
    with contextlib.suppress(OSError):
        base.rmdir()
