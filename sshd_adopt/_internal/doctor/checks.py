"""The checks behind ``sshd-adopt doctor``: is this node set up so that sessions get adopted?

A broken installation of sshd-adopt fails in one of two bad ways: users get
in unconfined (no ForceCommand for them, a loose fall-through, a wrapper
anyone can rewrite), or everyone is locked out (no broker, no NodeName, Slurm
without ``PrologFlags=contain`` so there are never extern steps). Neither
shows up until somebody logs in. The doctor looks for both before users do.

The module is split in two on purpose:

* **Checks** (``check_*`` here and in :mod:`.sshd`, :func:`dry_run`) are pure
  functions of facts already gathered. Every rule, e.g. "a managed user must
  get a ForceCommand pointing at sshd-adopt", is a unit test with made-up
  inputs: no sshd, no Slurm, no root needed.
* **Gathering** (:mod:`.gather`, and here :func:`ping_broker` and
  :func:`stat_chain`) runs ``sshd -T``, ``stat``, the broker socket and the
  stepds, and turns every failure into data (an error string) so a check can
  report it as a finding instead of the doctor crashing on the first broken
  thing.

Each finding is a :class:`Check` with a status and, unless it is OK, a
one-line fix, because the reader is an admin in the middle of an install.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sshd_adopt._internal import protocol
from sshd_adopt._internal.config import Config
from sshd_adopt._internal.core.decision import (
    Adopt,
    Allow,
    AskCallerId,
    CallerIdAnswer,
    CallerIdOutcome,
    Decision,
    Deny,
    LocalJob,
    LoginFacts,
    Message,
    decide,
)
from sshd_adopt._internal.slurm.facts import SlurmFacts
from sshd_adopt.errors import BrokerProtocolError

__all__ = [
    "WRAPPER_NAME",
    "Check",
    "DryRun",
    "PathStat",
    "PingResult",
    "Status",
    "check_broker",
    "check_config",
    "check_config_file",
    "check_safe_path",
    "check_slurm",
    "describe",
    "dry_run",
    "exit_status",
    "ok",
    "ping_broker",
    "stat_chain",
]

#: The basename a ForceCommand must run for a session to be adopted.
WRAPPER_NAME = "sshd-adopt"


class Status(enum.StrEnum):
    """How bad a finding is. Only FAIL changes the doctor's exit status."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"  # not checked (e.g. no --user given); never a failure


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, the outcome, what was seen, and how to fix it."""

    name: str
    status: Status
    detail: str
    fix: str = ""


def exit_status(checks: Iterable[Check]) -> int:
    """0 when nothing FAILed, 1 otherwise (warnings are advice, not breakage)."""
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


# --------------------------------------------------------------------------- configuration


def check_config(config: Config | None, error: str | None, path: str, *,
                 source: str = "") -> list[Check]:
    """The broker's configuration loads; its warnings (risky but legal choices) are WARNs.

    ``source`` says where the path came from (e.g. "the running broker's").
    """
    where = f" ({source})" if source else ""
    if config is None:
        return [Check("config", Status.FAIL, f"{error or path + ': cannot be loaded'}{where}",
                      f"fix the file, then: sshd-adoptd --check --config {path}")]
    defaults = any(w.endswith("using the built-in defaults") for w in config.warnings)
    checks = [ok("config", f"no file at {config.path}: the built-in defaults apply{where}"
                  if defaults else f"{config.path} is valid{where}")]
    checks += [
        Check("config", Status.WARN, warning,
              "see docs/configuration.md, 'Combinations'; "
              "change the setting unless it is deliberate")
        for warning in config.warnings
        # A missing file is reported by check_config_file, with its own fix.
        if not warning.endswith("using the built-in defaults")
    ]
    return checks


def check_config_file(path: str, st: os.stat_result | None) -> Check:
    """The config file decides who gets in: root-owned and writable by root alone.

    The broker itself refuses a world-writable file and warns about the rest;
    the doctor says the same before a reload trips over it.
    """
    fix = f"chown root:root {path} && chmod 0644 {path}"
    if st is None:
        return Check("config file", Status.WARN,
                     f"{path} does not exist; the broker runs on built-in defaults",
                     f"copy etc/sshd-adopt.toml.example to {path}")
    if st.st_mode & stat.S_IWOTH:
        return Check("config file", Status.FAIL, f"{path} is world-writable", fix)
    if st.st_uid != 0 or st.st_mode & stat.S_IWGRP:
        return Check("config file", Status.WARN,
                     f"{path} is owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}",
                     fix)
    return ok("config file", f"{path} is root-owned, mode {stat.S_IMODE(st.st_mode):04o}")


# --------------------------------------------------------------------------- Slurm


def check_slurm(
    facts: SlurmFacts | None, error: str | None, *, spool_exists: bool | None
) -> list[Check]:
    """The Slurm settings adoption depends on, as pam_slurm_adopt requires them.

    Without ``PrologFlags=Contain`` slurmd creates no extern step, so there is
    nothing to adopt into and every user is denied; without
    ``proctrack/cgroup`` and ``task/cgroup`` an adopted session would not be
    confined or killed with the job.
    """
    if facts is None:
        return [Check("slurm.conf", Status.FAIL, error or "slurm.conf cannot be read",
                      "fix slurm.conf or set slurm.conf_path in the sshd-adopt config")]
    checks = [ok("slurm.conf", f"{facts.conf_path} (Slurm {facts.version or 'version ?'})")]
    if "contain" in facts.prolog_flags:
        checks.append(ok("PrologFlags", "contains Contain: jobs get an extern step"))
    else:
        flags = ",".join(sorted(facts.prolog_flags)) or "(unset)"
        checks.append(Check("PrologFlags", Status.FAIL,
                            f"PrologFlags={flags}: no extern steps, every user will be denied",
                            "add Contain to PrologFlags in slurm.conf, then restart "
                            "slurmctld and every slurmd"))
    if facts.proctrack_type == "proctrack/cgroup":
        checks.append(ok("ProctrackType", "proctrack/cgroup"))
    else:
        checks.append(Check("ProctrackType", Status.FAIL,
                            f"ProctrackType={facts.proctrack_type}: adopted sessions are "
                            "not tracked in the job's cgroup",
                            "set ProctrackType=proctrack/cgroup in slurm.conf"))
    if "task/cgroup" in facts.task_plugins:
        checks.append(ok("TaskPlugin", ",".join(facts.task_plugins)))
    else:
        checks.append(Check("TaskPlugin", Status.FAIL,
                            f"TaskPlugin={','.join(facts.task_plugins)}: the job's CPU and "
                            "memory limits do not apply to adopted sessions",
                            "add task/cgroup to TaskPlugin in slurm.conf"))
    if facts.nodename is None:
        checks.append(Check("NodeName", Status.FAIL,
                            "this host is not a NodeName in slurm.conf (matched by short "
                            "hostname, NodeHostname or localhost)",
                            "set policy.nodename in the sshd-adopt config"))
    else:
        checks.append(ok("NodeName", facts.nodename))
    if facts.spool_dir is None:
        checks.append(Check("spool dir", Status.FAIL,
                            "SlurmdSpoolDir needs the NodeName, which is unknown",
                            "set policy.nodename in the sshd-adopt config"))
    elif spool_exists is False:
        checks.append(Check("spool dir", Status.FAIL,
                            f"{facts.spool_dir} does not exist: slurmd is not running "
                            "here, or SlurmdSpoolDir differs from slurmd's",
                            "start slurmd, or fix SlurmdSpoolDir / policy.nodename"))
    else:
        checks.append(ok("spool dir", facts.spool_dir))
    return checks


# --------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class PingResult:
    """What a "ping" to the broker returned; ``error`` set when it did not answer."""

    socket_path: str
    version: str | None = None
    node: str | None = None
    error: str | None = None
    config: str | None = None  # the configuration file the running broker loaded
    events: str | None = None  # "proc connector", or "none: why" (None: an older broker)


def check_broker(ping: PingResult, *, our_version: str, nodename: str | None) -> list[Check]:
    """The broker answers, is the version this doctor belongs to, and sees the same node."""
    if ping.error is not None:
        return [Check("broker", Status.FAIL,
                      f"no answer on {ping.socket_path}: {ping.error}; every managed "
                      "login is denied",
                      "start it (systemctl start sshd-adoptd), or check "
                      "broker.socket_path and the --socket= of the ForceCommand")]
    checks = [ok("broker", f"answers on {ping.socket_path}, version {ping.version}")]
    if ping.version != our_version:
        checks.append(Check("broker version", Status.WARN,
                            f"the broker runs {ping.version}, this doctor is {our_version}",
                            "restart the broker after an upgrade: systemctl restart "
                            "sshd-adoptd"))
    if nodename is not None and ping.node != nodename:
        checks.append(Check("broker node", Status.WARN,
                            f"the broker's NodeName is {ping.node or '(unknown)'}, "
                            f"slurm.conf says {nodename}",
                            "reload the broker (systemctl reload sshd-adoptd) or make "
                            "policy.nodename agree"))
    if ping.events is not None:
        checks.append(check_events(ping.events))
    return checks


def check_events(events: str) -> Check:
    """Whether the broker follows the kernel's process events (the ping's ``events``)."""
    if events == "proc connector":
        return ok("process events", "the broker follows the proc connector: sessions enter "
                  "their job at authentication, forwarding-only connections too")
    return Check("process events", Status.WARN,
                 f"the broker does not follow the proc connector ({events.removeprefix('none: ')}):"
                 " sessions enter their job at the wrapper's request, and connections that "
                 "never run it (ssh -N) only at the sweeper's next scan (sweeper.interval)",
                 "run the broker in the host's pid and user namespaces with CAP_NET_ADMIN "
                 "(the shipped unit does), and broker.proc_events = true")


def ping_broker(socket_path: str, timeout: float = 2.0) -> PingResult:
    """Send one "ping" frame and read the reply; failures become ``error``, never raise."""
    try:
        reply = protocol.exchange(
            socket_path, protocol.ping_request(), timeout=timeout
        )
    except (OSError, BrokerProtocolError) as err:
        return PingResult(socket_path, error=str(err) or type(err).__name__)
    if reply.get("result") != "pong":
        return PingResult(socket_path, error=f"unexpected reply {reply.get('result')!r}")
    return PingResult(socket_path, version=reply.get("version", "?"), node=reply.get("node", ""),
                      config=reply.get("config") or None, events=reply.get("events") or None)


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class PathStat:
    """Owner and mode of one path component (``uid`` None: it could not be stat'ed)."""

    path: str
    uid: int | None
    mode: int = 0


def stat_chain(path: str) -> list[PathStat]:
    """Stat every component of ``path``'s real path, from ``/`` down to the file itself.

    Symlinks are resolved first, as sshd's ``safe_path`` does (it calls
    ``realpath``), so what is checked is what actually runs.
    """
    real = os.path.realpath(path)
    parts: list[str] = []
    current = real
    while True:
        parts.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    chain: list[PathStat] = []
    for component in reversed(parts):
        try:
            st = os.stat(component)
        except OSError:
            chain.append(PathStat(component, None))
            continue
        chain.append(PathStat(component, st.st_uid, st.st_mode))
    return chain


def check_safe_path(role: str, path: str, chain: Sequence[PathStat]) -> Check:
    """Every component root-owned and not group- or world-writable (sshd's ``safe_path``).

    sshd enforces this for an ``AuthorizedKeysCommand``. For the wrapper and
    the code it imports sshd checks nothing, but the same rule is what keeps
    them safe: whoever can replace a component runs code in every managed
    session (the wrapper) or as root (the broker shares the install).
    """
    name = f"path ({role})"
    if not chain or chain[-1].uid is None:
        return Check(name, Status.FAIL, f"{path} does not exist",
                     "install sshd-adopt there (scripts/install), or fix the configured path")
    for item in chain:
        if item.uid is None:
            return Check(name, Status.FAIL, f"{item.path} cannot be stat'ed",
                         "check the path and run as root")
        problems = []
        if item.uid != 0:
            problems.append(f"owned by uid {item.uid}")
        if stat.S_ISDIR(item.mode) or item is chain[-1]:
            if item.mode & stat.S_IWGRP:
                problems.append("group-writable")
            if item.mode & stat.S_IWOTH:
                problems.append("world-writable")
        if problems:
            if item.mode & stat.S_ISVTX:
                # A shared directory such as /tmp: the fix is to move out, not to chmod it.
                fix = (f"install outside {item.path}, under a root-only prefix such as "
                       "/opt/sshd-adopt")
            else:
                fix = (f"chown root:root {item.path} && chmod go-w {item.path}, or install "
                       "under a root-only prefix such as /opt/sshd-adopt")
            return Check(name, Status.FAIL,
                         f"{path}: {item.path} is {' and '.join(problems)} "
                         f"(mode {stat.S_IMODE(item.mode):04o}); sshd's safe_path "
                         "rules refuse this", fix)
    return ok(name, f"{path}: every component root-owned, not group/world-writable")


# --------------------------------------------------------------------------- dry run


@dataclass(frozen=True)
class DryRun:
    """What the broker would decide for a user right now, callerid not asked."""

    user: str
    uid: int
    exempt: bool
    jobs: tuple[LocalJob, ...]
    decision: Decision
    fallback: Decision | None  # if callerid would be asked: the outcome when it gives no answer


def dry_run(
    user: str, uid: int, *, exempt: bool, node_known: bool, jobs: tuple[LocalJob, ...],
    config: Config,
) -> DryRun:
    """Run :func:`~sshd_adopt._internal.core.decision.decide` on gathered facts without callerid.

    When the decision is "ask the source host", the source is unknown here
    (there is no connection), so we also show what ``action_unknown`` gives
    when the source host does not answer: the worst case a user will meet.
    """
    facts = LoginFacts(user=user, uid=uid, exempt=exempt, node_known=node_known, jobs=jobs)
    decision = decide(facts, config.options)
    fallback = None
    if isinstance(decision, AskCallerId):
        unanswered = LoginFacts(
            user=user, uid=uid, exempt=exempt, node_known=node_known, jobs=jobs,
            callerid=CallerIdAnswer(CallerIdOutcome.UNREACHABLE),
        )
        fallback = decide(unanswered, config.options)
    return DryRun(user, uid, exempt, jobs, decision, fallback)


def describe(decision: Decision) -> str:
    """One line for a decision, as the doctor prints it."""
    match decision:
        case Adopt(job_id=job, reason=reason):
            return f"adopt into job {job} ({reason})"
        case Allow(reason=reason):
            return f"allow without adoption ({reason})"
        case Deny(message=message, reason=reason):
            return f"deny with message {message.value!r} ({reason})"
        case AskCallerId(reason=reason):
            return f"ask the source host's slurmd which job ({reason})"
    raise AssertionError(f"unknown decision {decision!r}")  # pragma: no cover


def check_dry_run(result: DryRun, *, job_error: str | None = None) -> Check:
    """Summarise a dry run as a finding: a deny is a WARN (correct if she has no job here)."""
    name = f"dry run ({result.user})"
    if job_error is not None:
        return Check(name, Status.FAIL, f"cannot list {result.user}'s jobs: {job_error}",
                     "run as root on a node where slurmd runs")
    jobs = ", ".join(str(j.job_id) for j in result.jobs) or "none"
    text = f"jobs here: {jobs}; decision: {describe(result.decision)}"
    if result.fallback is not None:
        text += f"; if the source host does not answer: {describe(result.fallback)}"
    if isinstance(result.decision, Deny):
        if result.decision.message is Message.NO_NODE:
            fix = "set policy.nodename, or make this host a NodeName in slurm.conf"
        elif result.decision.message is Message.NO_JOBS:
            fix = (f"expected if {result.user} has no job on this node; otherwise check the "
                   "job has an extern step (PrologFlags=Contain)")
        else:
            fix = "review the [policy] actions in the sshd-adopt config"
        return Check(name, Status.WARN, text, fix)
    return ok(name, text)
