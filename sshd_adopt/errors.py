"""The single root of every error sshd-adopt raises on purpose.

Every failure the broker, the wrapper or the admin CLI can meet is mapped to
one of these classes at the place where it happens (an ``OSError`` from /proc,
a short read from a stepd socket, a bad TOML value), so the entry points need
exactly one ``except Error`` to turn it into a log line, a user message and an
exit status. Anything else escaping is a bug.
"""


class Error(Exception):
    """Base class of all errors raised deliberately by sshd-adopt."""


class ConfigError(Error):
    """A configuration file is unreadable or invalid.

    The message always names the file and, where there is one, the key, so an
    admin can fix it without reading code.
    """

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class SlurmConfigError(Error):
    """The installed Slurm configuration lacks or garbles a fact we need."""


class ProcError(Error):
    """Reading a process's facts from /proc failed."""


class NoSuchProcess(ProcError):
    """The process vanished while we looked at it (an expected race)."""


class AccessDenied(ProcError):
    """/proc refused us; the broker runs as root, so this means misconfiguration."""


class NotAnSshSession(Error):
    """The peer does not descend from a genuine per-connection sshd of its own user."""


class StepdError(Error):
    """Talking to a slurmstepd failed."""


class StepdUnavailable(StepdError):
    """The step socket refused, timed out or is stale: the step is gone or hung."""


class StepdProtocolError(StepdError):
    """The stepd answered something we do not understand (version, short read)."""


class CallerIdError(Error):
    """The callerid RPC could not give an answer (not the same as "no job")."""


class BrokerProtocolError(Error):
    """A broker request or reply was malformed, oversized or cut short."""
