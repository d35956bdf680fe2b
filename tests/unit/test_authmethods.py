"""The authentication methods managed users may use: the drop-in rewrite scripts/install does."""

from __future__ import annotations

import pytest

from sshd_adopt._internal.authmethods import (
    GATE_BEGIN,
    GATE_END,
    GATE_MESSAGE,
    dropin_with_methods,
    match_groups,
    openssh_version,
    pam_gate_block,
    parse_methods,
    sshd_pam_with_gate,
    with_pam_gate,
    without_pam_gate,
)
from tests.harness import REPO

SHIPPED = (REPO / "sshd_config.d" / "sshd-adopt.conf").read_text()


def test_parse_methods_keeps_publickey_and_orders() -> None:
    assert parse_methods("hostbased") == ("publickey", "hostbased")
    assert parse_methods("gssapi-with-mic, hostbased publickey") == (
        "publickey", "hostbased", "gssapi-with-mic")
    assert parse_methods("") == ("publickey",)


def test_parse_methods_names_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="password"):
        parse_methods("publickey,password")


def test_the_shipped_dropin_is_publickey_only_and_rewritten_in_three_lines() -> None:
    assert dropin_with_methods(SHIPPED, ("publickey",)) == SHIPPED
    text = dropin_with_methods(SHIPPED, ("publickey", "hostbased", "gssapi-with-mic"))
    changed = [(a, b) for a, b in zip(SHIPPED.splitlines(), text.splitlines(), strict=True)
               if a != b]
    assert [b.strip() for _a, b in changed] == [
        "AuthenticationMethods publickey hostbased gssapi-with-mic",
        "HostbasedAuthentication yes", "GSSAPIAuthentication yes"]
    only_hostbased = dropin_with_methods(SHIPPED, ("publickey", "hostbased"))
    assert "    GSSAPIAuthentication no\n" in only_hostbased
    assert "    AuthenticationMethods publickey hostbased\n" in only_hostbased


def test_a_dropin_without_the_lines_is_refused() -> None:
    with pytest.raises(ValueError, match="HostbasedAuthentication"):
        dropin_with_methods(SHIPPED.replace("    HostbasedAuthentication no\n", ""),
                            ("publickey", "hostbased"))


def test_the_keyless_profile_names_the_pam_service_and_turns_pam_on() -> None:
    """OpenSSH 9.8 and later: the Match block takes PAMServiceName; UsePAM goes before it."""
    text = dropin_with_methods(SHIPPED, ("publickey", "hostbased"), pam_service="sshd-adopt")
    before, match = text.split("\nMatch ", 1)
    assert before.endswith("\nUsePAM yes")
    assert "\n    AuthenticationMethods publickey hostbased\n" in match
    assert "\n    PAMServiceName sshd-adopt\n" in match
    assert text.count("PAMServiceName sshd-adopt") == 1


def test_publickey_only_needs_no_pam_service() -> None:
    text = dropin_with_methods(SHIPPED, ("publickey",), pam_service="sshd-adopt")
    assert "PAMServiceName" not in text and "UsePAM yes" not in text


@pytest.mark.parametrize("text, version", [
    ("OpenSSH_10.0p2 Debian-7+deb13u4, OpenSSL 3.5.9 29 Sep 2026", (10, 0)),
    ("OpenSSH_9.2, OpenSSL 3.0.19 27 Jan 2026", (9, 2)),
    ("unknown option -- V", None),
])
def test_openssh_version_from_sshd_minus_v(text: str, version: tuple[int, int] | None) -> None:
    assert openssh_version(text) == version


DEBIAN_SSHD_PAM = """# PAM configuration for the Secure Shell service
@include common-auth
account    required     pam_nologin.so
@include common-account
session    required     pam_loginuid.so
@include common-session
"""


def test_the_shipped_match_line_gives_the_managed_and_excluded_groups() -> None:
    assert match_groups(SHIPPED) == (("slurmusers",), ("clusteradm",))


@pytest.mark.parametrize("line", ["Match User alice,bob",
                                  "Match Group slurmusers Address 10.0.0.0/8",
                                  "Match Group !clusteradm", "Match Group a;b"])
def test_a_match_line_the_gate_cannot_mirror_gives_nothing(line: str) -> None:
    assert match_groups(SHIPPED.replace("Match Group slurmusers,!clusteradm", line)) is None


def test_the_gate_block_skips_unmanaged_and_excluded_users_and_refuses_the_rest() -> None:
    """Each ``success=N`` must land right after pam_deny (PAM counts lines)."""
    block = pam_gate_block(("slurmusers", "hpc"), ("clusteradm",), "/run/sshd-adopt/present")
    lines = [line for line in block.splitlines() if line.startswith("account")]
    assert lines[0].startswith("account [success=4 default=ignore] pam_succeed_if.so quiet "
                               "user notingroup slurmusers:hpc")
    assert lines[1].startswith("account [success=3 default=ignore] pam_succeed_if.so quiet "
                               "user ingroup clusteradm")
    assert lines[2] == ("account [success=2 default=ignore] pam_listfile.so item=user "
                        "sense=allow file=/run/sshd-adopt/present onerr=fail")
    assert lines[3] == f"account required pam_echo.so {GATE_MESSAGE}"
    assert lines[4] == "account requisite pam_deny.so" and len(lines) == 5
    alone = pam_gate_block(("slurmusers",), (), "/p")
    assert "[success=3 default=ignore] pam_succeed_if.so quiet user notingroup slurmusers" \
        in alone and "ingroup" not in alone.replace("notingroup", "")


def test_the_gate_goes_before_the_first_account_line_once_and_comes_out_again() -> None:
    block = pam_gate_block(("slurmusers",), ("clusteradm",), "/run/sshd-adopt/present")
    gated = with_pam_gate(DEBIAN_SSHD_PAM, block)
    assert gated.index(GATE_END) < gated.index("account    required     pam_nologin.so")
    assert gated.index("@include common-auth") < gated.index(GATE_BEGIN)
    assert with_pam_gate(gated, block) == gated
    assert without_pam_gate(gated) == DEBIAN_SSHD_PAM
    with pytest.raises(ValueError, match="no account line"):
        with_pam_gate("auth required pam_deny.so\n", block)
    assert sshd_pam_with_gate(DEBIAN_SSHD_PAM, SHIPPED, "/run/sshd-adopt/present") == gated
    with pytest.raises(ValueError, match="not a plain 'Match Group' line"):
        sshd_pam_with_gate(DEBIAN_SSHD_PAM, SHIPPED.replace("Match Group", "Match User"),
                           "/run/sshd-adopt/present")


def test_openssh_before_9_8_gets_use_pam_but_no_service_name() -> None:
    text = dropin_with_methods(SHIPPED, ("publickey", "hostbased"), pam_service="sshd")
    assert "\nUsePAM yes\nMatch " in text and "PAMServiceName" not in text
