"""What became of a connection: the typed result every service returns.

Services return these; only the broker turns them into wire replies, and only there
is a denial's text rendered from the site's templates (with, for the wrapper, a hint
of where the user's jobs run). A service that does not show the text to anyone (the
sweeper, early adoption) never pays for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sshd_adopt._internal.core.decision import Message


@dataclass(frozen=True)
class Adopted:
    """The connection is in ``job``'s extern step; ``env`` is what the session exports;
    ``namespaces``: the job has namespaces of its own, which the session must enter."""

    job: int
    reason: str
    env: Mapping[str, str] = field(default_factory=dict)
    namespaces: bool = False


@dataclass(frozen=True)
class Allowed:
    """Let in without adoption (root, an exempt user, the site's policy)."""

    reason: str


@dataclass(frozen=True)
class Denied:
    """Refused. ``message`` picks the user's text; the other fields fill its template."""

    message: Message
    reason: str
    user: str
    node: str = "?"
    failed_job: int | None = None
    jobs: tuple[int, ...] = ()


@dataclass(frozen=True)
class Failed:
    """Nothing could be decided (the broker's own trouble); the caller's failure action applies."""

    reason: str


Outcome = Adopted | Allowed | Denied | Failed
