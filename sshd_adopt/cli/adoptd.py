"""``sshd-adoptd``: the root broker that adopts ssh sessions into Slurm jobs.

Thin: parse arguments, load and check the configuration, then run the broker
in the foreground (for systemd or a supervisor) or as a classic daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import NoReturn

from sshd_adopt import __version__
from sshd_adopt._internal import logs
from sshd_adopt._internal.broker.server import Broker
from sshd_adopt._internal.config import DEFAULT_CONFIG_PATH, Config, load_config
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.slurm.facts import load_slurm_facts
from sshd_adopt.errors import Error

EPILOG = """\
exit status: 0 ok, 1 runtime error, 2 usage or configuration error.

examples:
  sshd-adoptd --check                      validate /etc/sshd-adopt/sshd-adopt.toml
  sshd-adoptd --foreground                 run under systemd (Type=notify) or a supervisor
  sshd-adoptd --daemon --pid-file /run/sshd-adopt/sshd-adoptd.pid
signals: SIGHUP reloads the configuration and Slurm facts, SIGTERM finishes
requests in flight and exits.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshd-adoptd",
        description="Root broker that puts OpenSSH sessions into the user's Slurm job "
        "(the extern step), as pam_slurm_adopt does from PAM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c", "--config", default=None, metavar="PATH",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="validate the configuration and the Slurm facts, print a summary, exit",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "-f", "--foreground", action="store_true",
        help="stay in the foreground and log to stderr (default)",
    )
    mode.add_argument(
        "-d", "--daemon", action="store_true",
        help="detach, write a pid file and log to syslog",
    )
    parser.add_argument("--pid-file", metavar="PATH", help="pid file for --daemon")
    parser.add_argument("-V", "--version", action="version", version=f"sshd-adoptd {__version__}")
    return parser


def load_state(config_path: str | None) -> BrokerState:
    """Load the configuration, then the Slurm facts; a Slurm problem is kept, not fatal.

    A broken slurm.conf must not stop the broker: root and exempt users are
    decided without it, and everyone else gets ``action_generic_failure``.
    """
    config = load_config(config_path)
    try:
        slurm = load_slurm_facts(config.slurm.conf_path, nodename=config.options.nodename)
    except Error as err:
        return BrokerState(config=config, slurm=None, slurm_problem=str(err))
    problem = None if slurm.nodename else "this host's NodeName was not found in slurm.conf"
    return BrokerState(config=config, slurm=slurm, slurm_problem=problem)


def _summary(state: BrokerState) -> str:
    config: Config = state.config
    slurm = state.slurm
    lines = [
        f"config:    {config.path}",
        f"socket:    {config.broker.socket_path}",
        f"policy:    no_jobs={config.options.action_no_jobs}"
        f" unknown={config.options.action_unknown}"
        f" adopt_failure={config.options.action_adopt_failure}"
        f" generic_failure={config.options.action_generic_failure}"
        f" fallthrough={config.options.fallthrough}",
        f"exempt:    users={sorted(config.exempt.users)} groups={sorted(config.exempt.groups)}",
    ]
    if slurm is not None:
        lines += [
            f"slurm:     {slurm.conf_path} (version {slurm.version or '?'})",
            f"node:      {slurm.nodename or '?'} spool={slurm.spool_dir} port={slurm.slurmd_port}",
        ]
    lines += [f"warning:   {w}" for w in config.warnings]
    if state.slurm_problem:
        lines.append(f"problem:   {state.slurm_problem}")
    return "\n".join(lines)


def _notify_ready(status: str) -> None:
    """Tell systemd (Type=notify) we are listening, with a status line for ``systemctl
    status``; a no-op without NOTIFY_SOCKET (``sd_notify(3)``: newline-separated
    assignments in one datagram)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    line = status.replace("\n", " ")[:400]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(f"READY=1\nSTATUS={line}".encode(errors="replace"), address)


def _fatal(message: str, status: int) -> NoReturn:
    print(f"sshd-adoptd: {message}", file=sys.stderr)
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sshd-adoptd``."""
    args = _parser().parse_args(argv)
    try:
        state = load_state(args.config)
    except Error as err:
        _fatal(str(err), 2)
    if args.check:
        print(_summary(state))
        return 1 if state.slurm_problem else 0
    if os.geteuid() != 0:
        _fatal("must run as root (it adopts processes through slurmstepd)", 2)
    log = state.config.log
    target = log.target
    if args.daemon and target == "auto":
        target = "syslog"
    logs.setup(target=target, level=state.config.options.log_level, ident=log.ident,
               facility=log.facility)
    for warning in state.config.warnings:
        logs.logger().warning("%s", warning)
    if args.daemon:
        return _run_daemonised(args.config, args.pid_file or state.config.broker.pid_file)
    return _run(args.config)


def _run(config_path: str | None) -> int:
    broker = Broker(lambda: load_state(config_path))
    try:
        asyncio.run(broker.serve(ready=_notify_ready))
    except Error as err:
        logs.logger().error("%s", err)
        return 1
    return 0


def _run_daemonised(config_path: str | None, pid_file: str) -> int:
    """Classic daemon: detach with python-daemon, hold a pid file, then serve."""
    import daemon  # noqa: PLC0415  (only the daemon mode needs it)
    import daemon.pidfile  # noqa: PLC0415

    os.makedirs(os.path.dirname(pid_file), mode=0o755, exist_ok=True)
    context = daemon.DaemonContext(
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pid_file, acquire_timeout=1),
        umask=0o022,
        working_directory="/",
    )
    with context:
        state = load_state(config_path)
        logs.setup(target="syslog", level=state.config.options.log_level,
                   ident=state.config.log.ident, facility=state.config.log.facility)
        return _run(config_path)


if __name__ == "__main__":
    raise SystemExit(main())
