"""The doctor's sshd checks: what sshd will do for root, the exempt users and a managed user.

Pure functions of ``sshd -T -C user=...`` output (``sshdconfig.parse_sshd_t``, gathered by
:mod:`.gather`), of the key entry directories and of limits.conf: every rule is a
unit test with made-up input. The keywords and their meaning are OpenSSH's
(``sshd_config(5)``, ``servconf.c``'s dump of ``sshd -T``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sshd_adopt._internal import authmethods
from sshd_adopt._internal.authmethods import PAM_SERVICE, ways_in_without_a_key
from sshd_adopt._internal.config import AdmissionSettings
from sshd_adopt._internal.doctor.checks import WRAPPER_NAME, Check, Status, ok


@dataclass(frozen=True)
class SshdView:
    """sshd's effective configuration for one user (``sshd -T -C user=...``), or why not."""

    user: str
    settings: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    def get(self, key: str) -> str:
        """The value of ``key``, or "none" as sshd prints unset settings."""
        return self.settings.get(key, "none")


def forced_wrapper(forcecommand: str) -> str | None:
    """The program a ForceCommand runs if it is an sshd-adopt wrapper, else None."""
    if forcecommand in ("", "none"):
        return None
    try:
        words = shlex.split(forcecommand)
    except ValueError:
        words = forcecommand.split()
    if words and os.path.basename(words[0]) == WRAPPER_NAME:
        return words[0]
    return None


def check_sshd_managed(view: SshdView, admission: AdmissionSettings) -> list[Check]:
    """A managed user: sshd must force the wrapper on her and admit her only by our rules.

    * ForceCommand runs the wrapper; ``PermitUserEnvironment no`` (else
      ``~/.ssh/environment`` feeds LD_PRELOAD or PATH to it);
    * her keys come only from the broker's entry (``AuthorizedKeysFile
      <keys_dir>/%u``, exactly) or, when the site's keys come from a command, from
      the gate alone (``AuthorizedKeysFile none``): a key file of her own would
      let her in without a job;
    * with a ``TrustedUserCAKeys``, certificates are accepted only through the
      principals entry (``AuthorizedPrincipalsFile <principals_dir>/%u``);
    * the AuthorizedKeysCommand is ``sshd-adopt-keys`` run as ``command_user``;
    * ``SetEnv SHLVL=1`` when refused users are told why: without it, bash reads
      their ``~/.bashrc`` before the wrapper says no.
    """
    name = f"sshd ({view.user})"
    if view.error is not None:
        return [Check(name, Status.FAIL, f"sshd -T failed: {view.error}",
                      "run as root; fix what sshd -t reports")]
    checks: list[Check] = []
    wrapper = forced_wrapper(view.get("forcecommand"))
    if wrapper is None:
        checks.append(Check(name, Status.FAIL,
                            f"ForceCommand is {view.get('forcecommand')!r}: {view.user}'s "
                            "sessions are not adopted",
                            "install the drop-in (scripts/install) and make its Match block "
                            f"cover {view.user}, then reload sshd"))
        return checks
    checks.append(ok(name, f"ForceCommand {view.get('forcecommand')}"))
    if view.get("permituserenvironment").lower() not in ("no", "none"):
        checks.append(Check(name, Status.WARN,
                            f"PermitUserEnvironment {view.get('permituserenvironment')}: "
                            "~/.ssh/environment can feed LD_PRELOAD/PATH to the wrapper",
                            "set PermitUserEnvironment no in the Match block"))
    files = view.get("authorizedkeysfile").split()
    entry = f"{admission.keys_dir}/%u"
    if admission.keys_command.strip():
        wanted, why = ["none"], "the keys come from admission.keys_command, through the gate"
    else:
        wanted, why = [entry], "only the broker's entry, which exists while the user may enter"
    if files != wanted:
        checks.append(Check(name, Status.FAIL,
                            f"AuthorizedKeysFile is {' '.join(files)!r}: a key there is accepted "
                            "whether or not the user has a job here",
                            f"AuthorizedKeysFile {' '.join(wanted)} in the drop-in's Match block "
                            f"({why})"))
    else:
        checks.append(ok(name, f"AuthorizedKeysFile {' '.join(files)}"))
    principals = f"{admission.principals_dir}/%u"
    if view.get("trustedusercakeys") != "none" and view.get(
            "authorizedprincipalsfile") != principals:
        checks.append(Check(name, Status.FAIL,
                            f"TrustedUserCAKeys is set but AuthorizedPrincipalsFile is "
                            f"{view.get('authorizedprincipalsfile')!r}: a CA-signed certificate "
                            "logs in without a job",
                            f"AuthorizedPrincipalsFile {principals} in the drop-in's Match block"))
    command = view.get("authorizedkeyscommand")
    if command == "none" or os.path.basename(command.split()[0]) != "sshd-adopt-keys":
        checks.append(Check(name, Status.WARN,
                            f"AuthorizedKeysCommand is {command!r}: a job that started a moment "
                            "ago, and refusals with a message, need sshd-adopt-keys",
                            "AuthorizedKeysCommand <prefix>/bin/sshd-adopt-keys %u"))
    elif view.get("authorizedkeyscommanduser") != admission.command_user:
        checks.append(Check(name, Status.FAIL,
                            f"AuthorizedKeysCommandUser is "
                            f"{view.get('authorizedkeyscommanduser')!r}, the broker answers only "
                            f"{admission.command_user!r}",
                            "make admission.command_user and the drop-in agree"))
    if admission.on_deny == "message" and "SHLVL=1" not in view.get("setenv").split():
        checks.append(Check(name, Status.FAIL,
                            "no SetEnv SHLVL=1: a refused bash user's ~/.bashrc runs before the "
                            "wrapper can say why",
                            "SetEnv SHLVL=1 in the drop-in's Match block (or "
                            "admission.on_deny = \"refuse\")"))
    return checks


def check_auth_methods(view: SshdView, present_file: str = "/run/sshd-adopt/present",
                       pam_text: str | None = None) -> Check | None:
    """How a managed user can authenticate, and what enforces admission for each way.

    A publickey login passes the broker's key entries or its gate before sshd accepts
    it, and a refused user is told why. Any other way in (hostbased, GSSAPI, password,
    keyboard-interactive) consults neither. With ``UsePAM yes`` and a PAM service for the
    user (``PAMServiceName`` on OpenSSH 9.8 and later, else ``sshd``) whose text
    (``pam_text``, read by the caller from /etc/pam.d) checks ``present_file``, sshd's
    account phase refuses a user without a job here before authentication succeeds
    (``pam.d/sshd-adopt``, or the gate block in ``/etc/pam.d/sshd``).
    Without it the broker alone enforces admission, right after authentication (a
    refused user's connection is ended at the post-authentication child's uid change,
    without a message; without the proc connector only at the sweeper's next scan).
    None when sshd could not be asked.
    """
    if view.error is not None:
        return None
    name = f"auth methods ({view.user})"
    ways = ways_in_without_a_key(view.settings)
    methods = view.get("authenticationmethods")
    if not ways:
        return ok(name, f"AuthenticationMethods {methods}: every login passes the key "
                  "entries or the gate, before sshd accepts it")
    service = authmethods.pam_service_of(view.settings)
    if service is not None:
        if pam_text is not None and authmethods.gate_in(pam_text, present_file):
            return ok(name, f"AuthenticationMethods {methods}: {', '.join(ways)} log in "
                      f"without a key; PAM service {service} refuses a user without a job "
                      f"here in sshd's account phase ({present_file}), before "
                      "authentication succeeds")
        if service == PAM_SERVICE or pam_text is None:
            return Check(name, Status.FAIL,
                         f"{', '.join(ways)} log in without a key, and PAM service {service!r} "
                         + ("does not exist" if pam_text is None else
                            f"does not check {present_file}")
                         + ": nothing refuses a user without a job before the session starts",
                         f"scripts/install --auth-methods ... installs /etc/pam.d/{PAM_SERVICE}")
    return Check(name, Status.WARN,
                 f"AuthenticationMethods {methods}: {', '.join(ways)} log in without a key; "
                 "admission is enforced right after authentication only: a refused user's "
                 "connection is ended at the post-authentication uid change (early "
                 "adoption; without the proc connector, at the sweeper's next scan), "
                 "with no message",
                 "AuthenticationMethods publickey in the drop-in's Match block, or OpenSSH "
                 "9.8 or later with scripts/install --auth-methods (its PAM gate)")


def check_entries(problems: Sequence[str], admitted: Iterable[str], keys_dir: str) -> Check:
    """The entry directories are root's alone (else anyone could plant an entry)."""
    if problems:
        return Check("key entries", Status.FAIL, "; ".join(problems),
                     "chown root:root and chmod 0755 each directory named (and the ones "
                     "above it); the broker refuses to start until then")
    users = sorted(admitted)
    shown = ", ".join(users[:10]) + (" …" if len(users) > 10 else "")
    return ok("key entries", f"{keys_dir}: root's alone; {len(users)} user(s) may enter"
               + (f" ({shown})" if users else ""))


def check_limits(usepam: str, lines: Sequence[str]) -> Check | None:
    """With ``UsePAM no`` nothing applies /etc/security/limits.conf to ssh sessions."""
    if usepam.lower() != "no" or not lines:
        return None
    return Check("limits.conf", Status.WARN,
                 f"UsePAM no, but limits.conf/limits.d set {len(lines)} limit(s) (e.g. "
                 f"{lines[0]!r}): they do not apply to ssh sessions (pam_limits never runs); "
                 "adopted sessions get the job's cgroup limits instead",
                 "set the limits in the job (slurm.conf, cgroup.conf), or in sshd's service "
                 "(LimitNOFILE=...) for everyone")


def check_sshd_exempt(view: SshdView) -> list[Check]:
    """Root and exempt users must never get the wrapper: a broken broker must not lock them out."""
    name = f"sshd ({view.user})"
    if view.error is not None:
        return [Check(name, Status.FAIL, f"sshd -T failed: {view.error}",
                      "run as root; fix what sshd -t reports")]
    wrapper = forced_wrapper(view.get("forcecommand"))
    if wrapper is not None:
        return [Check(name, Status.FAIL,
                      f"exempt user {view.user} gets ForceCommand {view.get('forcecommand')}",
                      "exclude admins and root from the drop-in's Match block "
                      "(e.g. Match Group slurmusers,!clusteradm)")]
    return [ok(name, "no sshd-adopt ForceCommand (exempt)")]
