"""Which authenticated connections the watcher holds still until they are decided."""

from __future__ import annotations

from sshd_adopt._internal.services.holds import MAX_REMEMBERED, VERDICT_TTL, Holds

ALICE, SSHD = 2001, 100  # the user, and the privilege-separation user


def test_a_keyless_answer_holds_that_users_child_and_later_ones_of_its_listener() -> None:
    holds = Holds()
    holds.checking(10, ALICE)
    assert not holds.should_hold(10, 1, ALICE)  # the answer is not in yet: not held
    holds.checked(10, 1, keyless=True)
    assert holds.should_hold(10, 1, ALICE)
    holds.checking(11, ALICE)
    holds.checked(11, 1, keyless=False)  # this user needs a key, but the listener...
    assert holds.should_hold(11, 1, ALICE)
    assert not holds.should_hold(12, 2, ALICE)  # no key check seen: never held


def test_an_unknown_answer_holds_that_connection_only() -> None:
    holds = Holds()
    holds.checking(10, ALICE, 1)
    holds.checked(10, 1, keyless=True, known=False)
    assert holds.should_hold(10, 1, ALICE)
    holds.checking(11, ALICE, 1)
    holds.checked(11, 1, keyless=False)
    assert not holds.should_hold(11, 1, ALICE)  # the listener was not flagged


def test_the_pre_authentication_child_is_never_held() -> None:
    """It takes the privilege-separation user's uid; a stop and continue can kill it (its
    seccomp filter has no restart_syscall)."""
    holds = Holds()
    holds.checking(10, ALICE)
    holds.checked(10, 1, keyless=True)
    assert not holds.should_hold(10, 1, SSHD)


def test_a_keyed_answer_holds_nothing() -> None:
    holds = Holds()
    holds.checking(10, ALICE)
    holds.checked(10, 1, keyless=False)
    assert not holds.should_hold(10, 1, ALICE)
    holds.forget(10)
    assert not holds.should_hold(10, 1, ALICE)


def test_memory_is_bounded() -> None:
    holds = Holds()
    for monitor in range(MAX_REMEMBERED + 10):
        holds.checking(monitor, ALICE)
        holds.checked(monitor, 1, keyless=True)
    assert not holds.should_hold(MAX_REMEMBERED + 5, 2, ALICE)  # not remembered
    assert holds.should_hold(5, 2, ALICE)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_refusal_dooms_the_users_next_attempt_at_its_key_check() -> None:
    """The key check runs on a worker and may finish after authentication: the same user's
    next attempt on the same listener is doomed on the watcher thread, at once."""
    clock = Clock()
    holds = Holds(clock)
    holds.checking(10, ALICE, 1)
    assert holds.doomed(10) is None
    holds.doom(10, "no jobs", 1)
    holds.checking(11, ALICE, 1)
    assert holds.doomed(11) == "no jobs"
    holds.checking(12, ALICE, 2)  # another listener: its own answer
    assert holds.doomed(12) is None
    clock.now += VERDICT_TTL
    holds.checking(13, ALICE, 1)
    assert holds.doomed(13) is None


def test_a_refusal_is_forgotten_when_the_users_jobs_change() -> None:
    holds = Holds(Clock())
    holds.checking(10, ALICE, 1)
    holds.doom(10, "no jobs", 1)
    holds.jobs_changed(ALICE)
    holds.checking(11, ALICE, 1)
    assert holds.doomed(11) is None


def test_a_monitor_is_stopped_at_authentication_until_its_key_check_answers() -> None:
    """The first attempt: authentication completed before sshd -T answered, on a listener
    that admits keyless logins. The monitor waits; the answer's caller continues or kills."""
    stopped: list[int] = []
    holds = Holds(Clock(), stop=Recorder(stopped))
    holds.checking(1, ALICE, 7)
    holds.checked(1, 7, keyless=True)  # an earlier login flagged the listener
    holds.checking(10, ALICE, 7)
    assert holds.stop_if_awaiting(10, 7) and stopped == [10]
    assert holds.checked(10, 7, keyless=True)  # the caller must now act
    assert not holds.checked(10, 7, keyless=True)  # once


def test_no_stop_when_answered_or_the_listener_admits_no_keyless_login() -> None:
    stopped: list[int] = []
    holds = Holds(Clock(), stop=Recorder(stopped))
    holds.checking(10, ALICE, 7)
    assert not holds.stop_if_awaiting(10, 7)  # listener not flagged
    holds.checked(10, 7, keyless=True)
    holds.checking(11, ALICE, 7)
    holds.checked(11, 7, keyless=False)
    assert not holds.stop_if_awaiting(11, 7)  # answered already
    assert stopped == []


class Recorder:
    """A stand-in for SIGSTOP that records the pids."""

    def __init__(self, into: list[int]) -> None:
        self.into = into

    def __call__(self, pid: int) -> bool:
        self.into.append(pid)
        return True
