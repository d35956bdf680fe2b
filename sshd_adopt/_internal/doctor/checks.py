"""The checks behind ``sshd-adopt doctor``: is this node set up so that sessions get adopted?

A broken installation of sshd-adopt fails in one of two bad ways: users get
in unconfined (no ForceCommand for them, a loose fall-through, a wrapper
anyone can rewrite), or everyone is locked out (no broker, no NodeName, Slurm
without ``PrologFlags=contain`` so there are never extern steps). Neither
shows up until somebody logs in. The doctor looks for both before users do.

The module is split in two on purpose:

* **Checks** (``check_*``, :func:`parse_sshd_t`, :func:`dry_run`) are pure
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
import shlex
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sshd_adopt._internal import protocol
from sshd_adopt._internal.config import AdmissionSettings, Config
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
    "SshdView",
    "Status",
    "check_broker",
    "check_config",
    "check_config_file",
    "check_entries",
    "check_limits",
    "check_safe_path",
    "check_slurm",
    "check_sshd_exempt",
    "check_sshd_managed",
    "describe",
    "dry_run",
    "exit_status",
    "parse_sshd_t",
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


def _ok(name: str, detail: str) -> Check:
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
    checks = [_ok("config", f"no file at {config.path}: the built-in defaults apply{where}"
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
    return _ok("config file", f"{path} is root-owned, mode {stat.S_IMODE(st.st_mode):04o}")


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
    checks = [_ok("slurm.conf", f"{facts.conf_path} (Slurm {facts.version or 'version ?'})")]
    if "contain" in facts.prolog_flags:
        checks.append(_ok("PrologFlags", "contains Contain: jobs get an extern step"))
    else:
        flags = ",".join(sorted(facts.prolog_flags)) or "(unset)"
        checks.append(Check("PrologFlags", Status.FAIL,
                            f"PrologFlags={flags}: no extern steps, every user will be denied",
                            "add Contain to PrologFlags in slurm.conf, then restart "
                            "slurmctld and every slurmd"))
    if facts.proctrack_type == "proctrack/cgroup":
        checks.append(_ok("ProctrackType", "proctrack/cgroup"))
    else:
        checks.append(Check("ProctrackType", Status.FAIL,
                            f"ProctrackType={facts.proctrack_type}: adopted sessions are "
                            "not tracked in the job's cgroup",
                            "set ProctrackType=proctrack/cgroup in slurm.conf"))
    if "task/cgroup" in facts.task_plugins:
        checks.append(_ok("TaskPlugin", ",".join(facts.task_plugins)))
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
        checks.append(_ok("NodeName", facts.nodename))
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
        checks.append(_ok("spool dir", facts.spool_dir))
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


def check_broker(ping: PingResult, *, our_version: str, nodename: str | None) -> list[Check]:
    """The broker answers, is the version this doctor belongs to, and sees the same node."""
    if ping.error is not None:
        return [Check("broker", Status.FAIL,
                      f"no answer on {ping.socket_path}: {ping.error}; every managed "
                      "login is denied",
                      "start it (systemctl start sshd-adoptd), or check "
                      "broker.socket_path and the --socket= of the ForceCommand")]
    checks = [_ok("broker", f"answers on {ping.socket_path}, version {ping.version}")]
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
    return checks


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
                      config=reply.get("config") or None)


# --------------------------------------------------------------------------- sshd


def parse_sshd_t(text: str) -> dict[str, str]:
    """``sshd -T`` output as {lower-case keyword: value}; repeated keywords are joined by \\n.

    ``sshd -T`` prints one ``keyword value`` per line, keywords already in
    lower case; multi-valued ones (listenaddress, hostkey) repeat the keyword.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        key = key.lower()
        values[key] = f"{values[key]}\n{value}" if key in values else value
    return values


@dataclass(frozen=True)
class SshdView:
    """sshd's effective configuration for one user (``sshd -T -C user=...``), or why not."""

    user: str
    settings: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    def get(self, key: str) -> str:
        """The value of ``key``, or "none" as sshd prints unset settings."""
        return self.settings.get(key, "none")


def forced_wrapper(forcecommand: str) -> str | None:
    """The program a ForceCommand runs if it is an sshd-adopt wrapper, else None."""
    if forcecommand in ("", "none"):
        return None
    try:
        words = shlex.split(forcecommand)
    except ValueError:
        words = forcecommand.split()
    if words and os.path.basename(words[0]) == WRAPPER_NAME:
        return words[0]
    return None


def check_sshd_managed(view: SshdView, admission: AdmissionSettings) -> list[Check]:
    """A managed user: sshd must force the wrapper on her and admit her only by our rules.

    * ForceCommand runs the wrapper; ``PermitUserEnvironment no`` (else
      ``~/.ssh/environment`` feeds LD_PRELOAD or PATH to it);
    * her keys come only from the broker's entry (``AuthorizedKeysFile
      <keys_dir>/%u``, exactly) or, when the site's keys come from a command, from
      the gate alone (``AuthorizedKeysFile none``): a key file of her own would
      let her in without a job;
    * with a ``TrustedUserCAKeys``, certificates are accepted only through the
      principals entry (``AuthorizedPrincipalsFile <principals_dir>/%u``);
    * the AuthorizedKeysCommand is ``sshd-adopt-keys`` run as ``command_user``;
    * ``SetEnv SHLVL=1`` when refused users are told why: without it, bash reads
      their ``~/.bashrc`` before the wrapper says no.
    """
    name = f"sshd ({view.user})"
    if view.error is not None:
        return [Check(name, Status.FAIL, f"sshd -T failed: {view.error}",
                      "run as root; fix what sshd -t reports")]
    checks: list[Check] = []
    wrapper = forced_wrapper(view.get("forcecommand"))
    if wrapper is None:
        checks.append(Check(name, Status.FAIL,
                            f"ForceCommand is {view.get('forcecommand')!r}: {view.user}'s "
                            "sessions are not adopted",
                            "install the drop-in (scripts/install) and make its Match block "
                            f"cover {view.user}, then reload sshd"))
        return checks
    checks.append(_ok(name, f"ForceCommand {view.get('forcecommand')}"))
    if view.get("permituserenvironment").lower() not in ("no", "none"):
        checks.append(Check(name, Status.WARN,
                            f"PermitUserEnvironment {view.get('permituserenvironment')}: "
                            "~/.ssh/environment can feed LD_PRELOAD/PATH to the wrapper",
                            "set PermitUserEnvironment no in the Match block"))
    files = view.get("authorizedkeysfile").split()
    entry = f"{admission.keys_dir}/%u"
    if admission.keys_command.strip():
        wanted, why = ["none"], "the keys come from admission.keys_command, through the gate"
    else:
        wanted, why = [entry], "only the broker's entry, which exists while the user may enter"
    if files != wanted:
        checks.append(Check(name, Status.FAIL,
                            f"AuthorizedKeysFile is {' '.join(files)!r}: a key there is accepted "
                            "whether or not the user has a job here",
                            f"AuthorizedKeysFile {' '.join(wanted)} in the drop-in's Match block "
                            f"({why})"))
    else:
        checks.append(_ok(name, f"AuthorizedKeysFile {' '.join(files)}"))
    principals = f"{admission.principals_dir}/%u"
    if view.get("trustedusercakeys") != "none" and view.get(
            "authorizedprincipalsfile") != principals:
        checks.append(Check(name, Status.FAIL,
                            f"TrustedUserCAKeys is set but AuthorizedPrincipalsFile is "
                            f"{view.get('authorizedprincipalsfile')!r}: a CA-signed certificate "
                            "logs in without a job",
                            f"AuthorizedPrincipalsFile {principals} in the drop-in's Match block"))
    command = view.get("authorizedkeyscommand")
    if command == "none" or os.path.basename(command.split()[0]) != "sshd-adopt-keys":
        checks.append(Check(name, Status.WARN,
                            f"AuthorizedKeysCommand is {command!r}: a job that started a moment "
                            "ago, and refusals with a message, need sshd-adopt-keys",
                            "AuthorizedKeysCommand <prefix>/bin/sshd-adopt-keys %u"))
    elif view.get("authorizedkeyscommanduser") != admission.command_user:
        checks.append(Check(name, Status.FAIL,
                            f"AuthorizedKeysCommandUser is "
                            f"{view.get('authorizedkeyscommanduser')!r}, the broker answers only "
                            f"{admission.command_user!r}",
                            "make admission.command_user and the drop-in agree"))
    if admission.on_deny == "message" and "SHLVL=1" not in view.get("setenv").split():
        checks.append(Check(name, Status.FAIL,
                            "no SetEnv SHLVL=1: a refused bash user's ~/.bashrc runs before the "
                            "wrapper can say why",
                            "SetEnv SHLVL=1 in the drop-in's Match block (or "
                            "admission.on_deny = \"refuse\")"))
    return checks


def check_entries(problems: Sequence[str], admitted: Iterable[str], keys_dir: str) -> Check:
    """The entry directories are root's alone (else anyone could plant an entry)."""
    if problems:
        return Check("key entries", Status.FAIL, "; ".join(problems),
                     "chown root:root and chmod 0755 each directory named (and the ones "
                     "above it); the broker refuses to start until then")
    users = sorted(admitted)
    shown = ", ".join(users[:10]) + (" …" if len(users) > 10 else "")
    return _ok("key entries", f"{keys_dir}: root's alone; {len(users)} user(s) may enter"
               + (f" ({shown})" if users else ""))


def check_limits(usepam: str, lines: Sequence[str]) -> Check | None:
    """With ``UsePAM no`` nothing applies /etc/security/limits.conf to ssh sessions."""
    if usepam.lower() != "no" or not lines:
        return None
    return Check("limits.conf", Status.WARN,
                 f"UsePAM no, but limits.conf/limits.d set {len(lines)} limit(s) (e.g. "
                 f"{lines[0]!r}): they do not apply to ssh sessions (pam_limits never runs); "
                 "adopted sessions get the job's cgroup limits instead",
                 "set the limits in the job (slurm.conf, cgroup.conf), or in sshd's service "
                 "(LimitNOFILE=...) for everyone")


def check_sshd_exempt(view: SshdView) -> list[Check]:
    """Root and exempt users must never get the wrapper: a broken broker must not lock them out."""
    name = f"sshd ({view.user})"
    if view.error is not None:
        return [Check(name, Status.FAIL, f"sshd -T failed: {view.error}",
                      "run as root; fix what sshd -t reports")]
    wrapper = forced_wrapper(view.get("forcecommand"))
    if wrapper is not None:
        return [Check(name, Status.FAIL,
                      f"exempt user {view.user} gets ForceCommand {view.get('forcecommand')}",
                      "exclude admins and root from the drop-in's Match block "
                      "(e.g. Match Group slurmusers,!clusteradm)")]
    return [_ok(name, "no sshd-adopt ForceCommand (exempt)")]


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
    return _ok(name, f"{path}: every component root-owned, not group/world-writable")


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
    return _ok(name, text)
