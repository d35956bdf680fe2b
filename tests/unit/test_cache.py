"""TtlCache: expiry on an injected clock, the memory bound, forget, and single flight.

The broker caches slow answers (callerid, ``sshd -T``, NSS) in :class:`TtlCache`.
An answer must stop being used when it expires, a burst of distinct keys must not
grow the root daemon's memory, and threads asking the same key at once must cause one
computation, without a failure or a hung computation blocking the others for good.
The threaded tests wait on events; their only timing is short join bounds.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest

from sshd_adopt._internal.cache import TtlCache


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_answer_is_kept_until_its_ttl_and_not_a_moment_longer() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(10.0, clock=clock)
    cache.put("alice", 2001)
    clock.now += 9.999
    assert cache.get("alice") == 2001
    clock.now += 0.001
    assert cache.get("alice") is None


def test_put_may_choose_its_own_ttl() -> None:
    clock = Clock()
    cache: TtlCache[str, int | None] = TtlCache(30.0, clock=clock)
    cache.put("ghost", None, ttl=2.0)
    cache.put("alice", 2001)
    clock.now += 2.0
    assert cache.get("ghost") is None
    assert cache.get("alice") == 2001


def test_unknown_key_is_a_miss() -> None:
    cache: TtlCache[str, int] = TtlCache(10.0, clock=Clock())
    assert cache.get("nobody") is None


def test_get_or_compute_reuses_the_answer_until_it_expires() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(5.0, clock=clock)
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    assert cache.get_or_compute("k", compute) == 1
    clock.now += 4.0
    assert cache.get_or_compute("k", compute) == 1
    assert len(calls) == 1
    clock.now += 1.0
    assert cache.get_or_compute("k", compute) == 2
    assert len(calls) == 2


def test_get_or_compute_ttl_per_answer() -> None:
    """A negative answer (None) may be kept shorter than a positive one."""
    clock = Clock()
    cache: TtlCache[str, int | None] = TtlCache(30.0, clock=clock)
    answers: dict[str, int | None] = {"alice": 2001, "ghost": None}
    calls: list[str] = []

    def lookup(name: str) -> int | None:
        calls.append(name)
        return answers[name]

    def ttl(value: int | None) -> float:
        return 2.0 if value is None else 30.0

    for name in ("alice", "ghost"):
        cache.get_or_compute(name, functools.partial(lookup, name), ttl=ttl)
    answers["ghost"] = 2005  # the directory service learns the user
    clock.now += 2.0
    assert cache.get_or_compute("ghost", lambda: lookup("ghost"), ttl=ttl) == 2005
    assert cache.get_or_compute("alice", lambda: lookup("alice"), ttl=ttl) == 2001
    assert calls == ["alice", "ghost", "ghost"]


def test_forget_drops_one_key() -> None:
    cache: TtlCache[str, int] = TtlCache(10.0, clock=Clock())
    cache.put("a", 1)
    cache.put("b", 2)
    cache.forget("a")
    cache.forget("never-there")  # no error
    assert cache.get("a") is None
    assert cache.get("b") == 2
    assert cache.get_or_compute("a", lambda: 10) == 10


def test_full_cache_drops_expired_entries_first() -> None:
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(10.0, max_entries=3, clock=clock)
    cache.put(1, 1, ttl=1.0)
    cache.put(2, 2)
    cache.put(3, 3)
    clock.now += 1.0  # 1 has expired
    cache.put(4, 4)
    assert len(cache) == 3
    assert [cache.get(k) for k in (2, 3, 4)] == [2, 3, 4]


def test_full_cache_of_live_entries_is_emptied_not_grown() -> None:
    """A burst of distinct keys must not grow memory past max_entries."""
    cache: TtlCache[int, int] = TtlCache(10.0, max_entries=3, clock=Clock())
    for key in range(3):
        cache.put(key, key)
    cache.put(99, 99)
    assert len(cache) == 1
    assert cache.get(99) == 99
    assert cache.get(0) is None


def test_burst_of_keys_stays_within_the_bound() -> None:
    cache: TtlCache[int, int] = TtlCache(10.0, max_entries=8, clock=Clock())
    for key in range(1000):
        cache.get_or_compute(key, functools.partial(int, key))
        assert len(cache) <= 8


def test_updating_a_key_of_a_full_cache_evicts_nothing() -> None:
    cache: TtlCache[int, int] = TtlCache(10.0, max_entries=3, clock=Clock())
    for key in range(3):
        cache.put(key, key)
    cache.put(1, 100)
    assert [cache.get(k) for k in range(3)] == [0, 100, 2]


# -- single flight ---------------------------------------------------------------------


class Slow:
    """A computation that blocks until released, counting its calls."""

    def __init__(self, result: int = 42, *, fail_first: bool = False) -> None:
        self.result = result
        self.fail_first = fail_first
        self.calls = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            self.calls += 1
            number = self.calls
        if number == 1:
            self.started.set()
            if not self.release.wait(5.0):
                raise AssertionError("never released")
            if self.fail_first:
                raise RuntimeError("sssd is down")
        return self.result + number - 1  # 42 for the first call, 43 for the second


def run_in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``target()`` in a thread; its result or exception lands in the list."""
    results: list[object] = []

    def body() -> None:
        try:
            results.append(target())
        except Exception as err:
            results.append(err)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, results


def wait_until_waiting(thread: threading.Thread) -> None:
    """Give ``thread`` a moment to reach the cache's wait (it cannot be observed directly)."""
    time.sleep(0.05)
    assert thread.is_alive()


def test_two_threads_asking_the_same_key_compute_once() -> None:
    cache: TtlCache[str, int] = TtlCache(10.0)
    slow = Slow()
    first, first_result = run_in_thread(lambda: cache.get_or_compute("k", slow))
    assert slow.started.wait(2.0)
    second, second_result = run_in_thread(lambda: cache.get_or_compute("k", slow))
    wait_until_waiting(second)
    slow.release.set()
    first.join(2.0)
    second.join(2.0)
    assert first_result == [42]
    assert second_result == [42]
    assert slow.calls == 1


def test_other_keys_are_not_held_up_by_a_computation() -> None:
    cache: TtlCache[str, int] = TtlCache(10.0)
    slow = Slow()
    first, _ = run_in_thread(lambda: cache.get_or_compute("slow", slow))
    assert slow.started.wait(2.0)
    try:
        assert cache.get_or_compute("fast", lambda: 7) == 7
    finally:
        slow.release.set()
        first.join(2.0)


def test_failing_compute_reaches_its_caller_and_is_not_cached() -> None:
    cache: TtlCache[str, int] = TtlCache(10.0)

    def broken() -> int:
        raise RuntimeError("sssd is down")

    with pytest.raises(RuntimeError, match="sssd is down"):
        cache.get_or_compute("k", broken)
    assert cache.get("k") is None
    assert len(cache) == 0
    retry, result = run_in_thread(lambda: cache.get_or_compute("k", lambda: 5))
    retry.join(1.0)
    assert not retry.is_alive(), "the failed computation left the key stuck"
    assert result == [5]


def test_waiter_retries_when_the_computing_thread_fails() -> None:
    """The waiter does not inherit the failure: it computes the answer itself."""
    cache: TtlCache[str, int] = TtlCache(10.0)
    slow = Slow(fail_first=True)
    first, first_result = run_in_thread(lambda: cache.get_or_compute("k", slow))
    assert slow.started.wait(2.0)
    second, second_result = run_in_thread(lambda: cache.get_or_compute("k", slow))
    wait_until_waiting(second)
    slow.release.set()
    first.join(2.0)
    second.join(2.0)
    assert len(first_result) == 1 and isinstance(first_result[0], RuntimeError)
    assert second_result == [43]  # the second computation's answer
    assert slow.calls == 2
    assert cache.get("k") == 43


def test_waiter_gives_up_after_the_wait_bound_and_computes_itself() -> None:
    """A hung computation holds others up for ``wait`` seconds, not for good."""
    cache: TtlCache[str, int] = TtlCache(10.0)
    slow = Slow()
    first, first_result = run_in_thread(lambda: cache.get_or_compute("k", slow))
    assert slow.started.wait(2.0)
    try:
        began = time.monotonic()
        second, second_result = run_in_thread(
            lambda: cache.get_or_compute("k", slow, wait=0.1))
        second.join(1.0)
        elapsed = time.monotonic() - began
        assert not second.is_alive(), "the waiter did not give up after wait=0.1"
        assert second_result == [43]
        assert 0.09 <= elapsed < 1.0
        assert slow.calls == 2
    finally:
        slow.release.set()
        first.join(2.0)
    assert first_result == [42]


def test_a_cache_keyed_by_connection_holds_what_is_live_not_its_bound() -> None:
    """One entry per login, each good for 5 s, a login a second: the cache must hold a
    few dozen entries (its purge threshold), not thousands of dead answers."""
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(5.0, max_entries=4096, clock=clock)
    for login in range(10_000):
        cache.put(login, login)
        clock.now += 1.0
        assert len(cache) <= 64 + 1
    assert cache.get(9_999) == 9_999


def test_a_purge_keeps_the_live_entries() -> None:
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(1000.0, max_entries=4096, clock=clock)
    for key in range(200):
        cache.put(key, key)
    assert len(cache) == 200  # all live: purges dropped nothing
    assert [cache.get(k) for k in (0, 63, 64, 199)] == [0, 63, 64, 199]
