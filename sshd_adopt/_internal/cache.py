"""A small, bounded, thread-safe cache with expiry and single flight.

The broker asks the same slow question several times in a burst: which job a
connection came from (a network round trip), what sshd's configuration says for a
user (a fork/exec of ``sshd -T``), who a uid is (NSS: perhaps sssd or LDAP). One
answer per key within a short time is enough, and when several threads ask at once
for the same key, the first computes and the others wait for its answer instead of
asking again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


#: Below this many entries expired ones are left until the next purge.
_MIN_PURGE = 64


class TtlCache(Generic[K, V]):
    """Answers by key for ``ttl`` seconds, at most ``max_entries`` of them.

    Expired entries are dropped whenever the cache has doubled since the last purge
    (amortised, and at most 64 entries' worth before the first), so a cache keyed by
    connection holds about what is live, not ``max_entries`` of dead answers. When it
    is full of live entries it is emptied (a burst of distinct keys must not grow the
    root daemon's memory).
    """

    def __init__(self, ttl: float, *, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[K, tuple[float, V]] = {}
        self._pending: dict[K, threading.Event] = {}
        self._purge_at = min(_MIN_PURGE, max_entries)

    def get(self, key: K) -> V | None:
        """The cached answer for ``key``, or None when there is none (or it expired)."""
        with self._lock:
            hit = self._values.get(key)
            if hit is not None and hit[0] > self._clock():
                return hit[1]
        return None

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Remember ``value`` for ``ttl`` seconds (default: the cache's)."""
        now = self._clock()
        with self._lock:
            if key not in self._values and len(self._values) >= self._purge_at:
                self._values = {k: v for k, v in self._values.items() if v[0] > now}
                if len(self._values) >= self._max:
                    self._values.clear()
                self._purge_at = min(self._max, max(_MIN_PURGE, 2 * len(self._values)))
            self._values[key] = (now + (self._ttl if ttl is None else ttl), value)

    def forget(self, key: K) -> None:
        with self._lock:
            self._values.pop(key, None)

    def get_or_compute(self, key: K, compute: Callable[[], V], *, wait: float = 10.0,
                       ttl: Callable[[V], float] | None = None) -> V:
        """The cached answer, else ``compute()``'s, computed once however many threads ask.

        A thread that finds another computing the same key waits for it (at most
        ``wait`` seconds, then computes itself). ``ttl`` may choose a lifetime per
        answer (e.g. shorter for a negative one). Exceptions from ``compute`` are
        not cached: they reach the caller that computed, and waiters retry.
        """
        while True:
            with self._lock:
                hit = self._values.get(key)
                if hit is not None and hit[0] > self._clock():
                    return hit[1]
                waiting = self._pending.get(key)
                if waiting is None:
                    done = self._pending[key] = threading.Event()
                    break
            if not waiting.wait(timeout=wait):
                return compute()
        try:
            value = compute()
            self.put(key, value, ttl(value) if ttl is not None else None)
            return value
        finally:
            with self._lock:
                self._pending.pop(key, None)
            done.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
