"""``sshd-adopt``: the ForceCommand, the barrier between an ssh session and the user's command.

sshd runs this as the user for every session of a managed user. By then the broker
has usually adopted the connection already (right after authentication) and left the
answer in a session ticket, which this reads instead of asking (when its own cgroup
is that job's and its ForceCommand line has no options); otherwise it asks the broker
to make sure (and to adopt now if it could not). Then it exports what the job provides
(``SLURM_JOB_ID``, and ``DISPLAY``/``XAUTHORITY`` for X11 jobs), then execs exactly
what sshd would have run: the login shell as a login shell, or
``$SHELL -c "$SSH_ORIGINAL_COMMAND"``, with ``SHLVL`` removed so that the command's
shell reads its startup files as it would under a plain sshd (the drop-in's
``SetEnv SHLVL=1`` keeps Debian's bash from reading ``~/.bashrc`` for this command's
own shell). Refusals go to stderr only, since anything on stdout would corrupt scp,
sftp and rsync. When the job has a mount namespace of its own (a private /tmp), only a
privileged process can start the session inside it: the wrapper then hands its streams
to the broker's spawner and stands in for the session until it ends
(:mod:`sshd_adopt._internal.spawnclient`).

It is on the critical path of every login, so it imports only the interpreter's
builtins (``posix``, not ``os``: ``os`` alone costs ~2 ms) and the small wire module.
It is a convenience and a barrier, not the containment boundary: the broker treats
everything it sends as untrusted.
"""

import posix
import pwd
import sys

from sshd_adopt._internal import protocol
from sshd_adopt._internal.sessioncmd import EXPORTED, session_argv, session_environment
from sshd_adopt.errors import BrokerProtocolError

USAGE = """\
usage: sshd-adopt [--socket=PATH] [--timeout=SECONDS] [--sftp-server=PATH] [OPTION=VALUE ...]
       sshd-adopt doctor [--config PATH] [--user NAME] [--json]

ForceCommand for sshd: makes sure sshd-adoptd adopted this ssh session into the
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

DEFAULT_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
#: How far up from this process the connection's monitor may be (session process,
#: a shell that did not exec, ...).
MAX_HOPS = 6
DENIED_STATUS = 255  # what an ssh client reports when pam_slurm_adopt refuses


class Settings:
    """The wrapper's arguments, parsed by hand (argparse costs ~5 ms to import)."""

    def __init__(self, argv: list[str]) -> None:
        self.socket_path = protocol.DEFAULT_SOCKET
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
                try:
                    self.timeout = float(value)
                except ValueError:
                    raise SystemExit(f"sshd-adopt: --timeout={value!r} is not a number of "
                                     "seconds (see --help)") from None
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


def session_env(exported: dict[str, str]) -> dict[str, str]:
    """The session's environment: ours, plus what the job exports, minus our own traces."""
    return session_environment(
        {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
         for key, value in posix.environ.items()}, exported)


def run_session(settings: Settings, exported: dict[str, str] | None = None) -> None:
    """Replace this process with the user's shell or command."""
    shell = pwd.getpwuid(posix.getuid()).pw_shell or "/bin/sh"
    raw = posix.environ.get(b"SSH_ORIGINAL_COMMAND")
    command = raw.decode("utf-8", "surrogateescape") if raw is not None else None
    argv = session_argv(shell, command, settings.sftp_server)
    sys.stdout.flush()
    sys.stderr.flush()
    posix.execve(shell, argv, session_env(exported or {}))


def _read(path: str, limit: int = 4096) -> bytes:
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        return posix.read(fd, limit)
    finally:
        posix.close(fd)


def _wholly_beside(monitor: int, markers: tuple[bytes, ...]) -> bool:
    """Whether this process is in the job in every hierarchy its monitor is (a process
    forked while the stepd moved its parent can be in some and not in others); the job's
    lines are those holding one of ``markers``."""
    theirs = [line for line in _read(f"/proc/{monitor}/cgroup", 65536).splitlines()
              if any(marker in line for marker in markers)]
    own = set(_read("/proc/self/cgroup", 65536).splitlines())
    return bool(theirs) and all(line in own for line in theirs)


def _job_cgroup(ticket: dict[str, str]) -> tuple[bytes, ...]:
    """How the ticket's job can show in /proc/<pid>/cgroup: ``/job_<id>/step_extern``,
    and ``/<sluid>/step_extern`` when the ticket has a SLUID (Slurm 26.05's cgroup/v2
    names job cgroups by it unless ``CgroupJobIdPaths=yes``)."""
    names = [f"job_{ticket.get('job')}"]
    sluid = ticket.get(protocol.SLUID, "")
    if len(sluid) == 14 and sluid.startswith("s") and sluid[1:].isalnum():
        names.append(sluid)
    return tuple(f"/{name}/step_extern".encode() for name in names)


def read_ticket(socket_path: str) -> dict[str, str] | None:
    """The broker's answer for this session, left for it when the connection was adopted
    right after authentication; None when there is none to trust (then ask).

    The ticket is the monitor's (an ancestor of this process, matched by pid and
    start time), says "adopted", and this process is in that job's extern step in
    every hierarchy the monitor is.
    """
    directory = protocol.sessions_dir(socket_path)
    try:
        pid = protocol.stat_identity(_read("/proc/self/stat"))[0]
        for _ in range(MAX_HOPS):
            if pid <= 1:
                return None
            try:
                frame = _read(f"{directory}/{pid}", protocol.MAX_FRAME + protocol.LENGTH_BYTES)
            except FileNotFoundError:
                pid = protocol.stat_identity(_read(f"/proc/{pid}/stat"))[0]
                continue
            size = protocol.LENGTH_BYTES
            if protocol.frame_length(frame[:size]) + size != len(frame):
                return None
            items = protocol.decode(frame[protocol.LENGTH_BYTES:])
            start = protocol.stat_identity(_read(f"/proc/{pid}/stat"))[1]
            if (items.get(protocol.MONITOR_START) == str(start)
                    and items.get("result") == protocol.ADOPTED
                    and _wholly_beside(pid, _job_cgroup(items))):
                return items
            return None
    except (OSError, ValueError, BrokerProtocolError):
        return None
    return None


def spawn_session(settings: Settings) -> None:
    """Have the broker start the session inside the job's namespaces and stand in for it
    until it ends (never returns), unless the broker says to run it here (returns)."""
    from sshd_adopt._internal import spawnclient  # noqa: PLC0415  (only for such jobs)

    try:
        relay, answer = spawnclient.request(settings.socket_path, timeout=settings.timeout,
                                            sftp_server=settings.sftp_server)
        if relay is None:
            if answer.get("result") == protocol.ALLOWED:
                return  # the job has no namespaces after all
            deny(answer.get("message") or "sshd-adopt: access denied: the session could not "
                 "be started in the job")
            return
        spawnclient.leave(spawnclient.relay(relay))
    except (OSError, BrokerProtocolError) as err:
        deny(f"sshd-adopt: access denied: the session could not be started in the job ({err})")


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
    if posix.getuid() == 0:
        run_session(settings)  # root is never adopted, and never waits for the broker
    ticket = None if settings.overrides else read_ticket(settings.socket_path)
    try:
        reply = ticket or protocol.exchange(
            settings.socket_path, protocol.adopt_request(settings.overrides),
            timeout=settings.timeout)
    except (OSError, BrokerProtocolError) as err:
        if settings.broker_failure_allows():
            sys.stderr.write(f"sshd-adopt: broker unavailable ({err}); continuing unadopted\n")
            run_session(settings)
        deny(f"sshd-adopt: access denied: the adoption service is unavailable ({err})")
        return
    result = reply.get("result")
    if result == protocol.ADOPTED:
        exported = {key[len(protocol.ENV_PREFIX):]: value for key, value in reply.items()
                    if key.startswith(protocol.ENV_PREFIX)
                    and key[len(protocol.ENV_PREFIX):] in EXPORTED}
        if reply.get(protocol.NAMESPACES) == "1":
            spawn_session(settings)  # the broker exports the job's variables itself
        run_session(settings, exported)
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
