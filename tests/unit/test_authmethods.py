"""The authentication methods managed users may use: the drop-in rewrite scripts/install does."""

from __future__ import annotations

import pytest

from sshd_adopt._internal.authmethods import dropin_with_methods, parse_methods
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
