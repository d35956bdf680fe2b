"""``sshd-adopt doctor``: check that this node will adopt ssh sessions, before users find out.

The wrapper dispatches ``sshd-adopt doctor ...`` here (a lazy import, so the
login path never pays for argparse or json). Thin: arguments, then
:mod:`sshd_adopt._internal.doctor.gather` (the facts) and
:mod:`sshd_adopt._internal.doctor.checks` (the judging), then the report.

Exit status: 0 when no check FAILed (warnings allowed), 1 otherwise, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from sshd_adopt import __version__
from sshd_adopt._internal.config import DEFAULT_CONFIG_PATH
from sshd_adopt._internal.doctor import checks as doctor
from sshd_adopt._internal.doctor.checks import Check, DryRun, Status
from sshd_adopt._internal.doctor.gather import DEFAULT_SSHD, Request, gather


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
                        help="broker configuration (default: the one the running broker "
                        f"loaded, else {DEFAULT_CONFIG_PATH})")
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
    checks, dry = gather(Request(config=args.config, user=args.user, sshd=args.sshd,
                                 sshd_config=args.sshd_config, wrapper=args.wrapper))
    print(render_json(checks, dry) if args.json else render_text(checks, dry))
    return doctor.exit_status(checks)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
