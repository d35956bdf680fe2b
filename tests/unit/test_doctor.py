"""The doctor's checks are pure: each rule is exercised here with made-up facts."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from sshd_adopt._internal import protocol
from sshd_adopt._internal.authmethods import pam_gate_block, ways_in_without_a_key, with_pam_gate
from sshd_adopt._internal.config import AdmissionSettings, Config, Exemptions
from sshd_adopt._internal.core.decision import Adopt, AskCallerId, Deny, LocalJob, Message
from sshd_adopt._internal.core.options import Options, UnknownAction
from sshd_adopt._internal.doctor import checks as doctor
from sshd_adopt._internal.doctor import sshd as sshd_checks
from sshd_adopt._internal.doctor.checks import Check, PathStat, PingResult, Status
from sshd_adopt._internal.doctor.sshd import SshdView
from sshd_adopt._internal.node.sshdconfig import parse_sshd_t
from sshd_adopt._internal.slurm.facts import SlurmFacts
from sshd_adopt.cli import doctor as doctor_cli
from tests.harness import REPO

DIR = stat.S_IFDIR
REG = stat.S_IFREG


def facts(**changes: object) -> SlurmFacts:
    values: dict[str, object] = {
        "conf_path": "/etc/slurm/slurm.conf", "cluster_name": "lab", "nodename": "n1",
        "node_hostname": "n1", "node_addr": "10.0.0.1", "spool_dir": "/var/spool/slurmd",
        "slurmd_port": 6818, "slurm_user": "slurm", "slurm_user_uid": 64030,
        "prolog_flags": frozenset({"contain", "x11"}), "proctrack_type": "proctrack/cgroup",
        "task_plugins": ("task/cgroup", "task/affinity"), "version": "22.05.8",
        "protocol_version": 9728,
    }
    values.update(changes)
    return SlurmFacts(**values)  # type: ignore[arg-type]


def by_name(checks: list[Check], name: str) -> Check:
    (found,) = [c for c in checks if c.name == name]
    return found


# --------------------------------------------------------------------------- config / slurm


def test_config_error_is_a_fail_with_the_message() -> None:
    (check,) = doctor.check_config(None, "/x.toml: policy.foo: unknown key", "/x.toml")
    assert check.status is Status.FAIL
    assert "policy.foo" in check.detail
    assert "--check --config /x.toml" in check.fix


def test_config_warnings_become_warns_but_missing_file_is_left_to_the_file_check() -> None:
    config = Config(path="/x.toml", warnings=("risky: action_adopt_failure=allow",
                                              "/x.toml: no such file; using the built-in defaults"))
    checks = doctor.check_config(config, None, "/x.toml")
    assert [c.status for c in checks] == [Status.OK, Status.WARN]
    assert "risky" in checks[1].detail


@pytest.mark.parametrize(("mode", "uid", "status"), [
    (0o644, 0, Status.OK), (0o664, 0, Status.WARN), (0o644, 1000, Status.WARN),
    (0o646, 0, Status.FAIL),
])
def test_config_file_modes(mode: int, uid: int, status: Status) -> None:
    st = os.stat_result((REG | mode, 0, 0, 1, uid, 0, 10, 0, 0, 0))
    assert doctor.check_config_file("/x.toml", st).status is status


def test_missing_config_file_is_a_warning() -> None:
    assert doctor.check_config_file("/x.toml", None).status is Status.WARN


def test_slurm_prerequisites_ok() -> None:
    checks = doctor.check_slurm(facts(), None, spool_exists=True)
    assert all(c.status is Status.OK for c in checks), checks
    assert by_name(checks, "NodeName").detail == "n1"


@pytest.mark.parametrize(("changes", "name"), [
    ({"prolog_flags": frozenset({"x11"})}, "PrologFlags"),
    ({"proctrack_type": "proctrack/linuxproc"}, "ProctrackType"),
    ({"task_plugins": ("task/affinity",)}, "TaskPlugin"),
    ({"nodename": None}, "NodeName"),
    ({"spool_dir": None}, "spool dir"),
])
def test_slurm_prerequisite_missing_fails(changes: dict[str, object], name: str) -> None:
    check = by_name(doctor.check_slurm(facts(**changes), None, spool_exists=True), name)
    assert check.status is Status.FAIL
    assert check.fix


def test_missing_spool_dir_fails_and_unreadable_slurm_conf_fails() -> None:
    checks = doctor.check_slurm(facts(), None, spool_exists=False)
    assert by_name(checks, "spool dir").status is Status.FAIL
    (check,) = doctor.check_slurm(None, "no slurm.conf", spool_exists=None)
    assert check.status is Status.FAIL and "no slurm.conf" in check.detail


# --------------------------------------------------------------------------- broker


def test_broker_down_fails() -> None:
    (check,) = doctor.check_broker(PingResult("/s", error="refused"), our_version="1",
                                   nodename="n1")
    assert check.status is Status.FAIL and "/s" in check.detail


def test_broker_version_and_node_mismatch_warn() -> None:
    checks = doctor.check_broker(PingResult("/s", version="0.0.9", node="n2"),
                                 our_version="0.1.0", nodename="n1")
    assert [c.status for c in checks] == [Status.OK, Status.WARN, Status.WARN]


def test_the_brokers_process_events_are_reported() -> None:
    following = doctor.check_broker(PingResult("/s", version="1", node="n1",
                                                events="proc connector"),
                                     our_version="1", nodename="n1")
    assert [(c.name, c.status) for c in following] == [("broker", Status.OK),
                                                        ("process events", Status.OK)]
    (_, without) = doctor.check_broker(
        PingResult("/s", version="1", node="n1",
                   events="none: not in the initial pid namespace (pid:[4026532301])"),
        our_version="1", nodename="n1")
    assert without.status is Status.WARN
    assert "not in the initial pid namespace" in without.detail
    assert "sweeper.interval" in without.detail and "CAP_NET_ADMIN" in without.fix
    older = doctor.check_broker(PingResult("/s", version="1", node="n1"), our_version="1",
                                nodename="n1")
    assert [c.name for c in older] == ["broker"]  # an older broker says nothing: no line


def test_ping_broker_speaks_the_wire_format(tmp_path: Path) -> None:
    path = str(tmp_path / "b.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    seen: list[tuple[str, dict[str, str]]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            length = protocol.frame_length(conn.recv(4))
            seen.append(protocol.parse_request(conn.recv(length)))
            conn.sendall(protocol.encode(protocol.reply("pong", version="9.9", node="n7",
                                                        events="proc connector")))

    thread = threading.Thread(target=serve)
    thread.start()
    result = doctor.ping_broker(path, timeout=5)
    thread.join()
    server.close()
    assert seen == [("ping", {})]
    assert result == PingResult(path, version="9.9", node="n7", events="proc connector")


def test_ping_broker_reports_errors_as_data(tmp_path: Path) -> None:
    result = doctor.ping_broker(str(tmp_path / "absent.sock"), timeout=1)
    assert result.error is not None and result.version is None


# --------------------------------------------------------------------------- sshd


SSHD_T = """port 22
usepam no
forcecommand /opt/sshd-adopt/bin/sshd-adopt action_unknown=deny
permituserenvironment no
authorizedkeyscommand /opt/sshd-adopt/bin/sshd-adopt-keys %u
authorizedkeyscommanduser sshd-adopt-gate
authorizedkeysfile /run/sshd-adopt/keys/%u
authorizedprincipalsfile /run/sshd-adopt/principals/%u
trustedusercakeys none
setenv SHLVL=1
listenaddress 0.0.0.0:22
listenaddress [::]:22
"""

ADMISSION = AdmissionSettings()


def test_parse_sshd_t() -> None:
    values = parse_sshd_t(SSHD_T)
    assert values["authorizedkeysfile"] == "/run/sshd-adopt/keys/%u"
    assert values["listenaddress"] == "0.0.0.0:22\n[::]:22"
    assert sshd_checks.forced_wrapper(values["forcecommand"]) == "/opt/sshd-adopt/bin/sshd-adopt"


@pytest.mark.parametrize("command", ["none", "", "/usr/bin/internal-sftp", "/bin/sshd-adopt-x"])
def test_forced_wrapper_other_commands(command: str) -> None:
    assert sshd_checks.forced_wrapper(command) is None


def view(text: str = SSHD_T, **changes: str) -> SshdView:
    settings = parse_sshd_t(text)
    settings.update(changes)
    return SshdView("alice", settings)


def managed(v: SshdView, admission: AdmissionSettings = ADMISSION) -> list[Check]:
    return sshd_checks.check_sshd_managed(v, admission)


def failures(checks: list[Check]) -> list[str]:
    return [c.detail for c in checks if c.status is not Status.OK]


def test_the_shipped_drop_in_is_ok() -> None:
    checks = managed(view())
    assert checks and failures(checks) == []


def test_managed_user_without_wrapper_fails() -> None:
    (check,) = managed(view(forcecommand="none"))
    assert check.status is Status.FAIL and "not adopted" in check.detail


def test_managed_user_with_user_environment_warns() -> None:
    checks = managed(view(permituserenvironment="yes"))
    assert [c.status for c in checks if c.status is not Status.OK] == [Status.WARN]


@pytest.mark.parametrize("files", [".ssh/authorized_keys",
                                   "/run/sshd-adopt/keys/%u .ssh/authorized_keys", "none"])
def test_a_key_file_of_the_users_own_fails(files: str) -> None:
    (detail,) = failures(managed(view(authorizedkeysfile=files)))
    assert "whether or not the user has a job" in detail


def test_a_site_keys_command_wants_authorized_keys_file_none() -> None:
    site = AdmissionSettings(keys_command="/usr/bin/sss_ssh_authorizedkeys %u")
    assert failures(managed(view(authorizedkeysfile="none"), site)) == []
    (detail,) = failures(managed(view(), site))
    assert "AuthorizedKeysFile" in detail


def test_a_user_ca_without_our_principals_file_fails() -> None:
    checks = managed(view(trustedusercakeys="/etc/ssh/user_ca.pub",
                          authorizedprincipalsfile="none"))
    (detail,) = failures(checks)
    assert "certificate logs in without a job" in detail
    assert failures(managed(view(trustedusercakeys="/etc/ssh/user_ca.pub"))) == []


def test_the_keys_command_must_run_as_the_gate_user() -> None:
    (detail,) = failures(managed(view(authorizedkeyscommanduser="nobody")))
    assert "'nobody'" in detail


def test_without_shlvl_refused_bash_users_read_their_bashrc() -> None:
    (detail,) = failures(managed(view(setenv="none")))
    assert "SHLVL=1" in detail
    assert failures(managed(view(setenv="none"), AdmissionSettings(on_deny="refuse"))) == []


def test_exempt_user_must_not_get_the_wrapper() -> None:
    (bad,) = sshd_checks.check_sshd_exempt(view())
    assert bad.status is Status.FAIL
    (good,) = sshd_checks.check_sshd_exempt(view(forcecommand="none"))
    assert good.status is Status.OK


def test_sshd_error_is_a_fail() -> None:
    broken = SshdView("root", error="Missing privilege separation directory: /run/sshd")
    assert sshd_checks.check_sshd_exempt(broken)[0].status is Status.FAIL
    assert managed(broken)[0].status is Status.FAIL


# --------------------------------------------------------------------------- paths


def chain(*items: tuple[str, int, int]) -> list[PathStat]:
    return [PathStat(path, uid, mode) for path, uid, mode in items]


GOOD = [("/", 0, DIR | 0o755), ("/opt", 0, DIR | 0o755), ("/opt/x", 0, DIR | 0o755),
        ("/opt/x/sshd-adopt", 0, REG | 0o755)]


def test_safe_path_ok() -> None:
    assert doctor.check_safe_path("wrapper", "/opt/x/sshd-adopt",
                                  chain(*GOOD)).status is Status.OK


@pytest.mark.parametrize(("index", "uid", "mode", "words"), [
    (2, 1000, DIR | 0o755, "owned by uid 1000"),
    (1, 0, DIR | 0o775, "group-writable"),
    (1, 0, DIR | 0o1777, "world-writable"),
    (3, 0, REG | 0o757, "world-writable"),
])
def test_safe_path_refuses(index: int, uid: int, mode: int, words: str) -> None:
    items = list(GOOD)
    items[index] = (items[index][0], uid, mode)
    check = doctor.check_safe_path("wrapper", "/opt/x/sshd-adopt", chain(*items))
    assert check.status is Status.FAIL
    assert words in check.detail and items[index][0] in check.detail


def test_safe_path_missing_file() -> None:
    check = doctor.check_safe_path("wrapper", "/nope", [PathStat("/", 0, DIR | 0o755),
                                                        PathStat("/nope", None)])
    assert check.status is Status.FAIL and "does not exist" in check.detail


def test_stat_chain_resolves_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    items = doctor.stat_chain(str(link))
    assert items[0].path == "/"
    assert items[-1].path == str(target.resolve())
    assert all(item.uid is not None for item in items)


# --------------------------------------------------------------------------- dry run


def test_dry_run_single_job_adopts() -> None:
    result = doctor.dry_run("alice", 2001, exempt=False, node_known=True,
                            jobs=(LocalJob(12, 100.0),), config=Config(path="/x"))
    assert result.decision == Adopt(12, "user has only one job 12")
    assert result.fallback is None
    check = doctor.check_dry_run(result)
    assert check.status is Status.OK and "jobs here: 12" in check.detail


def test_dry_run_several_jobs_shows_the_fallback() -> None:
    config = Config(path="/x", options=Options(action_unknown=UnknownAction.NEWEST))
    result = doctor.dry_run("alice", 2001, exempt=False, node_known=True,
                            jobs=(LocalJob(12, 200.0), LocalJob(15, 100.0)), config=config)
    assert isinstance(result.decision, AskCallerId)
    assert isinstance(result.fallback, Adopt) and result.fallback.job_id == 12
    assert "if the source host does not answer: adopt into job 12" in \
        doctor.check_dry_run(result).detail


def test_dry_run_no_jobs_denies_with_a_warning() -> None:
    result = doctor.dry_run("alice", 2001, exempt=False, node_known=True, jobs=(),
                            config=Config(path="/x"))
    assert result.decision == Deny(Message.NO_JOBS,
                                   "user has no jobs on this node; action_no_jobs=deny")
    assert doctor.check_dry_run(result).status is Status.WARN


def test_dry_run_exempt_and_job_error() -> None:
    config = Config(path="/x", exempt=Exemptions(users=frozenset({"root", "carol"})))
    result = doctor.dry_run("carol", 2003, exempt=True, node_known=True, jobs=(), config=config)
    assert "allow without adoption" in doctor.describe(result.decision)
    assert doctor.check_dry_run(result, job_error="boom").status is Status.FAIL


def test_exit_status() -> None:
    assert doctor.exit_status([Check("a", Status.OK, ""), Check("b", Status.WARN, ""),
                               Check("c", Status.SKIP, "")]) == 0
    assert doctor.exit_status([Check("a", Status.FAIL, "")]) == 1


# --------------------------------------------------------------------------- rendering


def test_render_text_and_json() -> None:
    checks = [Check("broker", Status.FAIL, "down", "start it"), Check("config", Status.OK, "ok")]
    result = doctor.dry_run("alice", 2001, exempt=False, node_known=True,
                            jobs=(LocalJob(12, 100.0),), config=Config(path="/x"))
    text = doctor_cli.render_text(checks, result)
    assert "FAIL  broker" in text and "fix: start it" in text
    assert "job 12" in text and "1 failed, 0 warnings, 2 checks" in text
    document = json.loads(doctor_cli.render_json(checks, result))
    assert document["ok"] is False
    assert document["dry_run"]["jobs"][0]["job_id"] == 12
    assert document["checks"][0]["status"] == "FAIL"


def test_main_runs_without_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Everything missing is reported, nothing raises."""
    config = tmp_path / "c.toml"
    config.write_text(f'[slurm]\nconf_path = "{tmp_path}/slurm.conf"\n'
                      f'[broker]\nsocket_path = "{tmp_path}/b.sock"\n')
    status = doctor_cli.main(["--config", str(config), "--sshd", str(tmp_path / "no-sshd"),
                              "--json"])
    document = json.loads(capsys.readouterr().out)
    assert status == 1
    names = {c["name"]: c["status"] for c in document["checks"]}
    assert names["slurm.conf"] == "FAIL" and names["broker"] == "FAIL"
    assert names["sshd (root)"] == "FAIL"


# --------------------------------------------------------------------------- entries, limits


def test_entries_owned_by_someone_else_fail_naming_the_directory() -> None:
    check = sshd_checks.check_entries(["/run/sshd-adopt/keys is writable by group 100"], [],
                                 "/run/sshd-adopt/keys")
    assert check.status is Status.FAIL and "/run/sshd-adopt/keys" in check.detail


def test_entries_list_who_may_enter() -> None:
    check = sshd_checks.check_entries([], ["bob", "alice"], "/run/sshd-adopt/keys")
    assert check.status is Status.OK and "2 user(s) may enter (alice, bob)" in check.detail


def test_limits_conf_without_pam_warns_with_an_example() -> None:
    lines = ["@slurmusers hard nofile 4096"]
    check = sshd_checks.check_limits("no", lines)
    assert check is not None and check.status is Status.WARN
    assert "@slurmusers hard nofile 4096" in check.detail
    assert sshd_checks.check_limits("yes", lines) is None
    assert sshd_checks.check_limits("no", []) is None


# --------------------------------------------------------------------------- auth methods

SWITCHES_ON = {"pubkeyauthentication": "yes", "hostbasedauthentication": "yes",
               "gssapiauthentication": "yes", "passwordauthentication": "yes",
               "kbdinteractiveauthentication": "yes"}


@pytest.mark.parametrize(("changes", "ways"), [
    # The shipped drop-in: publickey only, whatever else is switched on.
    ({"authenticationmethods": "publickey", **SWITCHES_ON}, []),
    # Every way needs a key (a second factor after it does not matter here).
    ({"authenticationmethods": "publickey,keyboard-interactive:pam publickey,password",
      **SWITCHES_ON}, []),
    # any: each switched-on method is a way in by itself.
    ({"authenticationmethods": "any", **SWITCHES_ON},
     ["hostbased", "gssapi-with-mic", "password", "keyboard-interactive"]),
    ({"authenticationmethods": "any", "pubkeyauthentication": "yes",
      "hostbasedauthentication": "yes", "gssapiauthentication": "no",
      "passwordauthentication": "no", "kbdinteractiveauthentication": "no"}, ["hostbased"]),
    # A list without publickey is a way in when its methods are on.
    ({"authenticationmethods": "publickey hostbased", **SWITCHES_ON}, ["hostbased"]),
    ({"authenticationmethods": "publickey hostbased", "pubkeyauthentication": "yes",
      "hostbasedauthentication": "no"}, []),
    ({"authenticationmethods": "gssapi-with-mic,keyboard-interactive:pam", **SWITCHES_ON},
     ["gssapi-with-mic,keyboard-interactive:pam"]),
])
def test_ways_in_without_a_key(changes: dict[str, str], ways: list[str]) -> None:
    assert ways_in_without_a_key(view(**changes).settings) == ways


def test_auth_methods_ok_for_publickey_only_and_warned_otherwise() -> None:
    shipped = sshd_checks.check_auth_methods(view(authenticationmethods="publickey"))
    assert shipped is not None and shipped.status is Status.OK
    assert shipped.name == "auth methods (alice)"
    open_door = sshd_checks.check_auth_methods(
        view(authenticationmethods="any", **SWITCHES_ON))
    assert open_door is not None and open_door.status is Status.WARN
    assert "hostbased" in open_door.detail and "after authentication" in open_door.detail
    assert "AuthenticationMethods publickey" in open_door.fix
    assert sshd_checks.check_auth_methods(SshdView("alice", error="no sshd")) is None


PAM_GATE = (REPO / "pam.d" / "sshd-adopt").read_text()
KEYLESS_VIEW = {"authenticationmethods": "publickey hostbased gssapi-with-mic", **SWITCHES_ON}


def test_the_keyless_profiles_pam_gate_is_ok_with_the_shipped_service() -> None:
    gated = sshd_checks.check_auth_methods(
        view(usepam="yes", pamservicename="sshd-adopt", **KEYLESS_VIEW),
        "/run/sshd-adopt/present", PAM_GATE)
    assert gated is not None and gated.status is Status.OK, gated
    assert "account phase" in gated.detail and "/run/sshd-adopt/present" in gated.detail


@pytest.mark.parametrize("pam_text", [None, "account include sshd\n"])
def test_a_pam_service_without_the_gate_fails(pam_text: str | None) -> None:
    """The drop-in names the service, but it is missing or checks nothing."""
    found = sshd_checks.check_auth_methods(
        view(usepam="yes", pamservicename="sshd-adopt", **KEYLESS_VIEW),
        "/run/sshd-adopt/present", pam_text)
    assert found is not None and found.status is Status.FAIL, found
    assert "/etc/pam.d/sshd-adopt" in found.fix


def test_the_gate_checking_another_list_is_no_gate() -> None:
    found = sshd_checks.check_auth_methods(
        view(usepam="yes", pamservicename="sshd-adopt", **KEYLESS_VIEW),
        "/srv/other/present", PAM_GATE)
    assert found is not None and found.status is Status.FAIL


def test_without_pam_the_keyless_ways_are_enforced_after_authentication_only() -> None:
    found = sshd_checks.check_auth_methods(
        view(usepam="no", pamservicename="sshd-adopt", **KEYLESS_VIEW),
        "/run/sshd-adopt/present", PAM_GATE)
    assert found is not None and found.status is Status.WARN
    assert "right after authentication only" in found.detail


def test_before_openssh_9_8_the_gate_in_pam_d_sshd_counts() -> None:
    """sshd -T prints no pamservicename there: the service is sshd, its file holds the
    gate block (scripts/install)."""
    sshd_pam = with_pam_gate("@include common-account\n", pam_gate_block(
        ("slurmusers",), ("clusteradm",), "/run/sshd-adopt/present"))
    gated = sshd_checks.check_auth_methods(
        view(usepam="yes", **KEYLESS_VIEW), "/run/sshd-adopt/present", sshd_pam)
    assert gated is not None and gated.status is Status.OK and "PAM service sshd" in gated.detail
    bare = sshd_checks.check_auth_methods(
        view(usepam="yes", **KEYLESS_VIEW), "/run/sshd-adopt/present",
        "@include common-account\n")
    assert bare is not None and bare.status is Status.WARN
