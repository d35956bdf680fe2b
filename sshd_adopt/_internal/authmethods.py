"""Which authentication methods managed users may use, and what sshd must say for each.

Admission by key entries covers publickey (certificates included): sshd reads the entry
or asks the gate before it accepts a key. The shipped drop-in therefore lets managed users
in by publickey only. A site whose users hop between nodes by hostbased authentication
(``ssh-keysign``, ``shosts.equiv``) or log in with Kerberos tickets (GSSAPI) lets them use
those too (``scripts/install --auth-methods``); no key entry is consulted for such a login.
The gate is then sshd's PAM account phase, which sshd runs for every method before it
tells the client that authentication succeeded: it lets through only the users the broker
lists as having a job here (``pam_listfile``). On OpenSSH 9.8 and later managed users get
a PAM service of their own (``PAMServiceName`` in the drop-in's ``Match`` block,
``pam.d/sshd-adopt``); before 9.8 a marked block at the top of the account phase of
``/etc/pam.d/sshd`` does it for the users the drop-in's ``Match Group`` line manages
(:func:`pam_gate_block`). Where there is no gate, the broker ends a refused user's
connection right after authentication (``services/holds.py``): a race it usually wins,
not a boundary.

Method names are OpenSSH's (``AuthenticationMethods`` in ``sshd_config(5)``); this module
has no dependencies, so ``scripts/install`` imports it before the venv exists.
"""

from __future__ import annotations

import os
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
    goes before it (the service's account phase is the gate); ``pam_service="sshd"``
    (the default service, whose file then holds the gate: OpenSSH before 9.8) adds only
    ``UsePAM yes``. Raises ValueError when a line to rewrite is missing (a drop-in edited
    by hand: change it by hand too).
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
    if pam_service and pam_service != "sshd" and keyless(methods):
        text = re.sub(r"^(\s+)(AuthenticationMethods .*)$",
                      rf"\g<1>\g<2>\n\g<1># Their account phase admits only users with a "
                      rf"job here (/etc/pam.d/{pam_service}).\n\g<1>PAMServiceName {pam_service}",
                      text, count=1, flags=re.MULTILINE)
    if pam_service and keyless(methods):
        text = re.sub(r"^(Match )", "# The keyless methods' gate is a PAM account check.\n"
                      "UsePAM yes\n\\1", text, count=1, flags=re.MULTILINE)
    return text


#: The lines that enclose the gate in /etc/pam.d/sshd (OpenSSH before 9.8).
GATE_BEGIN: Final = "# BEGIN sshd-adopt gate"
GATE_END: Final = "# END sshd-adopt gate"
#: What a refused user reads (pam_echo; as the wrapper's message for no jobs).
GATE_MESSAGE: Final = "Access denied by sshd-adopt: you have no active jobs on this node"


def match_groups(dropin: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The groups of the drop-in's ``Match Group a,b,!c`` line: (managed, excluded);
    None when its Match line is anything else (the gate cannot mirror it)."""
    found = re.findall(r"^Match\s+(.*)$", dropin, re.MULTILINE)
    if len(found) != 1:
        return None
    words = found[0].split()
    if len(words) != 2 or words[0].lower() != "group":
        return None
    names = words[1].split(",")
    plain = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
    managed = tuple(n for n in names if not n.startswith("!"))
    excluded = tuple(n[1:] for n in names if n.startswith("!"))
    if not managed or not all(plain.fullmatch(n) for n in (*managed, *excluded)):
        return None
    return managed, excluded


def pam_gate_block(managed: Sequence[str], excluded: Sequence[str], present_file: str) -> str:
    """The account lines that refuse a managed user without a job here, for the top of
    /etc/pam.d/sshd: users in none of ``managed``, or in one of ``excluded``, skip them
    (as the drop-in's Match block leaves them alone)."""
    gate = [
        f"account [success=2 default=ignore] pam_listfile.so item=user sense=allow "
        f"file={present_file} onerr=fail",
        f"account required pam_echo.so {GATE_MESSAGE}",
        "account requisite pam_deny.so",
    ]
    if excluded:
        gate.insert(0, f"account [success={len(gate)} default=ignore] pam_succeed_if.so "
                       f"quiet user ingroup {':'.join(excluded)}")
    gate.insert(0, f"account [success={len(gate)} default=ignore] pam_succeed_if.so quiet "
                   f"user notingroup {':'.join(managed)}")
    groups = ",".join((*managed, *(f"!{n}" for n in excluded)))
    return "\n".join([
        GATE_BEGIN + " (scripts/install --auth-methods; OpenSSH before 9.8)",
        f"# Users the drop-in manages (Match Group {groups}) log in only with a job here,",
        "# whatever the method: sshd runs the account phase before authentication succeeds.",
        *gate, GATE_END, ""])


def with_pam_gate(pam_text: str, block: str) -> str:
    """``pam_text`` (/etc/pam.d/sshd) with ``block`` as its first account lines (an earlier
    block replaced). Raises ValueError when the file has no account line."""
    text = without_pam_gate(pam_text)
    found = re.search(r"^(account\s|@include\s+common-account)", text, re.MULTILINE)
    if found is None:
        raise ValueError("no account line (nor @include common-account) to put the gate before")
    return text[:found.start()] + block + text[found.start():]


def sshd_pam_with_gate(pam_text: str, dropin: str, present_file: str) -> str:
    """``pam_text`` (/etc/pam.d/sshd) gating the users the drop-in's ``Match Group`` line
    manages (OpenSSH before 9.8). Raises ValueError when that line cannot be mirrored
    (:func:`match_groups`) or the file has no account line."""
    groups = match_groups(dropin)
    if groups is None:
        raise ValueError("the drop-in's Match line is not a plain 'Match Group' line")
    return with_pam_gate(pam_text, pam_gate_block(*groups, present_file))


def without_pam_gate(pam_text: str) -> str:
    """``pam_text`` without the gate block."""
    return re.sub(rf"^{re.escape(GATE_BEGIN)}.*?^{re.escape(GATE_END)}\n", "", pam_text,
                  flags=re.MULTILINE | re.DOTALL)


def pam_service_of(settings: Mapping[str, str]) -> str | None:
    """The PAM service sshd uses for one user, given their ``sshd -T`` settings (None:
    ``UsePAM no``). OpenSSH before 9.8 prints no ``pamservicename``: its service is
    ``sshd``."""
    if settings.get("usepam", "no").lower() != "yes":
        return None
    service = settings.get("pamservicename", "")
    return "sshd" if service in ("", "none") else service


def pam_service_text(service: str | None, pam_dir: str = "/etc/pam.d") -> str | None:
    """A PAM service's configuration file (its first 64 KiB), None when there is none or it
    cannot be read."""
    if not service or "/" in service:
        return None
    try:
        with open(os.path.join(pam_dir, service), encoding="utf-8", errors="replace") as f:
            return f.read(65536)
    except OSError:
        return None


def gate_in(pam_text: str, present_file: str) -> bool:
    """Whether a PAM service's text checks the broker's present list in its account
    phase (``pam_listfile`` over ``present_file``)."""
    return re.search(rf"^\s*account\s.*pam_listfile\.so\s.*file={re.escape(present_file)}"
                     r"(\s|$)", pam_text, re.MULTILINE) is not None


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
