"""The doctor's "exempt" check: whom sshd's Match block keeps away from the wrapper, the
broker's [exempt] must cover (else the sweeper ends their sessions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sshd_adopt._internal import doctor
from sshd_adopt._internal.doctor import ForcedCommand, Status
from sshd_adopt.cli import doctor as doctor_cli

DROPIN = """\
PermitUserEnvironment no
Match Group slurmusers,!clusteradm
    AuthorizedKeysFile none
    ForceCommand /opt/sshd-adopt/bin/sshd-adopt
"""


def no_include(pattern: str) -> Sequence[str]:
    raise AssertionError(f"unexpected Include {pattern}")


def check(commands: list[ForcedCommand], *, users: Sequence[str] = ("root",),
          groups: Sequence[str] = (), sweeper: bool = True,
          exempt_by_group: Sequence[str] = ()) -> list[doctor.Check]:
    return doctor.check_exempt_agrees(
        commands, exempt_users=users, exempt_groups=groups,
        user_is_exempt=lambda name: name in exempt_by_group,
        config_path="/etc/sshd-adopt/sshd-adopt.toml", sweeper_enabled=sweeper)


def test_forced_commands_follow_includes_and_restore_the_match_state() -> None:
    main = ("Include /etc/ssh/sshd_config.d/*.conf\n"
            "Match User other\n"
            "    Include extra.conf\n"
            "ForceCommand=/bin/true\n")
    files = {"/etc/ssh/sshd_config.d/*.conf": [DROPIN], "extra.conf": ["ForceCommand /x\n"]}
    found = doctor.forced_commands(main, lambda pattern: files[pattern])
    assert found == [
        ForcedCommand("/opt/sshd-adopt/bin/sshd-adopt", "Group slurmusers,!clusteradm"),
        ForcedCommand("/x", "User other"),  # an included file starts in the includer's Match
        ForcedCommand("/bin/true", "User other"),  # the drop-in's Match ended with its file
    ]


def test_match_exclusions() -> None:
    assert doctor.match_exclusions("Group slurmusers,!clusteradm") == (
        frozenset(), frozenset({"clusteradm"}))
    assert doctor.match_exclusions("User *,!root Group *,!clusteradm,!adm*") == (
        frozenset({"root"}), frozenset({"clusteradm"}))  # wildcards cannot be listed
    assert doctor.match_exclusions("All") == (frozenset(), frozenset())
    assert doctor.match_exclusions("Address 10.0.0.0/8 User=!bob,alice") == (
        frozenset({"bob"}), frozenset())


def test_an_excluded_group_missing_from_exempt_fails_with_the_toml_to_add() -> None:
    commands = doctor.forced_commands(DROPIN, no_include)
    (found,) = check(commands)
    assert found.status is Status.FAIL
    assert "group clusteradm" in found.detail and "sweeper" in found.detail
    assert 'groups = ["clusteradm"]' in found.fix


def test_covered_exclusions_are_ok() -> None:
    commands = doctor.forced_commands(
        "Match User *,!root,!carol Group *,!clusteradm\n ForceCommand /p/bin/sshd-adopt\n",
        no_include)
    (found,) = check(commands, groups=["clusteradm"], exempt_by_group=["carol"])
    assert found.status is Status.OK
    (missing,) = check(commands, groups=["clusteradm"])
    assert missing.status is Status.FAIL
    assert 'users = ["carol", "root"]' in missing.fix


def test_nothing_to_say_without_a_wrapper_match_or_without_the_sweeper() -> None:
    assert check(doctor.forced_commands(DROPIN, no_include), sweeper=False) == []
    assert check([ForcedCommand("/opt/sshd-adopt/bin/sshd-adopt", None)]) == []
    assert check([ForcedCommand("/usr/bin/other", "Group x,!y")]) == []


def test_gather_reads_the_files_and_their_includes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "sshd-adopt.conf").write_text(DROPIN)
    (tmp_path / "sshd_config").write_text(f"Include {tmp_path}/d/*.conf\nUsePAM no\n")
    assert doctor_cli.gather_forced_commands(str(tmp_path / "sshd_config")) == [
        ForcedCommand("/opt/sshd-adopt/bin/sshd-adopt", "Group slurmusers,!clusteradm")]
    assert doctor_cli.gather_forced_commands(str(tmp_path / "missing")) == []
