"""Which authentication methods managed users may use, and what sshd must say for each.

Admission by key entries covers publickey (certificates included): sshd reads the entry
or asks the gate before it accepts a key. The shipped drop-in therefore lets managed users
in by publickey only. A site whose users hop between nodes by hostbased authentication
(``ssh-keysign``, ``shosts.equiv``) or log in with Kerberos tickets (GSSAPI) lets them use
those too (``scripts/install --auth-methods``); no key entry is consulted for such a login.
On OpenSSH 9.8 and later the drop-in then gives managed users a PAM service of their own
(``PAMServiceName``, allowed in ``Match`` since 9.8): its account phase, which sshd runs
for every method before it tells the client that authentication succeeded, lets through
only the users the broker lists as having a job here (``pam.d/sshd-adopt``,
``pam_listfile``). The broker also ends a refused user's connection right after
authentication (``services/holds.py``) -- the only enforcement on older OpenSSH, and
there a refused user's session may run for milliseconds.

Method names are OpenSSH's (``AuthenticationMethods`` in ``sshd_config(5)``); this module
has no dependencies, so ``scripts/install`` imports it before the venv exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

#: The PAM service of managed users under the keyless profile (/etc/pam.d/sshd-adopt).
PAM_SERVICE: Final = "sshd-adopt"
#: The first OpenSSH release that allows ``PAMServiceName`` in a ``Match`` block.
PAM_SERVICE_SINCE: Final = (9, 8)
#: The methods a managed user may be allowed, publickey always among them.
SUPPORTED: Final = ("publickey", "hostbased", "gssapi-with-mic")
#: The sshd switch of each method (``sshd -T`` prints the keywords in lower case).
SWITCHES: Final = {
    "publickey": "PubkeyAuthentication",
    "hostbased": "HostbasedAuthentication",
    "gssapi-with-mic": "GSSAPIAuthentication",
    "password": "PasswordAuthentication",
    "keyboard-interactive": "KbdInteractiveAuthentication",
}


def parse_methods(text: str) -> tuple[str, ...]:
    """``publickey,hostbased`` (commas or spaces) as a tuple in :data:`SUPPORTED` order,
    publickey always included. Raises ValueError naming an unknown method."""
    names = [name for name in re.split(r"[,\s]+", text.strip()) if name]
    unknown = [name for name in names if name not in SUPPORTED]
    if unknown:
        raise ValueError(f"unknown authentication method(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SUPPORTED)}")
    return tuple(name for name in SUPPORTED if name == "publickey" or name in names)


def openssh_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``sshd -V``'s ``OpenSSH_10.0p2 Debian-7, OpenSSL ...``."""
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def keyless(methods: Sequence[str]) -> bool:
    """Whether ``methods`` let a managed user in without a key."""
    return any(method != "publickey" for method in methods)


def dropin_with_methods(text: str, methods: Sequence[str], *,
                        pam_service: str | None = None) -> str:
    """The drop-in ``text`` letting managed users in by ``methods`` (any one of them).

    Rewrites the ``AuthenticationMethods`` line and the hostbased and GSSAPI switches in
    its ``Match`` block; everything else is kept byte for byte. With ``pam_service`` and a
    method without a key, the Match block also names that PAM service and ``UsePAM yes``
    goes before it (the service's account phase is the gate). Raises ValueError when a
    line to rewrite is missing (a drop-in edited by hand: change it by hand too).
    """
    wanted = {
        "AuthenticationMethods": " ".join(methods),
        "HostbasedAuthentication": "yes" if "hostbased" in methods else "no",
        "GSSAPIAuthentication": "yes" if "gssapi-with-mic" in methods else "no",
    }
    for keyword, value in wanted.items():
        pattern = re.compile(rf"^(\s+){keyword}\s+\S.*$", re.MULTILINE)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"expected one indented '{keyword}' line in the drop-in's Match "
                             "block")
        text = pattern.sub(rf"\g<1>{keyword} {value}", text)
    if pam_service and keyless(methods):
        text = re.sub(r"^(\s+)(AuthenticationMethods .*)$",
                      rf"\g<1>\g<2>\n\g<1># Their account phase admits only users with a "
                      rf"job here (/etc/pam.d/{pam_service}).\n\g<1>PAMServiceName {pam_service}",
                      text, count=1, flags=re.MULTILINE)
        text = re.sub(r"^(Match )", "# The keyless methods' gate is a PAM account check.\n"
                      "UsePAM yes\n\\1", text, count=1, flags=re.MULTILINE)
    return text


def ways_in_without_a_key(settings: Mapping[str, str]) -> list[str]:
    """The ways a login completes without publickey, as ``AuthenticationMethods`` names
    them, given one user's ``sshd -T`` settings (lower-case keywords).

    With ``AuthenticationMethods any`` each enabled method is a way in by itself; with
    lists, a list that names no publickey step is one (when every method in it is on).
    """
    def enabled(method: str) -> bool:
        switch = SWITCHES.get(method.split(":", 1)[0])
        return switch is None or settings.get(switch.lower(), "no").lower() == "yes"

    methods = settings.get("authenticationmethods", "any")
    if methods.lower() in ("any", "none", ""):
        return [m for m in SWITCHES if m != "publickey" and enabled(m)]
    ways = []
    for chain in methods.split():
        steps = chain.split(",")
        if all(enabled(step) for step in steps) and not any(
                step.split(":", 1)[0] == "publickey" for step in steps):
            ways.append(chain)
    return ways
