"""Which authenticated connections are held still until their admission is decided, and
which are ended the moment authentication completes.

A publickey login of a managed user met a key entry before sshd accepted it: a user who
may not be here got, at most, a ``restrict``-ed key (no forwarding, the wrapper as the
command). A login by hostbased or GSSAPI authentication met none
(:mod:`sshd_adopt._internal.authmethods`): its session could open forwarded connections
in the milliseconds the broker takes to decide. So such a connection's post-
authentication child is stopped (SIGSTOP) by the watcher thread the moment it takes the
user's uid -- before it has handled a packet of the session -- and the decision then
continues it or kills it (:meth:`~sshd_adopt._internal.services.adoption.Adoption.
authenticated`).

Behind the keyless profile's PAM gate (``pam.d/sshd-adopt``, or the block in
``/etc/pam.d/sshd``: sshd refuses a user without a job in its account phase, before
authentication succeeds) none of this happens: the key check's answer says ``gated``, and
the connection counts as needing a key. What follows is the enforcement where there is no
gate, and a race the broker usually wins, not a boundary.

Whether a connection may be keyless is learnt from its monitor's key check: every login
attempt makes sshd's monitor take the user's effective uid before authentication ends
(publickey: reading the key files; hostbased: looking for ``~/.shosts``,
``auth-rhosts.c``; GSSAPI: storing the credentials; OpenSSH 9.2 to 10.5), and the broker
then asks sshd (``sshd -T``) whether this user may come in without a key. A connection is
held when that answer says so, or when its listener let such a user in before -- and only
the child that takes that very user's uid: the
pre-authentication child takes the privilege-separation user's, and runs under a seccomp
filter that kills it for the ``restart_syscall`` a stop and continue can cause (seen on
OpenSSH 10.6: "unpriv child crash", signal 31). A login whose answer is not in yet when
authentication ends (``sshd -T`` takes 10-20 ms; answers are cached for a minute per user
and address) is not held: on a listener that never admitted a keyless login before, the
first one is ended by the decision alone, milliseconds after authentication. Publickey-
only nodes hold nothing.

Holding at the uid change can be too late: the client learns of its success before the
server forks that child, and channel requests it sends meanwhile are handled by the child
straight after it took the uid (OpenSSH reads them with the key state). So where the key
check's answer is already a refusal (a user who may come in without a key and whom the
decision without the source job refuses: no job here), the connection is doomed: when its
pre-authentication child exits -- authentication has completed, or failed -- the watcher
kills the monitor and any child it has, before the session child is forked or while it is
being set up; a fork of a doomed monitor after that is killed as it appears. The key check
runs on a worker and may finish after authentication did; so a refusal is remembered per
listener and user for :data:`VERDICT_TTL` seconds (and forgotten when the user's jobs here
change), and the next attempt is doomed on the watcher thread the moment its monitor
takes the user's uid, long before authentication can complete. When authentication
completes before the key check has answered (the first attempt: ``sshd -T`` takes 10-20
ms) on a listener that admits keyless logins, the monitor itself is stopped until the
answer is in, before it can fork the session child, then killed or continued; so is a
monitor whose only key check comes after authentication (GSSAPI: storing the user's
credentials, before the fork).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

from sshd_adopt._internal.node import signals

#: A monitor's key check is running; its answer is not in yet.
CHECKING: Final = "checking"
#: Its user may log in without a key (hostbased, GSSAPI...).
KEYLESS: Final = "keyless"
#: Its user needs a key: nothing to hold.
KEYED: Final = "keyed"
#: Bound on the monitors and listeners remembered (a flood of attempts cannot grow them).
MAX_REMEMBERED: Final = 65536
#: Seconds a refusal found by a key check dooms the same user's next attempts at once.
VERDICT_TTL: Final = 10.0


class Holds:
    """Key-check answers per monitor, and listeners known to admit keyless logins
    (thread-safe; the watcher asks on its own thread, so every call is a dict lookup)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 stop: Callable[[int], bool] | None = None) -> None:
        self._clock = clock
        self._stop = stop or _sigstop
        self._stopped: set[int] = set()  # monitors stopped until their key check answers
        self._refused: dict[tuple[int, int], tuple[str, float]] = {}  # (listener, uid)
        self._lock = threading.Lock()
        self._monitors: dict[int, tuple[str, int]] = {}  # monitor -> (state, user's uid)
        self._keyless_listeners: set[int] = set()
        self._doomed: dict[int, str] = {}  # monitor -> why its user is refused

    def checking(self, monitor: int, uid: int, listener: int | None = None) -> None:
        """The monitor took ``uid`` as its effective uid and its key check was submitted
        (watcher thread). A refusal of this user on this listener a moment ago dooms the
        connection now."""
        with self._lock:
            if len(self._monitors) < MAX_REMEMBERED:
                self._monitors.setdefault(monitor, (CHECKING, uid))
            refused = self._refused.get((listener or 0, uid))
            if refused is not None and self._clock() - refused[1] < VERDICT_TTL \
                    and monitor in self._monitors and len(self._doomed) < MAX_REMEMBERED:
                self._doomed[monitor] = refused[0]

    def checked(self, monitor: int, listener: int, *, keyless: bool,
                known: bool = True) -> bool:
        """The key check's answer: whether this monitor's user may log in without a key
        (``known``: sshd said so; an unknown answer holds this connection only). Call it
        after any :meth:`doom`. True when the monitor was stopped waiting for this answer
        (:meth:`stop_if_awaiting`): the caller continues or kills it now."""
        with self._lock:
            entry = self._monitors.get(monitor)
            if entry is not None:
                self._monitors[monitor] = (KEYLESS if keyless else KEYED, entry[1])
            if keyless and known and len(self._keyless_listeners) < MAX_REMEMBERED:
                self._keyless_listeners.add(listener)
            if monitor in self._stopped:
                self._stopped.discard(monitor)
                return True
            return False

    def stop_if_awaiting(self, monitor: int, listener: int | None) -> bool:
        """Authentication just completed (sshd's pre-auth child exited) but the key check
        has not answered yet, on a listener that admits keyless logins: stop the monitor
        (before it forks the session child) until :meth:`checked`. Watcher thread."""
        with self._lock:
            entry = self._monitors.get(monitor)
            if entry is None or entry[0] != CHECKING or listener not in self._keyless_listeners:
                return False
            if not self._stop(monitor):  # under the lock: checked() cannot miss it
                return False
            self._stopped.add(monitor)
            return True

    def should_hold(self, monitor: int, listener: int | None, uid: int) -> bool:
        """Whether to stop the monitor's child that just took ``uid`` until it is decided:
        the user's own post-authentication child, when the login may be keyless."""
        with self._lock:
            known = self._monitors.get(monitor)
            if known is None or known[1] != uid:
                return False
            return known[0] == KEYLESS or listener in self._keyless_listeners

    def doom(self, monitor: int, why: str, listener: int | None = None) -> None:
        """The key check found this monitor's user refused, and keyless logins possible:
        end the connection as soon as authentication completes (and the user's next
        attempts on ``listener`` too, for a while)."""
        now = self._clock()
        with self._lock:
            known = self._monitors.get(monitor)
            if known is None:
                return
            if len(self._doomed) < MAX_REMEMBERED:
                self._doomed[monitor] = why
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused = {k: v for k, v in self._refused.items()
                                 if now - v[1] < VERDICT_TTL}
            if len(self._refused) < MAX_REMEMBERED:
                self._refused[(listener or 0, known[1])] = (why, now)

    def jobs_changed(self, uid: int) -> None:
        """The user's jobs on this node changed: no refusal of theirs stands."""
        with self._lock:
            for key in [k for k in self._refused if k[1] == uid]:
                del self._refused[key]

    def doomed(self, monitor: int) -> str | None:
        """Why this monitor's connection is to be ended at authentication (None: it is not)."""
        with self._lock:
            return self._doomed.get(monitor)

    def forget(self, monitor: int) -> None:
        """The monitor is gone."""
        with self._lock:
            self._monitors.pop(monitor, None)
            self._doomed.pop(monitor, None)
            self._stopped.discard(monitor)


def _sigstop(pid: int) -> bool:
    """signals.hold, looked up when called (tests replace it)."""
    return signals.hold(pid)
