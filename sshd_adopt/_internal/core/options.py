"""pam_slurm_adopt's options, typed, with sshd-adopt's defaults.

The option names and values are pam_slurm_adopt's, so an admin can carry a
PAM line over unchanged. Two defaults differ on purpose, both to fail closed:
``action_adopt_failure`` is ``deny`` (upstream: ``allow``, which lets users in
unconfined when adoption breaks; upstream's own docs recommend ``deny``), and
``ignore`` is resolved through an explicit ``fallthrough`` policy (default
``deny``) because a ForceCommand has no "next PAM module" to defer to.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class NoJobsAction(enum.StrEnum):
    """What to do when the user has no job with an extern step on this node."""

    DENY = "deny"
    IGNORE = "ignore"


class UnknownAction(enum.StrEnum):
    """What to do when the user has several jobs and the source job is unknown."""

    NEWEST = "newest"
    ALLOW = "allow"
    DENY = "deny"


class AdoptFailureAction(enum.StrEnum):
    """What to do when the stepd refuses or fails to adopt the session."""

    ALLOW = "allow"
    DENY = "deny"


class GenericFailureAction(enum.StrEnum):
    """What to do when we cannot work at all (node name unknown, broker down)."""

    ALLOW = "allow"
    IGNORE = "ignore"
    DENY = "deny"


class FallThrough(enum.StrEnum):
    """The site's answer for ``ignore``: PAM would ask the next module; we must decide."""

    ALLOW = "allow"
    DENY = "deny"


class LogLevel(enum.IntEnum):
    """Slurm's log levels, as pam_slurm_adopt's ``log_level`` accepts them."""

    QUIET = 0
    FATAL = 1
    ERROR = 2
    INFO = 3
    VERBOSE = 4
    DEBUG = 5
    DEBUG2 = 6
    DEBUG3 = 7
    DEBUG4 = 8
    DEBUG5 = 9


@dataclass(frozen=True)
class Options:
    """The decision options, one field per pam_slurm_adopt option (plus ``fallthrough``).

    ``ignore_root`` exists for compatibility only: upstream forces it back to
    true in every configuration that can occur, and so do we (root is never
    adopted and never denied).
    """

    action_no_jobs: NoJobsAction = NoJobsAction.DENY
    action_unknown: UnknownAction = UnknownAction.NEWEST
    action_adopt_failure: AdoptFailureAction = AdoptFailureAction.DENY
    action_generic_failure: GenericFailureAction = GenericFailureAction.IGNORE
    fallthrough: FallThrough = FallThrough.DENY
    ignore_root: bool = True
    single_job_skip_rpc: bool = True
    disable_x11: bool = False
    join_container: bool = True
    nodename: str | None = None
    log_level: LogLevel = LogLevel.INFO


def replace(options: Options, **changes: object) -> Options:
    """Return a copy of ``options`` with ``changes`` applied (typed helper for tests)."""
    return dataclasses.replace(options, **changes)  # type: ignore[arg-type]
