"""``sshd-adopt doctor``: check that this node will adopt ssh sessions, before users find out.

The wrapper dispatches ``sshd-adopt doctor ...`` here (a lazy import, so the
login path never pays for argparse, json or sh). This module gathers the
facts: it loads the configuration and slurm.conf, pings the broker, runs
``sshd -T`` per user class, stats the installed paths and, with ``--user``,
lists that user's extern steps. The judging is done by the pure checks in
:mod:`sshd_adopt._internal.doctor`. Every gathering failure becomes a finding,
so one broken piece never hides the report on the others.

Exit status: 0 when no check FAILed (warnings allowed), 1 otherwise, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import grp
import json
import os
import pwd
import sys
import time
from pathlib import Path

import sshd_adopt
from sshd_adopt import __version__
from sshd_adopt._internal import doctor
from sshd_adopt._internal.config import DEFAULT_CONFIG_PATH, Config, load_config
from sshd_adopt._internal.core.decision import LocalJob
from sshd_adopt._internal.doctor import Check, DryRun, ForcedCommand, SshdView, Status
from sshd_adopt._internal.slurm.facts import SlurmFacts, load_slurm_facts
from sshd_adopt._internal.slurm.localjobs import user_jobs
from sshd_adopt.errors import Error

#: sshd -T reads host keys and the whole config; it answers in milliseconds,
#: so anything slower is a hung NSS lookup for Match Group, worth reporting.
SSHD_TIMEOUT = 15.0
DEFAULT_SSHD = "/usr/sbin/sshd"
DEFAULT_SSHD_CONFIG = "/etc/ssh/sshd_config"
#: Where sshd resolves an Include that is not an absolute path (its SSHDIR).
SSHD_DIR = "/etc/ssh"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshd-adopt doctor",
        description="Check this node's sshd-adopt setup: configuration, Slurm prerequisites, "
        "the broker, sshd's effective configuration per user class and the ownership of "
        "installed files. Each check prints OK, WARN or FAIL with a one-line fix.",
        epilog="exit status: 0 no FAIL, 1 at least one FAIL, 2 usage error. "
        "Run as root: sshd -T and the Slurm step sockets need it.",
    )
    parser.add_argument("-c", "--config", metavar="PATH", default=None,
                        help=f"broker configuration (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-u", "--user", metavar="NAME",
                        help="also check sshd for this (managed) user and show what the broker "
                        "would decide for her now: her jobs with an extern step here")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--sshd", metavar="PATH", default=DEFAULT_SSHD,
                        help=f"the sshd binary (default {DEFAULT_SSHD})")
    parser.add_argument("--sshd-config", metavar="PATH",
                        help="sshd's configuration file (default: sshd's own default)")
    parser.add_argument("--wrapper", metavar="PATH",
                        help="the wrapper to check (default: the one sshd's ForceCommand "
                        "runs, else the sshd-adopt next to this interpreter)")
    return parser


# --------------------------------------------------------------------------- gathering


def _load_config(path: str | None) -> tuple[Config | None, str | None]:
    try:
        return load_config(path), None
    except Error as err:
        return None, str(err)


def _load_slurm(config: Config | None) -> tuple[SlurmFacts | None, str | None]:
    conf_path = config.slurm.conf_path if config else "/etc/slurm/slurm.conf"
    nodename = config.options.nodename if config else None
    try:
        return load_slurm_facts(conf_path, nodename=nodename), None
    except Error as err:
        return None, str(err)


def gather_sshd(user: str, sshd: str, config_file: str | None) -> SshdView:
    """sshd's effective configuration for ``user`` (``sshd -T -C user=U,host=x,addr=...``)."""
    import sh  # noqa: PLC0415  (only the doctor needs it; keep module import cheap)

    args = ["-T", "-C", f"user={user},host=x,addr=127.0.0.1"]
    if config_file:
        args += ["-f", config_file]
    try:
        out = sh.Command(sshd)(*args, _timeout=SSHD_TIMEOUT, _env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except sh.ErrorReturnCode as err:
        text = err.stderr.decode(errors="replace").strip() or f"exit status {err.exit_code}"
        return SshdView(user, error=text.splitlines()[-1])
    except sh.TimeoutException:
        return SshdView(user, error=f"no answer in {SSHD_TIMEOUT:.0f}s")
    except (sh.CommandNotFound, OSError) as err:
        return SshdView(user, error=f"cannot run {sshd}: {err}")
    return SshdView(user, settings=doctor.parse_sshd_t(str(out)))


def gather_forced_commands(path: str) -> list[ForcedCommand]:
    """The ForceCommand lines of sshd's configuration file and its Includes, with their Match.

    sshd -T shows the result for one user; which users a Match block leaves out
    is only in the files. An unreadable file gives nothing (sshd -T reports it).
    """
    def include(pattern: str) -> list[str]:
        if not pattern.startswith(("/", "~")):
            pattern = os.path.join(SSHD_DIR, pattern)
        texts = []
        for name in sorted(glob.glob(os.path.expanduser(pattern))):
            try:
                texts.append(Path(name).read_text(errors="replace"))
            except OSError:
                continue
        return texts

    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return doctor.forced_commands(text, include)


def _exempt_check(config: Config, config_path: str, sshd_config: str | None) -> list[Check]:
    """The users and groups the drop-in's Match block leaves out are exempt for the broker."""

    def user_is_exempt(name: str) -> bool:
        try:
            return config.exempt.covers(pwd.getpwnam(name))
        except KeyError:
            return True  # no such user: nobody to protect

    return doctor.check_exempt_agrees(
        gather_forced_commands(sshd_config or DEFAULT_SSHD_CONFIG),
        exempt_users=config.exempt.users, exempt_groups=config.exempt.groups,
        user_is_exempt=user_is_exempt, config_path=config_path,
        sweeper_enabled=config.sweeper.enabled)


def _user_gids(user: str) -> list[int] | None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return os.getgrouplist(user, entry.pw_gid)


def _exempt_users(config: Config | None) -> list[str]:
    """Root, the configured exempt users and the listed members of exempt groups.

    Each is checked with ``sshd -T`` so that a drop-in ``Match`` block that
    disagrees with the broker's ``[exempt]`` (an admin who would get the
    wrapper) shows up here. Only users that exist are listed (sshd -T needs
    real users); members through their primary group are not enumerated.
    """
    names = {"root"} | (set(config.exempt.users) if config else set())
    for group in sorted(config.exempt.groups) if config else ():
        try:
            names.update(grp.getgrnam(group).gr_mem)
        except KeyError:
            continue
    found = []
    for name in sorted(names):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        found.append(name)
    return found


def _default_wrapper(views: list[SshdView]) -> str:
    for view in views:
        wrapper = doctor.forced_wrapper(view.get("forcecommand"))
        if wrapper is not None:
            return wrapper
    return str(Path(sys.executable).parent / doctor.WRAPPER_NAME)


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
    checks = [doctor.check_safe_path("wrapper", wrapper, doctor.stat_chain(wrapper))]
    interpreter = _interpreter(wrapper)
    if interpreter:
        checks.append(doctor.check_safe_path("interpreter", interpreter,
                                             doctor.stat_chain(interpreter)))
    package = os.path.dirname(os.path.abspath(sshd_adopt.__file__))
    checks.append(doctor.check_safe_path("package", package, doctor.stat_chain(package)))
    commands = {v.get("authorizedkeyscommand") for v in views if v.error is None}
    for command in sorted(commands - {"none"}):
        program = command.split()[0]
        checks.append(doctor.check_safe_path("AuthorizedKeysCommand", program,
                                             doctor.stat_chain(program)))
    return checks


def _dry_run(
    user: str, config: Config, slurm: SlurmFacts | None
) -> tuple[DryRun | None, Check]:
    entry = pwd.getpwnam(user)
    gids = os.getgrouplist(user, entry.pw_gid)
    exempt = config.exempt.is_exempt(user, gids)
    node_known = slurm is not None and slurm.nodename is not None
    jobs: tuple[LocalJob, ...] = ()
    job_error = None
    if node_known and slurm is not None and slurm.spool_dir is not None and slurm.nodename:
        try:
            jobs = user_jobs(slurm.spool_dir, slurm.nodename, entry.pw_uid,
                             timeout=config.broker.stepd_timeout)
        except (Error, OSError) as err:
            job_error = str(err)
    result = doctor.dry_run(user, entry.pw_uid, exempt=exempt, node_known=node_known,
                            jobs=jobs, config=config)
    return result, doctor.check_dry_run(result, job_error=job_error)


def gather(args: argparse.Namespace) -> tuple[list[Check], DryRun | None]:
    """Run every check; return the findings in report order, and the dry run if asked."""
    checks: list[Check] = []
    if os.geteuid() != 0:
        checks.append(Check("privileges", Status.WARN, "not running as root: sshd -T and the "
                            "Slurm step sockets may refuse", "run sshd-adopt doctor as root"))
    config, error = _load_config(args.config)
    path = args.config or DEFAULT_CONFIG_PATH
    checks += doctor.check_config(config, error, path)
    try:
        config_st: os.stat_result | None = os.stat(path)
    except OSError:
        config_st = None
    checks.append(doctor.check_config_file(path, config_st))

    slurm, slurm_error = _load_slurm(config)
    spool_exists = None
    if slurm is not None and slurm.spool_dir is not None:
        spool_exists = os.path.isdir(slurm.spool_dir)
    checks += doctor.check_slurm(slurm, slurm_error, spool_exists=spool_exists)

    socket_path = config.broker.socket_path if config else "/run/sshd-adopt/broker.sock"
    checks += doctor.check_broker(doctor.ping_broker(socket_path), our_version=__version__,
                                  nodename=slurm.nodename if slurm else None)

    views: list[SshdView] = []
    for name in _exempt_users(config):
        view = gather_sshd(name, args.sshd, args.sshd_config)
        views.append(view)
        checks += doctor.check_sshd_exempt(view)
    dry: DryRun | None = None
    if args.user:
        gids = _user_gids(args.user)
        if gids is None:
            checks.append(Check(f"user ({args.user})", Status.FAIL, f"no such user {args.user}",
                                "check the name (NSS/LDAP must resolve it on this node)"))
        else:
            view = gather_sshd(args.user, args.sshd, args.sshd_config)
            views.append(view)
            if config is not None and config.exempt.is_exempt(args.user, gids):
                checks += doctor.check_sshd_exempt(view)
            else:
                checks += doctor.check_sshd_managed(view)
            if config is not None:
                dry, check = _dry_run(args.user, config, slurm)
                checks.append(check)
    else:
        checks.append(Check("sshd (managed user)", Status.SKIP,
                            "no --user given: sshd's view of a managed user is not checked",
                            "sshd-adopt doctor --user NAME (a user in the Match block)"))
    if config is not None:
        checks += _exempt_check(config, path, args.sshd_config)
    wrapper = args.wrapper or _default_wrapper(views)
    checks += _path_checks(wrapper, views)
    return checks, dry


# --------------------------------------------------------------------------- output


def _dry_run_json(dry: DryRun) -> dict[str, object]:
    return {
        "user": dry.user,
        "uid": dry.uid,
        "exempt": dry.exempt,
        "jobs": [dataclasses.asdict(job) for job in dry.jobs],
        "decision": doctor.describe(dry.decision),
        "fallback": doctor.describe(dry.fallback) if dry.fallback else None,
    }


def render_text(checks: list[Check], dry: DryRun | None) -> str:
    """The human report: one line per check, its fix indented below when not OK."""
    width = max((len(c.name) for c in checks), default=10)
    lines = []
    for check in checks:
        lines.append(f"{check.status.value:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status is not Status.OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    if dry is not None:
        lines.append("")
        lines.append(f"dry run for {dry.user} (uid {dry.uid}{', exempt' if dry.exempt else ''}):")
        if dry.jobs:
            lines += [f"  job {job.job_id}  extern step started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.started))}"
                      for job in dry.jobs]
        else:
            lines.append("  no job with an extern step on this node")
        lines.append(f"  decision: {doctor.describe(dry.decision)}")
        if dry.fallback is not None:
            lines.append(f"  if the source host does not answer: {doctor.describe(dry.fallback)}")
    fails = sum(c.status is Status.FAIL for c in checks)
    warns = sum(c.status is Status.WARN for c in checks)
    lines.append("")
    lines.append(f"{fails} failed, {warns} warnings, {len(checks)} checks")
    return "\n".join(lines)


def render_json(checks: list[Check], dry: DryRun | None) -> str:
    """Machine-readable report (for configuration management and monitoring)."""
    document = {
        "version": __version__,
        "ok": doctor.exit_status(checks) == 0,
        "checks": [dataclasses.asdict(c) for c in checks],
        "dry_run": _dry_run_json(dry) if dry is not None else None,
    }
    return json.dumps(document, indent=2, default=str)


def main(argv: list[str]) -> int:
    """Entry point of ``sshd-adopt doctor ARGS`` (``argv`` excludes the word "doctor")."""
    args = _parser().parse_args(argv)
    checks, dry = gather(args)
    print(render_json(checks, dry) if args.json else render_text(checks, dry))
    return doctor.exit_status(checks)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
