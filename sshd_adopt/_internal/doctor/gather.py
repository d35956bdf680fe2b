"""Gathering the doctor's facts: the configuration, slurm.conf, the broker, sshd, the files.

Every gathering failure becomes data (an error string), so one broken piece never
hides the report on the others; :mod:`.checks` judges. Which configuration is
checked: ``--config`` when given, else the one the running broker says it loaded
(its "ping" reply), else the default path -- and the report says which.
"""

from __future__ import annotations

import glob
import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

import sshd_adopt
from sshd_adopt import __version__
from sshd_adopt._internal import protocol, run
from sshd_adopt._internal.authmethods import pam_service_of, pam_service_text
from sshd_adopt._internal.config import DEFAULT_CONFIG_PATH, Config, load_config
from sshd_adopt._internal.core.accounts import Account, Accounts
from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.core.login import is_exempt
from sshd_adopt._internal.doctor import checks
from sshd_adopt._internal.doctor import sshd as sshd_checks
from sshd_adopt._internal.doctor.checks import Check, DryRun, PingResult, Status
from sshd_adopt._internal.doctor.sshd import SshdView
from sshd_adopt._internal.node.keyentries import KeyEntries
from sshd_adopt._internal.node.sshdconfig import parse_sshd_t
from sshd_adopt._internal.slurm.facts import SlurmFacts, load_slurm_facts
from sshd_adopt._internal.slurm.localjobs import user_jobs
from sshd_adopt.errors import Error

#: sshd -T reads host keys and the whole config; it answers in milliseconds,
#: so anything slower is a hung NSS lookup for Match Group, worth reporting.
SSHD_TIMEOUT = 15.0
DEFAULT_SSHD = "/usr/sbin/sshd"
LIMITS = ("/etc/security/limits.conf", "/etc/security/limits.d/*.conf")


@dataclass(frozen=True)
class Request:
    """What the admin asked the doctor to look at."""

    config: str | None = None
    user: str | None = None
    sshd: str = DEFAULT_SSHD
    sshd_config: str | None = None
    wrapper: str | None = None


def gather_sshd(user: str, sshd: str, config_file: str | None) -> SshdView:
    """sshd's effective configuration for ``user`` (``sshd -T -C user=U,host=x,addr=...``)."""
    argv = [sshd, "-T", "-C", f"user={user},host=x,addr=127.0.0.1"]
    if config_file:
        argv += ["-f", config_file]
    try:
        done = run.run(argv, timeout=SSHD_TIMEOUT)
    except run.ToolTimeout:
        return SshdView(user, error=f"no answer in {SSHD_TIMEOUT:.0f}s")
    except run.ToolError as err:
        return SshdView(user, error=f"cannot run {sshd}: {err}")
    if done.returncode != 0:
        return SshdView(user, error=done.problem().split("; ")[-1])
    return SshdView(user, settings=parse_sshd_t(done.text()))


def _exempt_users(config: Config | None) -> list[str]:
    """Root, the configured exempt users and the listed members of exempt groups.

    Each is checked with ``sshd -T``, so that a drop-in ``Match`` block that sends an
    exempt admin through the wrapper (where a broken broker would lock her out) shows
    up. Only users that exist are listed (sshd -T needs real users); members through
    their primary group are not enumerated.
    """
    import grp  # noqa: PLC0415  (the doctor alone enumerates groups)

    names = {"root"} | (set(config.exempt.users) if config else set())
    for group in sorted(config.exempt.groups) if config else ():
        try:
            names.update(grp.getgrnam(group).gr_mem)
        except KeyError:
            continue
    return sorted(name for name in names if Accounts().by_name(name) is not None)


def _default_wrapper(views: list[SshdView]) -> str:
    for view in views:
        wrapper = sshd_checks.forced_wrapper(view.get("forcecommand"))
        if wrapper is not None:
            return wrapper
    return str(Path(sys.executable).parent / checks.WRAPPER_NAME)


def _interpreter(script: str) -> str | None:
    """The ``#!`` interpreter of a console script: it runs in every session too."""
    try:
        with open(script, "rb") as handle:
            first = handle.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def _path_checks(wrapper: str, views: list[SshdView]) -> list[Check]:
    """safe_path-style checks of everything that runs in a session or as root."""
    found = [checks.check_safe_path("wrapper", wrapper, checks.stat_chain(wrapper))]
    interpreter = _interpreter(wrapper)
    if interpreter:
        found.append(checks.check_safe_path("interpreter", interpreter,
                                            checks.stat_chain(interpreter)))
    package = os.path.dirname(os.path.abspath(sshd_adopt.__file__))
    found.append(checks.check_safe_path("package", package, checks.stat_chain(package)))
    commands = {v.get("authorizedkeyscommand") for v in views if v.error is None}
    for command in sorted(commands - {"none"}):
        program = command.split()[0]
        found.append(checks.check_safe_path("AuthorizedKeysCommand", program,
                                            checks.stat_chain(program)))
    return found


def _dry_run(user: str, config: Config, slurm: SlurmFacts | None) -> tuple[DryRun, Check]:
    account = Account.of(pwd.getpwnam(user))
    exempt = is_exempt(config.exempt, account, Accounts())
    node_known = slurm is not None and slurm.nodename is not None
    jobs: tuple[LocalJob, ...] = ()
    job_error = None
    if slurm is not None and slurm.spool_dir is not None and slurm.nodename:
        try:
            jobs = user_jobs(slurm.spool_dir, slurm.nodename, account.uid,
                             timeout=config.broker.stepd_timeout)
        except (Error, OSError) as err:
            job_error = str(err)
    result = checks.dry_run(user, account.uid, exempt=exempt, node_known=node_known, jobs=jobs,
                            config=config)
    return result, checks.check_dry_run(result, job_error=job_error)


def limits_lines() -> list[str]:
    """The limits limits.conf and limits.d set (comment and blank lines left out)."""
    found: list[str] = []
    for pattern in LIMITS:
        for path in sorted(glob.glob(pattern)):
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            found += [line.strip() for line in text.splitlines()
                      if line.strip() and not line.strip().startswith("#")]
    return found


def _config(request: Request) -> tuple[Config | None, str | None, str, str, PingResult]:
    """The configuration to check, its path, where the path came from, and the first ping."""
    ping = checks.ping_broker(protocol.DEFAULT_SOCKET)
    if request.config is not None:
        path, source = request.config, "given with --config"
    elif ping.config is not None:
        path, source = ping.config, "the running broker's"
    else:
        path, source = DEFAULT_CONFIG_PATH, ""
    try:
        config: Config | None = load_config(path if path != DEFAULT_CONFIG_PATH else None)
        error = None
    except Error as err:
        config, error = None, str(err)
    if config is not None and config.broker.socket_path != protocol.DEFAULT_SOCKET:
        ping = checks.ping_broker(config.broker.socket_path)
    return config, error, path, source, ping


def _config_checks(request: Request) -> tuple[list[Check], Config | None, PingResult]:
    config, error, path, source, ping = _config(request)
    found = checks.check_config(config, error, path, source=source)
    try:
        config_st: os.stat_result | None = os.stat(path)
    except OSError:
        config_st = None
    found.append(checks.check_config_file(path, config_st))
    if ping.config is not None and os.path.abspath(ping.config) != os.path.abspath(path):
        found.append(Check("config", Status.WARN,
                           f"the running broker loaded {ping.config}, not {path}",
                           f"check {ping.config}, or restart the broker with --config {path}"))
    return found, config, ping


def _slurm_checks(config: Config | None) -> tuple[list[Check], SlurmFacts | None]:
    try:
        slurm: SlurmFacts | None = load_slurm_facts(
            config.slurm.conf_path if config else "/etc/slurm/slurm.conf",
            nodename=config.options.nodename if config else None)
        slurm_error = None
    except Error as err:
        slurm, slurm_error = None, str(err)
    spool_exists = None
    if slurm is not None and slurm.spool_dir is not None:
        spool_exists = os.path.isdir(slurm.spool_dir)
    return checks.check_slurm(slurm, slurm_error, spool_exists=spool_exists), slurm


def _user_checks(request: Request, config: Config | None, slurm: SlurmFacts | None,
                 views: list[SshdView]) -> tuple[list[Check], DryRun | None]:
    if not request.user:
        return [Check("sshd (managed user)", Status.SKIP,
                      "no --user given: sshd's view of a managed user is not checked",
                      "sshd-adopt doctor --user NAME (a user in the Match block)")], None
    account = Accounts().by_name(request.user)
    if account is None:
        return [Check(f"user ({request.user})", Status.FAIL, f"no such user {request.user}",
                      "check the name (NSS/LDAP must resolve it on this node)")], None
    view = gather_sshd(request.user, request.sshd, request.sshd_config)
    views.append(view)
    if config is None:
        return [], None
    if is_exempt(config.exempt, account, Accounts()):
        found = sshd_checks.check_sshd_exempt(view)
    else:
        found = sshd_checks.check_sshd_managed(view, config.admission)
        methods = sshd_checks.check_auth_methods(
            view, config.admission.present_file,
            pam_service_text(pam_service_of(view.settings)))
        if methods is not None:
            found.append(methods)
    dry, check = _dry_run(request.user, config, slurm)
    return [*found, check], dry


def gather(request: Request) -> tuple[list[Check], DryRun | None]:
    """Run every check; return the findings in report order, and the dry run if asked."""
    found: list[Check] = []
    if os.geteuid() != 0:
        found.append(Check("privileges", Status.WARN, "not running as root: sshd -T and the "
                           "Slurm step sockets may refuse", "run sshd-adopt doctor as root"))
    config_found, config, ping = _config_checks(request)
    slurm_found, slurm = _slurm_checks(config)
    found += config_found + slurm_found
    found += checks.check_broker(ping, our_version=__version__,
                                 nodename=slurm.nodename if slurm else None)
    if config is not None:
        admission = config.admission
        entries = KeyEntries(admission.keys_dir, admission.principals_dir)
        found.append(sshd_checks.check_entries(entries.problems(), entries.admitted(),
                                          admission.keys_dir))
    views: list[SshdView] = []
    for name in _exempt_users(config):
        view = gather_sshd(name, request.sshd, request.sshd_config)
        views.append(view)
        found += sshd_checks.check_sshd_exempt(view)
    user_found, dry = _user_checks(request, config, slurm, views)
    found += user_found
    usepam = next((v.get("usepam") for v in reversed(views) if v.error is None), "")
    limits = sshd_checks.check_limits(usepam, limits_lines())
    if limits is not None:
        found.append(limits)
    found += _path_checks(request.wrapper or _default_wrapper(views), views)
    return found, dry
