"""What one login looked like, and how two logins compare.

An ``Observation`` holds only what a user or an admin can see, already normalised so that two
front ends can be compared field by field: host names, addresses, ports and job ids are
replaced by stable labels, because the same scenario runs against different ports and the
job numbers change from run to run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

Verdict = Literal["same", "differs on purpose", "differs", "not run"]

#: Fields compared between the front ends, in report order. ``seconds`` is recorded, never
#: compared: the two sshds do different work and the lab's timing noise is larger than the
#: differences that matter (those are stated as their own scenario rows).
COMPARED = ("outcome", "exit", "stderr", "cgroup", "job_env", "x11", "listpids", "dies")

_MARK = "@@"
_IP4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_IP6 = re.compile(r"\b[0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7}\b", re.IGNORECASE)
_PORT = re.compile(r"\bport \d+\b")
_USERHOST = re.compile(r"\b[a-z_][a-z0-9_-]*@(?:n\d|login|ctl)(?:-v6)?\b")
_HOST = re.compile(r"\b(?:n\d|login|ctl)(?:-v6)?\b")
_NUMBER = re.compile(r"\b\d{2,}\b")
_CGROUP = re.compile(r":memory:/slurm_[^/]+/uid_\d+/job_(\d+)(?:/step_(\S+))?")
#: cgroup v2 nodes (the ``0::`` line): the job dir is ``job_<id>`` or, from Slurm 26.05, the
#: job's SLUID, which the caller resolves (``job_of_sluid``).
_CGROUP_V2 = re.compile(r"^0::/\S*_slurmstepd\.scope/(?:job_(\d+)|(s[0-9A-HJKMNP-TV-Z]{13}))"
                        r"(?:/step_([^/\s]+))?", re.MULTILINE)

#: The probe every scenario runs as its remote command. It prints one marker line with the
#: environment sshd gave the session, the session's memory cgroup (v1) and unified line (v2),
#: and the pids that ``scontrol listpids`` (as the user, on the node itself) attributes to
#: jobs. Kept free of single quotes so it survives an extra shell layer inside a batch script.
PROBE = (
    'echo "@@ JOB=${SLURM_JOB_ID-} DISPLAY=${DISPLAY-} XAUTHORITY=${XAUTHORITY-} PID=$$"; '
    "grep -m1 :memory: /proc/self/cgroup; grep -m1 ^0:: /proc/self/cgroup; "
    "scontrol listpids 2>/dev/null | sed -e s/^/@@L/"
)


@dataclass(frozen=True)
class Observation:
    """One login through one front end, normalised (see the module docstring)."""

    outcome: str  # "allowed" | "refused"
    exit: int
    stderr: str
    cgroup: str  # job label + step, or "none"
    job_env: str  # label of $SLURM_JOB_ID, or "unset"
    x11: str  # "unset" or "DISPLAY=... XAUTHORITY=..."
    listpids: str  # "listed" | "not listed" | "-" (no session or not in a job)
    dies: str = "-"  # "yes" | "no" | "-" (not measured in this scenario)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Observation:
        return cls(**data)  # type: ignore[arg-type]


def label_job(job: str, labels: dict[int, str]) -> str:
    """A job id as the scenario's label (``A``, ``source``...), or ``other`` if unknown."""
    if not job:
        return "unset"
    if job.isdigit() and int(job) in labels:
        return labels[int(job)]
    return "other job"


def normalise_stderr(text: str, labels: dict[int, str]) -> str:
    """Client stderr without what changes between runs and ports.

    Job ids known to the scenario become their labels (other numbers of 2+ digits become
    ``N``), then ``user@host``, addresses, ports and lab host names are replaced, so that
    "Connection closed by 10.213.0.11 port 2222" compares equal across front ends. Blank
    lines are dropped and lines joined with `` / `` for a one-cell report.
    """
    out = text
    for job, label in sorted(labels.items(), key=lambda item: -len(str(item[0]))):
        out = re.sub(rf"\b{job}\b", f"<{label}>", out)
    out = _USERHOST.sub("<user>@<node>", out)
    out = _IP6.sub("<addr>", _IP4.sub("<addr>", out))
    out = _PORT.sub("port <port>", out)
    out = _HOST.sub("<node>", out)
    out = _NUMBER.sub("N", out)
    return " / ".join(line.strip() for line in out.splitlines() if line.strip())


def _no_sluids(_sluid: str) -> int | None:
    return None


def parse_probe(returncode: int, stdout: str, stderr: str, labels: dict[int, str],
                seconds: float, dies: str = "-",
                job_of_sluid: Callable[[str], int | None] = _no_sluids) -> Observation:
    """Turn the output of ``PROBE`` run through ssh into an Observation (a v1 memory line
    naming a job first, else the v2 ``0::`` line; ``job_of_sluid`` resolves SLUIDs)."""
    marker = next((line for line in stdout.splitlines() if line.startswith(f"{_MARK} ")), None)
    norm_err = normalise_stderr(stderr, labels)
    if marker is None:
        return Observation("refused", returncode, norm_err, "none", "unset", "unset", "-",
                           dies, round(seconds, 2))
    env = dict(item.split("=", 1) for item in marker.split()[1:] if "=" in item)
    cgroup = "none"
    found = _CGROUP.search(stdout)
    unified = _CGROUP_V2.search(stdout)
    if found is not None:
        cgroup = f"{label_job(found[1], labels)} ({found[2] or 'job'})"
    elif unified is not None:
        job = unified[1] or str(job_of_sluid(unified[2]) or "?")
        cgroup = f"{label_job(job, labels)} ({unified[3] or 'job'})"
    listed = {line[3:].split()[0] for line in stdout.splitlines()
              if line.startswith(f"{_MARK}L") and line[3:].split()}
    listpids = "-" if cgroup == "none" else (
        "listed" if env.get("PID", "?") in listed else "not listed")
    display, xauth = env.get("DISPLAY", ""), env.get("XAUTHORITY", "")
    x11 = f"DISPLAY={display} XAUTHORITY={xauth}" if display or xauth else "unset"
    return Observation("allowed", returncode, norm_err, cgroup,
                       label_job(env.get("JOB", ""), labels), x11, listpids, dies,
                       round(seconds, 2))


@dataclass(frozen=True)
class Row:
    """Both front ends' observations of one scenario and the verdict computed from them."""

    scenario: str
    pam: Observation | None
    adopt: Observation | None
    differing: tuple[str, ...] = field(default=())

    @classmethod
    def compare(cls, scenario: str, pam: Observation, adopt: Observation) -> Row:
        diff = tuple(name for name in COMPARED if getattr(pam, name) != getattr(adopt, name))
        return cls(scenario, pam, adopt, diff)
