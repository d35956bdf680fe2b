"""Keep the kernel's cgroup-migration fast path warm for the adoption that is about to come.

Moving a process between cgroups takes the kernel's global ``cgroup_threadgroup_rwsem``
for writing; the first writer after a quiet spell waits for an RCU grace period (~10 ms
here, up to ~35), later ones within ~10-20 ms cost a fraction of a millisecond. A login's
adoption is such a first move, so it would pay the grace period on the login's path.
The broker therefore moves a process of its own between two cgroups of its own the
moment a connection starts its key check (the monitor takes the user's effective uid):
the grace period runs while the client is still authenticating, and the adoption
moments later takes the fast path. The rwsem is global, so a move in the cgroup v2
hierarchy warms moves in every hierarchy, v1 included. Nothing of any job is touched.

The two cgroups are made under the broker's own cgroup in the v2 hierarchy
(``<mount><own cgroup>/sshd-adopt-warm-<node>/{a,b}``; with systemd, the unit
delegates that subtree), the process moved is the broker's guardian (it only waits
on a pipe), and they are removed when the broker stops. Where they cannot be made (no
v2 hierarchy, a read-only one) warming is off, with one log line: adoption is just as
correct, only the first move of a burst costs its grace period.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from sshd_adopt._internal.logs import logger

#: Moves closer together than this are not repeated: one keeps the path warm for all.
MIN_INTERVAL = 0.005


def cgroup2_mount(mountinfo: str) -> str | None:
    """The mount point of the cgroup v2 hierarchy's root, from ``/proc/self/mountinfo`` text.

    The last such mount wins: a later mount hides what an earlier one shows at or under
    its path (a hybrid host's ``/sys/fs/cgroup/unified``, once the hierarchy is bound
    over ``/sys/fs/cgroup`` itself in a container's mount namespace, is still listed but
    no longer reachable). Binds of a child cgroup (mount root other than ``/``) are not
    the hierarchy's root.
    """
    found = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if sep and right.split(" ", 1)[0] == "cgroup2" and len(fields) > 4 and fields[3] == "/":
            found = fields[4]
    return found


def own_cgroup2(cgroup: str) -> str | None:
    """This process's cgroup in the v2 hierarchy, from ``/proc/self/cgroup`` text."""
    for line in cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def default_base(nodename: str) -> str | None:
    """``<v2 mount><own cgroup>/sshd-adopt-warm-<node>``, or None without a v2 hierarchy."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mount = cgroup2_mount(handle.read())
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            own = own_cgroup2(handle.read())
    except OSError:
        return None
    if mount is None or own is None:
        return None
    return f"{mount}{own.rstrip('/')}/sshd-adopt-warm-{nodename}"


class MigrationWarmer:
    """Moves one broker-owned process between two cgroups of its own (thread-safe)."""

    def __init__(self, base: str, pid: int) -> None:
        self.base = base
        self._pid = pid
        self._lock = threading.Lock()
        self._last = 0.0
        self._side = "a"
        for side in ("a", "b"):
            os.makedirs(f"{base}/{side}", mode=0o755, exist_ok=True)
        self._move("a")

    def _move(self, side: str) -> None:
        with open(f"{self.base}/{side}/cgroup.procs", "w", encoding="ascii") as handle:
            handle.write(str(self._pid))
        self._side = side

    def follow(self, pid: int) -> None:
        """Move ``pid`` from now on (the guardian was replaced)."""
        with self._lock:
            self._pid = pid
            try:
                self._move(self._side)
            except OSError as err:
                logger().debug("cgroup warming: %s", err)

    def warm(self) -> None:
        """One move (skipped when one was made moments ago, or is under way)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if now - self._last < MIN_INTERVAL:
                return
            self._move("b" if self._side == "a" else "a")
            self._last = time.monotonic()
        except OSError as err:
            logger().debug("cgroup warming: %s", err)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Remove the cgroups (the moved process must have exited, or they stay)."""
        for path in (f"{self.base}/a", f"{self.base}/b", self.base):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def start_warmer(nodename: str, pid: int) -> MigrationWarmer | None:
    """A warmer moving ``pid``, or None (logged) where the cgroups cannot be made."""
    base = default_base(nodename)
    if base is None:
        logger().info("cgroup warming off: no cgroup v2 hierarchy")
        return None
    try:
        return MigrationWarmer(base, pid)
    except OSError as err:
        logger().info("cgroup warming off: %s: %s", base, err)
        return None
