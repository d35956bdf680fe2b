"""Who is managed, as sshd itself says it: ``sshd -T -C`` for one connection.

sshd's ``Match`` blocks decide whether a connection goes through sshd-adopt (its
ForceCommand is our wrapper, its keys come from our entries or gate). The broker never
keeps a second definition of that set: where it must judge a connection sshd did not
send to it (early adoption, the sweeper), it asks the very sshd that accepted the
connection: the listener's own executable, with the configuration arguments the
listener was started with (``-f``, ``-o``, ``-h``), and the connection's user and
addresses as the ``Match`` criteria (``-C user=,addr=,host=,laddr=,lport=``). Managed
means the effective ``ForceCommand`` runs ``sshd-adopt``. The same answer tells which
ways in need no key (hostbased, GSSAPI...: :mod:`sshd_adopt._internal.authmethods`),
and whether the user's PAM service gates them (its account phase checks the broker's
present list): where it does not, a refused user who may come in that way is ended
right after authentication.

``sshd -T`` costs 10-17 ms (it parses the configuration and loads the host keys), so
answers are cached per listener, user and addresses for :data:`TTL` seconds, and asked
once however many logins of a burst want them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal import run
from sshd_adopt._internal.authmethods import (
    gate_in,
    pam_service_of,
    pam_service_text,
    ways_in_without_a_key,
)
from sshd_adopt._internal.cache import TtlCache
from sshd_adopt._internal.core.connection import Connection
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.node.procfs import ProcInfo

#: Seconds an answer is reused (an sshd reload takes effect within this).
TTL: Final = 60.0
#: Where PAM services are configured (pam.conf(5)).
PAM_DIR: Final = "/etc/pam.d"
#: Bound on one ``sshd -T`` run, in seconds.
TIMEOUT: Final = 5.0
#: The wrapper's command name: a ForceCommand running it means "managed".
WRAPPER: Final = "sshd-adopt"
#: Listener options that change the effective configuration, with an argument.
_CONFIG_OPTIONS: Final = frozenset({"-f", "-o", "-h", "-c"})


@dataclass(frozen=True)
class SshdConfigError(Exception):
    """``sshd -T`` could not answer (the caller decides what that means)."""

    reason: str


def listener_arguments(listener: ProcInfo) -> list[str] | None:
    """The configuration arguments a listener was started with, from its title.

    sshd titles its listener ``sshd: <its argv> [listener] N of A-B-C startups``;
    the words between ``sshd:`` and ``[listener]`` are its command line.
    """
    words = list(listener.cmdline)
    if len(words) == 1:
        words = words[0].split()
    words = [word for word in words if word]
    if not words or words[0] not in ("sshd:",) or "[listener]" not in words:
        return None
    argv = words[1:words.index("[listener]")]
    kept: list[str] = []
    index = 1
    while index < len(argv):
        word = argv[index]
        if word in _CONFIG_OPTIONS and index + 1 < len(argv):
            kept += [word, argv[index + 1]]
            index += 2
            continue
        if len(word) > 2 and word[:2] in _CONFIG_OPTIONS:
            kept.append(word)
        index += 1
    return kept


def forced_command(text: str) -> str:
    """The ``forcecommand`` value in ``sshd -T`` output ("" when there is none)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "forcecommand":
            return value.strip()
    return ""


def runs_wrapper(command: str) -> bool:
    """Whether a ForceCommand runs the sshd-adopt wrapper."""
    first = command.split(maxsplit=1)[0] if command.split() else ""
    return first not in ("", "none") and os.path.basename(first) == WRAPPER


def parse_sshd_t(text: str) -> dict[str, str]:
    """``sshd -T`` output as {lower-case keyword: value}; repeated keywords are joined by \\n.

    ``sshd -T`` prints one ``keyword value`` per line, keywords already in
    lower case; multi-valued ones (listenaddress, hostkey) repeat the keyword.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        key = key.lower()
        values[key] = f"{values[key]}\n{value}" if key in values else value
    return values


@dataclass(frozen=True)
class SshdAnswer:
    """What sshd says of one connection: whether it runs the wrapper, and the ways in
    that need no key (``AuthenticationMethods`` names; empty with the shipped drop-in)."""

    managed: bool
    keyless: tuple[str, ...] = ()
    #: The user's PAM service refuses users without a job here in sshd's account phase.
    gated: bool = False


class ManagedQuery:
    """``managed(listener, user, connection)``, asked of sshd and cached (thread-safe)."""

    def __init__(self, ttl: float = TTL, present_file: Callable[[], str] | None = None,
                 pam_dir: str = PAM_DIR) -> None:
        self._answers: TtlCache[tuple[int, float, str, str, str, int], SshdAnswer] = \
            TtlCache(ttl)
        self._present_file = present_file
        self._pam_dir = pam_dir

    def managed(self, listener: ProcInfo, user: str, connection: Connection | None) -> bool:
        """True when sshd sends this connection through sshd-adopt.

        Raises :class:`SshdConfigError` when sshd cannot be asked (the listener's
        arguments cannot be read, ``sshd -T`` fails or hangs).
        """
        return self.query(listener, user, connection).managed

    def keyless(self, listener: ProcInfo, user: str,
                connection: Connection | None) -> tuple[str, ...]:
        """The ways this user may log in through this listener without a key (hostbased,
        gssapi-with-mic...): logins that never met the key entries or the gate.

        Raises :class:`SshdConfigError` as :meth:`managed` does.
        """
        return self.query(listener, user, connection).keyless

    def query(self, listener: ProcInfo, user: str,
              connection: Connection | None) -> SshdAnswer:
        """sshd's answer for this connection (cached for :data:`TTL` seconds)."""
        addr = str(connection.remote_ip) if connection else ""
        laddr = str(connection.local_ip) if connection else ""
        lport = connection.local_port if connection else 0
        key = (listener.pid, listener.start_time, user, addr, laddr, lport)
        return self._answers.get_or_compute(
            key, lambda: self._ask(listener, user, addr, laddr, lport), wait=TIMEOUT + 1)

    def _gated(self, settings: dict[str, str]) -> bool:
        """Whether the user's PAM service checks the present list (its file, first 64 KiB,
        in /etc/pam.d: sshd reads it there too)."""
        text = pam_service_text(pam_service_of(settings), self._pam_dir)
        return text is not None and self._present_file is not None \
            and gate_in(text, self._present_file())

    def _ask(self, listener: ProcInfo, user: str, addr: str, laddr: str,
             lport: int) -> SshdAnswer:
        arguments = listener_arguments(listener)
        if arguments is None or listener.exe is None:
            raise SshdConfigError(f"listener {listener.pid}: cannot read its arguments "
                                  f"from {listener.title!r}")
        spec = [f"user={user}"]
        if addr:
            spec += [f"addr={addr}", f"host={addr}"]
        if laddr:
            spec += [f"laddr={laddr}", f"lport={lport}"]
        argv: Sequence[str] = [listener.exe.removesuffix(" (deleted)"), "-T", *arguments,
                               "-C", ",".join(spec)]
        try:
            done = run.run(argv, timeout=TIMEOUT)
        except run.ToolError as err:
            raise SshdConfigError(str(err)) from err
        if done.returncode != 0:
            raise SshdConfigError(f"{' '.join(argv)}: {done.problem()}")
        text = done.text()
        settings = parse_sshd_t(text)
        keyless = tuple(ways_in_without_a_key(settings))
        answer = SshdAnswer(runs_wrapper(forced_command(text)), keyless,
                            gated=bool(keyless) and self._gated(settings))
        logger().debug("sshd -T for %s from %s: %s%s%s", user, addr or "?",
                       "managed" if answer.managed else "not managed",
                       f", in without a key by {' '.join(answer.keyless)}"
                       if answer.keyless else "",
                       " (PAM gate)" if answer.gated else "")
        return answer
