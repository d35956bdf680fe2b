"""Tell a denied user where her jobs are, so the denial is a signpost, not a dead end.

pam_slurm_adopt's denial says only "you have no active jobs on this node".
The usual cause is a user who ssh'ed to the wrong node of her allocation, or
before the job started. Asking slurmctld for her running jobs and their nodes
turns the message into an answer: which nodes she may enter, and the srun line
that gets a shell inside a job without ssh at all.

This is best effort and strictly bounded. It runs on the denial path of a
login, slurmctld may be slow or down, and a hint is never worth a stuck
login: ``squeue`` is killed at ``timeout`` (default 0.5 s) and any failure
just means no hint (None). The command runs with a fixed environment, never
the broker's inherited one, and its user name argument comes from the
broker's own lookup (SO_PEERCRED), never from the client.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Final

import sh

__all__ = ["MAX_LISTED", "format_hint", "parse_squeue", "running_jobs_elsewhere"]

#: A fixed PATH and locale for squeue: the broker trusts no inherited
#: environment (no SLURM_CONF pointing at another cluster, no user PATH).
_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin", "LC_ALL": "C"}

#: Jobs named in one hint. A denial travels in one broker reply frame and
#: ends on a terminal; a user with a job array of 500 tasks needs a few
#: examples, not all of them.
MAX_LISTED: Final = 5


def parse_squeue(text: str) -> list[tuple[int, str]]:
    """Parse ``squeue -o '%A %N'`` lines into (job id, node list), sorted by job id.

    Lines that are not ``<digits> <nodelist>`` (a header, a job still without
    nodes) are skipped rather than failing the whole hint.
    """
    jobs: list[tuple[int, str]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            continue
        jobs.append((int(fields[0]), fields[1]))
    jobs.sort()
    return jobs


def running_jobs_elsewhere(
    user: str, *, timeout: float = 0.5, squeue: str = "squeue"
) -> list[tuple[int, str]] | None:
    """The user's running jobs and their node lists (compressed, e.g. ``n[2-3]``).

    Asks slurmctld with ``squeue -h -u USER -t R -o '%A %N'``. ``%A`` is the
    numeric job id (``%i`` prints ``12_3`` for an array task and ``12+0`` for
    a heterogeneous component); the numeric id is what ``srun --jobid``
    accepts for either. Returns None if squeue is missing, fails, or has not
    answered within ``timeout`` seconds (it is then killed); an empty list
    means slurmctld answered and the user has no running job.
    """
    program = squeue if "/" in squeue else shutil.which(squeue, path=_ENV["PATH"])
    if program is None or timeout <= 0:
        return None
    try:
        out = sh.Command(program)(
            "-h", "-u", user, "-t", "R", "-o", "%A %N",
            _timeout=timeout, _env=_ENV, _tty_out=False,
        )
    except (sh.ErrorReturnCode, sh.SignalException, sh.TimeoutException, sh.CommandNotFound,
            OSError):
        return None
    return parse_squeue(str(out))


def format_hint(jobs: Sequence[tuple[int, str]]) -> str:
    """One line for the denial message: where the user's jobs run and how to get in.

    ``[]`` gives "You have no running jobs." (she needs to start one first);
    more than :data:`MAX_LISTED` jobs are summarised with a count.
    """
    if not jobs:
        return "You have no running jobs."
    listed = ", ".join(f"{job} on {nodes}" for job, nodes in jobs[:MAX_LISTED])
    if len(jobs) > MAX_LISTED:
        listed += f" and {len(jobs) - MAX_LISTED} more"
    return (
        f"Your running jobs: {listed}. To get a shell inside one: "
        f"srun --jobid={jobs[0][0]} --overlap --pty bash"
    )
