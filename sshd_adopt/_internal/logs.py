"""Logging at pam_slurm_adopt's levels, to syslog or stderr.

Admins grep for pam_slurm_adopt's log lines and set ``log_level`` in Slurm's
vocabulary (quiet … debug5), so the broker speaks that vocabulary too and maps
it onto :mod:`logging` levels once, here.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

from sshd_adopt._internal.core.options import LogLevel

LOGGER_NAME = "sshd-adopt"

#: Slurm level -> logging level. VERBOSE and DEBUG2..5 sit between the stdlib ones.
_LEVELS: dict[LogLevel, int] = {
    LogLevel.QUIET: logging.CRITICAL + 10,
    LogLevel.FATAL: logging.CRITICAL,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.INFO: logging.INFO,
    LogLevel.VERBOSE: logging.INFO - 1,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.DEBUG2: logging.DEBUG - 1,
    LogLevel.DEBUG3: logging.DEBUG - 2,
    LogLevel.DEBUG4: logging.DEBUG - 3,
    LogLevel.DEBUG5: logging.DEBUG - 4,
}

_FACILITIES = logging.handlers.SysLogHandler.facility_names


def python_level(level: LogLevel) -> int:
    """The :mod:`logging` level that corresponds to a Slurm log level."""
    return _LEVELS[level]


def logger() -> logging.Logger:
    """The one logger every part of sshd-adopt writes to."""
    return logging.getLogger(LOGGER_NAME)


def setup(*, target: str, level: LogLevel, ident: str, facility: str) -> None:
    """(Re)configure the sshd-adopt logger; safe to call again on SIGHUP.

    ``target`` is ``syslog``, ``stderr`` or ``auto`` (stderr when it is a
    terminal or we run in the foreground under a supervisor that captures it,
    i.e. when stderr is not /dev/null; syslog otherwise).
    """
    log = logger()
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    if target == "auto":
        target = "stderr" if _stderr_is_useful() else "syslog"
    handler: logging.Handler
    if target == "syslog" and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=_FACILITIES.get(facility, _FACILITIES["authpriv"])
        )
        handler.ident = f"{ident}[{os.getpid()}]: "
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {ident}[%(process)d]: %(levelname)s: %(message)s")
        )
    log.addHandler(handler)
    log.setLevel(python_level(level))
    log.propagate = False


def _stderr_is_useful() -> bool:
    """True unless stderr is closed or /dev/null (as after daemonising)."""
    try:
        stat = os.fstat(2)
        null = os.stat(os.devnull)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) != (null.st_dev, null.st_ino)


class Phases:
    """Wall time per phase of one request, in milliseconds, for its log line."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.spent: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.spent.append((name, (now - self._last) * 1000))
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{name}={ms:.0f}" for name, ms in self.spent)
