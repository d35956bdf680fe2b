"""The authentication methods managed users may use: the drop-in rewrite scripts/install does."""

from __future__ import annotations

import pytest

from sshd_adopt._internal.authmethods import dropin_with_methods, openssh_version, parse_methods
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
