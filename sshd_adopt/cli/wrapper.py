"""``sshd-adopt``: the ForceCommand that puts an ssh session into the user's job.

sshd runs this as the user for every session of a managed user. It asks the
root broker to adopt the connection, exports what the job provides
(``SLURM_JOB_ID``, and ``DISPLAY``/``XAUTHORITY`` for X11 steps), then execs
exactly what sshd would have run: the login shell as a login shell, or
``$SHELL -c "$SSH_ORIGINAL_COMMAND"``. Denials go to stderr only, since
anything on stdout would corrupt scp, sftp and rsync.

It is on the critical path of every login, so it imports nothing beyond the
interpreter's builtins and the tiny protocol module (no ``socket``, ``json``
or ``argparse``: each would add milliseconds).

This wrapper is a convenience, not the containment boundary: it runs after
the user's shell rc files and can be bypassed. The broker treats everything
it sends as untrusted.
"""

from __future__ import annotations

import os
import pwd
import sys

from sshd_adopt._internal import protocol
from sshd_adopt.errors import BrokerProtocolError

USAGE = """\
usage: sshd-adopt [--socket=PATH] [--timeout=SECONDS] [--sftp-server=PATH] [OPTION=VALUE ...]
       sshd-adopt doctor [--config PATH] [--user NAME] [--json]

ForceCommand for sshd: asks sshd-adoptd to adopt this ssh session into the
user's Slurm job, then runs the login shell or $SSH_ORIGINAL_COMMAND.

  --socket=PATH        broker socket (default /run/sshd-adopt/broker.sock)
  --timeout=SECONDS    how long to wait for the broker (default 8)
  --sftp-server=PATH   what 'internal-sftp' runs (default /usr/lib/openssh/sftp-server)
  OPTION=VALUE         pam_slurm_adopt options for this Match block, e.g.
                       action_unknown=deny; the broker accepts only values at
                       least as strict as its configuration's.

"sshd-adopt doctor" checks this node's setup (Slurm, broker, sshd -T per
user class, file modes) and, with --user, what would happen to that user.

If the broker cannot be reached, action_generic_failure (and fallthrough for
'ignore') given here decide; the default is to deny.
example sshd_config line:
  ForceCommand /opt/sshd-adopt/bin/sshd-adopt action_unknown=deny
"""

DEFAULT_SOCKET = "/run/sshd-adopt/broker.sock"
DEFAULT_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
DENIED_STATUS = 255  # what an ssh client reports when pam_slurm_adopt refuses
EXPORTED = frozenset({"SLURM_JOB_ID", "DISPLAY", "XAUTHORITY"})


class Settings:
    """The wrapper's arguments, parsed by hand (argparse costs ~5 ms to import)."""

    def __init__(self, argv: list[str]) -> None:
        self.socket_path = DEFAULT_SOCKET
        self.timeout = protocol.DEFAULT_WRAPPER_TIMEOUT
        self.sftp_server = DEFAULT_SFTP_SERVER
        self.overrides: dict[str, str] = {}
        for arg in argv:
            name, sep, value = arg.partition("=")
            if arg in ("-h", "--help"):
                sys.stdout.write(USAGE)
                raise SystemExit(0)
            if not sep:
                raise SystemExit(f"sshd-adopt: bad argument {arg!r} (see --help)")
            if name == "--socket":
                self.socket_path = value
            elif name == "--timeout":
                self.timeout = float(value)
            elif name == "--sftp-server":
                self.sftp_server = value
            elif name.startswith("-"):
                raise SystemExit(f"sshd-adopt: unknown option {name!r} (see --help)")
            else:
                self.overrides[name] = value

    def broker_failure_allows(self) -> bool:
        """Whether a broker failure lets the user in (action_generic_failure, fallthrough)."""
        action = self.overrides.get("action_generic_failure", "ignore")
        if action == "ignore":
            action = self.overrides.get("fallthrough", "deny")
        return action == "allow"


def ask_broker(settings: Settings) -> dict[str, str]:
    """Send one adopt request and return the reply's items; raise OSError or protocol errors."""
    request = {"v": protocol.PROTOCOL_VERSION, "op": "adopt"}
    for key, value in settings.overrides.items():
        request[protocol.OVERRIDE_PREFIX + key] = value
    return protocol.exchange(settings.socket_path, request, timeout=settings.timeout)


def session_argv(shell: str, command: str | None, sftp_server: str) -> list[str]:
    """What sshd itself would run: a login shell, or ``shell -c command``."""
    name = os.path.basename(shell)
    if command is None:
        return ["-" + name]
    if command == "internal-sftp" or command.startswith("internal-sftp "):
        # sshd hands subsystems to a ForceCommand as the configured command
        # line; internal-sftp lives inside sshd, so run the real server.
        command = sftp_server + command[len("internal-sftp"):]
    return [name, "-c", command]


def run_session(settings: Settings) -> None:
    """Replace this process with the user's shell or command."""
    entry = pwd.getpwuid(os.getuid())
    shell = entry.pw_shell or "/bin/sh"
    command = os.environ.pop("SSH_ORIGINAL_COMMAND", None)
    argv = session_argv(shell, command, settings.sftp_server)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(shell, argv)  # noqa: S606  (exec'ing the user's own shell is the point)


def deny(message: str) -> None:
    """Tell the user why, on stderr, and end the session."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    raise SystemExit(DENIED_STATUS)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``sshd-adopt``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["doctor"]:
        from sshd_adopt.cli import doctor  # noqa: PLC0415  (lazy: not on the login path)

        raise SystemExit(doctor.main(args[1:]))
    settings = Settings(args)
    if os.getuid() == 0:
        run_session(settings)  # root is never adopted, and never waits for the broker
    try:
        reply = ask_broker(settings)
    except (OSError, BrokerProtocolError) as err:
        if settings.broker_failure_allows():
            sys.stderr.write(f"sshd-adopt: broker unavailable ({err}); continuing unadopted\n")
            run_session(settings)
        deny(f"sshd-adopt: access denied: the adoption service is unavailable ({err})")
        return
    result = reply.get("result")
    if result == protocol.ADOPTED:
        for key, value in reply.items():
            name = key.removeprefix(protocol.ENV_PREFIX)
            if key.startswith(protocol.ENV_PREFIX) and name in EXPORTED:
                os.environ[name] = value
        run_session(settings)
    elif result == protocol.ALLOWED:
        run_session(settings)
    elif result == protocol.DENIED:
        deny(reply.get("message") or "sshd-adopt: access denied")
    elif settings.broker_failure_allows():
        run_session(settings)
    else:
        deny(reply.get("message") or "sshd-adopt: access denied: the broker could not decide")


if __name__ == "__main__":
    main()
