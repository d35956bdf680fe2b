"""The TOML configuration: defaults, strict validation, warnings, overrides, templates."""

from __future__ import annotations

import dataclasses
import grp
import itertools
import os
import re
from pathlib import Path

import pytest

from sshd_adopt._internal import config as cfg
from sshd_adopt._internal.config import (
    DEFAULT_CONFIG_PATH,
    MAX_MESSAGE_CHARS,
    AdmissionSettings,
    AdoptionSettings,
    BrokerSettings,
    CallerIdSettings,
    Config,
    Exemptions,
    InvalidConfig,
    LogSettings,
    Messages,
    SlurmSettings,
    SshdSettings,
    apply_overrides,
    load_config,
    loader,
    parse_option,
    values,
)
from sshd_adopt._internal.config.overrides import FREE_OVERRIDES, STRICTNESS
from sshd_adopt._internal.config.settings import InvalidValue
from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    LogLevel,
    NoJobsAction,
    Options,
    UnknownAction,
    replace,
)
from sshd_adopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
NO_SUCH_GROUP = "sshd-adopt-test-no-such-group"
SOME_GROUP = grp.getgrall()[0]


def write(tmp_path: Path, text: str, name: str = "sshd-adopt.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def only_problem(tmp_path: Path, text: str) -> InvalidConfig:
    path = write(tmp_path, text)
    with pytest.raises(InvalidConfig) as info:
        load_config(path)
    err = info.value
    assert len(err.problems) == 1, str(err)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    return err


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_documented_ones() -> None:
    broker = BrokerSettings()
    assert broker.socket_path == "/run/sshd-adopt/broker.sock"
    assert broker.socket_mode == 0o666
    assert broker.socket_group is None
    assert broker.pid_file == "/run/sshd-adopt/sshd-adoptd.pid"
    assert (broker.request_timeout, broker.stepd_timeout, broker.decision_deadline) == (
        2.0, 2.0, 5.0,
    )
    assert (broker.workers, broker.max_connections, broker.max_per_uid) == (16, 512, 64)
    assert Exemptions().users == frozenset({"root"})
    assert Exemptions().groups == frozenset()
    assert CallerIdSettings() == CallerIdSettings(1.0, "auto", "/usr/bin/scontrol",
                                                  "/usr/bin/munge")
    assert SlurmSettings().conf_path == "/etc/slurm/slurm.conf"
    assert "/usr/sbin/sshd" in SshdSettings().executables
    assert "/usr/lib/openssh/sshd-session" in SshdSettings().executables
    admission = AdmissionSettings()
    assert (admission.keys_dir, admission.principals_dir) == (
        "/run/sshd-adopt/keys", "/run/sshd-adopt/principals")
    assert (admission.keys_file, admission.principals_file) == (".ssh/authorized_keys", "")
    assert (admission.on_deny, admission.message_shells) == ("message", ("bash", "sh", "dash"))
    assert AdoptionSettings().early
    assert LogSettings() == LogSettings("auto", "authpriv", "sshd-adopt")
    assert DEFAULT_CONFIG_PATH == "/etc/sshd-adopt/sshd-adopt.toml"


def test_options_defaults_fail_closed() -> None:
    options = Config(path="x").options
    assert options == Options()
    assert options.action_adopt_failure is AdoptFailureAction.DENY  # upstream: allow
    assert options.fallthrough is FallThrough.DENY


def test_missing_default_file_means_defaults_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = str(tmp_path / "absent.toml")
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", absent)
    config = load_config()
    assert config.path == absent
    assert dataclasses.replace(config, warnings=()) == Config(path=absent)
    assert len(config.warnings) == 1
    assert absent in config.warnings[0]
    assert "defaults" in config.warnings[0]


def test_existing_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[policy]\naction_unknown = "deny"\n')
    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", path)
    assert load_config().options.action_unknown is UnknownAction.DENY


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == path
    assert info.value.key is None
    assert str(info.value) == f"{path}: no such file"


def test_empty_file_means_defaults_without_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_config(path) == Config(path=path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(str(tmp_path))  # a directory
    assert info.value.path == str(tmp_path)


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(info.value).startswith(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[log]\nident = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path))


def test_world_writable_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="writable by everyone") as info:
        load_config(path)
    assert info.value.path == path


def test_group_writable_file_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    os.chmod(path, 0o664)
    assert any("group-writable" in w for w in load_config(path).warnings)


def test_every_key_set_to_a_non_default(tmp_path: Path) -> None:
    group = SOME_GROUP.gr_name
    config = load_text(
        tmp_path,
        f"""
[policy]
action_no_jobs = "ignore"
action_unknown = "DENY"          # values are case-insensitive, as upstream
action_adopt_failure = "deny"
action_generic_failure = "deny"
fallthrough = "deny"
ignore_root = true
single_job_skip_rpc = false
disable_x11 = true
nodename = "node-1"
log_level = "debug2"

[broker]
socket_path = "/run/x/b.sock"
socket_mode = "0660"
socket_group = "{group}"
pid_file = "/run/x/pid"
request_timeout = 1
stepd_timeout = 0.5
decision_deadline = 4.5
workers = 4
max_connections = 100
max_per_uid = 10

[exempt]
users = ["admin", "svc"]
groups = ["{group}"]

[callerid]
deadline = 0.25
method = "scontrol"
scontrol_path = "/usr/bin/scontrol"

[messages]
no_jobs = "{{user}} has no job on {{node}}"
unknown_source = "which of {{jobs}}?"
adopt_failed = "job {{job}} broke"
no_node = "not a node"

[slurm]
conf_path = "/etc/slurm-llnl/slurm.conf"

[sshd]
executables = ["/opt/ssh/sbin/sshd"]

[admission]
keys_dir = "/run/k"
principals_dir = "/run/p"
keys_file = "%h/.ssh/keys"
principals_file = ".ssh/principals"
on_deny = "refuse"
message_shells = ["bash"]

[log]
target = "stderr"
facility = "local3"
ident = "adopt"
""",
    )
    assert config.warnings == ()
    assert config.options == Options(
        action_no_jobs=NoJobsAction.IGNORE,
        action_unknown=UnknownAction.DENY,
        action_adopt_failure=AdoptFailureAction.DENY,
        action_generic_failure=GenericFailureAction.DENY,
        fallthrough=FallThrough.DENY,
        ignore_root=True,
        single_job_skip_rpc=False,
        disable_x11=True,
        nodename="node-1",
        log_level=LogLevel.DEBUG2,
    )
    assert config.broker == BrokerSettings(
        socket_path="/run/x/b.sock", socket_mode=0o660, socket_group=group,
        pid_file="/run/x/pid", request_timeout=1.0, stepd_timeout=0.5,
        decision_deadline=4.5, workers=4, max_connections=100, max_per_uid=10,
    )
    assert isinstance(config.broker.request_timeout, float)
    assert config.exempt.users == frozenset({"admin", "svc"})
    assert config.exempt.groups == frozenset({SOME_GROUP.gr_name})
    assert config.callerid == CallerIdSettings(0.25, "scontrol", "/usr/bin/scontrol")
    assert config.messages.render(Message.NO_JOBS, user="bob", node="n1") == "bob has no job on n1"
    assert config.slurm == SlurmSettings("/etc/slurm-llnl/slurm.conf")
    assert config.sshd == SshdSettings(("/opt/ssh/sbin/sshd",))
    assert config.admission == AdmissionSettings(
        keys_dir="/run/k", principals_dir="/run/p", keys_file="%h/.ssh/keys",
        principals_file=".ssh/principals", on_deny="refuse", message_shells=("bash",))
    assert config.log == LogSettings("stderr", "local3", "adopt")


@pytest.mark.parametrize(("text", "level"), [
    ("0", LogLevel.QUIET), ("9", LogLevel.DEBUG5), ('"quiet"', LogLevel.QUIET),
    ('"Verbose"', LogLevel.VERBOSE), ('"debug5"', LogLevel.DEBUG5), ('"3"', LogLevel.INFO),
])
def test_log_level_names_and_integers(tmp_path: Path, text: str, level: LogLevel) -> None:
    assert load_text(tmp_path, f"[policy]\nlog_level = {text}\n").options.log_level is level


@pytest.mark.parametrize(("text", "mode"), [('"0666"', 0o666), ('"660"', 0o660),
                                            ('"0o600"', 0o600)])
def test_socket_mode_spellings(tmp_path: Path, text: str, mode: int) -> None:
    assert load_text(tmp_path, f"[broker]\nsocket_mode = {text}\n").broker.socket_mode == mode


# --------------------------------------------------------------------------- errors

ERRORS: list[tuple[str, str, str]] = [
    # (file text, dotted key, expected part of the problem)
    ('[policy]\naction_unknown = "newestFOO"', "policy.action_unknown",
     "is not one of: newest, allow, deny"),
    ('[policy]\naction_unknown = "new"', "policy.action_unknown", "newest, allow, deny"),
    ('[policy]\naction_no_jobs = "allow"', "policy.action_no_jobs", "deny, ignore"),
    ("[policy]\naction_adopt_failure = true", "policy.action_adopt_failure",
     "expected a string, got a boolean"),
    ('[policy]\naction_generic_failure = "alow"', "policy.action_generic_failure",
     "did you mean 'allow'?"),
    ('[policy]\nfallthrough = "ignore"', "policy.fallthrough", "allow, deny"),
    ("[policy]\nignore_root = false", "policy.ignore_root", "cannot be false"),
    ("[policy]\nignore_root = 1", "policy.ignore_root", "expected true or false"),
    ('[policy]\nsingle_job_skip_rpc = "0"', "policy.single_job_skip_rpc",
     "expected true or false, got a string"),
    ("[policy]\ndisable_x11 = 1", "policy.disable_x11", "got an integer"),
    ('[policy]\nnodename = ""', "policy.nodename", "not a node name"),
    ('[policy]\nnodename = "../etc"', "policy.nodename", "not a node name"),
    ('[policy]\nnodename = ".."', "policy.nodename", "not a node name"),
    ('[policy]\nnodename = "a b"', "policy.nodename", "not a node name"),
    ("[policy]\nnodename = 5", "policy.nodename", "expected a string"),
    ("[policy]\nlog_level = 10", "policy.log_level", "outside 0..9"),
    ("[policy]\nlog_level = -1", "policy.log_level", "outside 0..9"),
    ("[policy]\nlog_level = true", "policy.log_level", "got a boolean"),
    ("[policy]\nlog_level = 3.0", "policy.log_level", "got a float"),
    ('[policy]\nlog_level = "debug6"', "policy.log_level", "quiet, fatal, error"),
    ('[policy]\nlog_level = "10"', "policy.log_level", "or an integer 0..9"),
    ('[policy]\nacton_unknown = "deny"', "policy.acton_unknown",
     "did you mean 'action_unknown'?"),
    ('[policy]\nservice = "sshd"', "policy.service", "Match"),
    ('[policy]\njoin_container = "maybe"', "policy.join_container", "true or false"),
    ('[policy]\nworkers = 3', "policy.workers", "belongs in [broker]"),
    ('action_unknown = "deny"', "action_unknown", "belongs in [policy]"),
    ('[polcy]\naction_unknown = "deny"', "polcy", "did you mean 'policy'?"),
    ("policy = 3", "policy", "must be a table"),
    ('[broker]\nsocket_path = "run/b.sock"', "broker.socket_path", "not an absolute path"),
    ("[broker]\nsocket_mode = 438", "broker.socket_mode", "octal string"),
    ('[broker]\nsocket_mode = "0999"', "broker.socket_mode", "not an octal mode"),
    ('[broker]\nsocket_mode = "01777"', "broker.socket_mode", "not an octal mode"),
    ('[broker]\nsocket_group = ""', "broker.socket_group", "not a name"),
    (f'[broker]\nsocket_group = "{NO_SUCH_GROUP}"', "broker.socket_group", "no group"),
    ('[broker]\npid_file = "pid"', "broker.pid_file", "not an absolute path"),
    ("[broker]\nrequest_timeout = 0", "broker.request_timeout", "positive"),
    ("[broker]\nstepd_timeout = -1", "broker.stepd_timeout", "positive"),
    ("[broker]\nstepd_timeout = nan", "broker.stepd_timeout", "positive"),
    ("[broker]\ndecision_deadline = inf", "broker.decision_deadline", "positive"),
    ('[broker]\ndecision_deadline = "5"', "broker.decision_deadline", "got a string"),
    ("[broker]\ndecision_deadline = 5000", "broker.decision_deadline", "milliseconds"),
    ("[broker]\nrequest_timeout = true", "broker.request_timeout", "got a boolean"),
    ("[broker]\nworkers = true", "broker.workers", "expected an integer, got a boolean"),
    ("[broker]\nworkers = 0", "broker.workers", "outside 1..1024"),
    ("[broker]\nmax_connections = 1.5", "broker.max_connections", "got a float"),
    ("[broker]\nmax_per_uid = 0", "broker.max_per_uid", "outside 1..65536"),
    ("[broker]\nstepd_timeout = 6", "broker.stepd_timeout",
     "shorter than broker.decision_deadline"),
    ('[exempt]\nusers = "root"', "exempt.users", "expected an array"),
    ('[exempt]\nusers = ["root", "a b"]', "exempt.users", "item 1"),
    ("[exempt]\ngroups = [1]", "exempt.groups", "item 0: expected a string"),
    ("[callerid]\ndeadline = 0", "callerid.deadline", "positive"),
    ("[callerid]\ndeadline = 5", "callerid.deadline", "shorter than broker.decision_deadline"),
    ('[callerid]\nmethod = "slurmd"', "callerid.method", "auto, native, scontrol"),
    ('[callerid]\nscontrol_path = "scontrol"', "callerid.scontrol_path", "not an absolute path"),
    ('[callerid]\nmunge_path = ""', "callerid.munge_path", "not an absolute path"),
    ('[messages]\nno_jobs = "hi {usr}"', "messages.no_jobs", "uses the field {usr}"),
    ('[messages]\nno_jobs = "{}"', "messages.no_jobs", "allowed fields: {job}, {jobs}"),
    ('[messages]\nno_jobs = "{0}"', "messages.no_jobs", "uses the field {0}"),
    ('[messages]\nno_jobs = "{user.__class__}"', "messages.no_jobs", "uses the field"),
    ('[messages]\nno_jobs = "{user[0]}"', "messages.no_jobs", "uses the field"),
    ('[messages]\nadopt_failed = "{job:d}"', "messages.adopt_failed", "does not render"),
    ('[messages]\nunknown_source = "{"', "messages.unknown_source", "not a valid template"),
    ("[messages]\nno_node = 3", "messages.no_node", "expected a string"),
    (f'[messages]\nno_node = "{"x" * (MAX_MESSAGE_CHARS + 1)}"', "messages.no_node",
     f"at most {MAX_MESSAGE_CHARS}"),
    ('[messages]\nnojobs = "x"', "messages.nojobs", "did you mean 'no_jobs'?"),
    ('[slurm]\nconf_path = "slurm.conf"', "slurm.conf_path", "not an absolute path"),
    ("[sshd]\nexecutables = []", "sshd.executables", "is empty"),
    ('[sshd]\nexecutables = ["sshd"]', "sshd.executables", "item 0"),
    ('[admission]\non_deny = "restrict"', "admission.on_deny", "message, refuse"),
    ('[admission]\nkeys_dir = "run/k"', "admission.keys_dir", "absolute path"),
    ('[admission]\nkeys_file = "../x"', "admission.keys_file", "no '..'"),
    ("[adoption]\nearly = 1", "adoption.early", "true or false"),
    ('[log]\ntarget = "file"', "log.target", "syslog, stderr, auto"),
    ('[log]\nfacility = "authpirv"', "log.facility", "did you mean 'authpriv'?"),
    ('[log]\nident = ""', "log.ident", "not a name"),
]


@pytest.mark.parametrize(("text", "key", "problem"), ERRORS, ids=[e[1] for e in ERRORS])
def test_each_error_names_file_and_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    err = only_problem(tmp_path, text + "\n")
    assert err.key == key
    assert err.problems[0].key == key
    assert problem in err.problem, err.problem
    assert str(err) == f"{err.path}: {key}: {err.problem}"


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, '[policy]\naction_unknown = "x"\nfallthrough = 1\n'
                           "[broker]\nworkers = 0\n[bogus]\n")
    with pytest.raises(InvalidConfig) as info:
        load_config(path)
    err = info.value
    assert [p.key for p in err.problems] == [
        "policy.action_unknown", "policy.fallthrough", "broker.workers", "bogus",
    ]
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 4 problems:"
    for line, problem in zip(lines[1:], err.problems, strict=True):
        assert line == f"  {path}: {problem.key}: {problem.problem}"
    assert isinstance(err, ConfigError)


def test_combination_checks_wait_for_valid_keys(tmp_path: Path) -> None:
    # ignore_root=false is only reported once the file's other keys are valid
    err = only_problem(tmp_path, '[policy]\nignore_root = false\nfallthrough = "x"\n')
    assert err.key == "policy.fallthrough"


def test_invalid_config_requires_a_problem() -> None:
    with pytest.raises(ValueError, match="at least one"):
        InvalidConfig([])


# --------------------------------------------------------------------------- warnings

WARNINGS: list[tuple[str, str, str]] = [
    ('[policy]\naction_no_jobs = "ignore"\nfallthrough = "allow"', "policy.action_no_jobs",
     "users without jobs get in"),
    ('[policy]\naction_generic_failure = "allow"', "policy.action_generic_failure",
     "unconfined"),
    ('[policy]\nfallthrough = "allow"', "policy.action_generic_failure", "unconfined"),
    ('[policy]\naction_adopt_failure = "allow"', "policy.action_adopt_failure", "recommends"),
    ('[policy]\naction_unknown = "allow"', "policy.action_unknown", "unconfined"),
    ('[broker]\nsocket_mode = "0600"', "broker.socket_mode", "lets no user connect"),
    (f'[broker]\nsocket_mode = "0640"\nsocket_group = "{SOME_GROUP.gr_name}"',
     "broker.socket_mode", "lets no user connect"),
    ("[broker]\nmax_per_uid = 600", "broker.max_per_uid", "never applies"),
    ("[broker]\ndecision_deadline = 9", "broker.decision_deadline", "--timeout"),
    (f'[exempt]\ngroups = ["{NO_SUCH_GROUP}"]', "exempt.groups", "no reload needed"),
]


@pytest.mark.parametrize(("text", "key", "warning"), WARNINGS, ids=[w[1] for w in WARNINGS])
def test_warnings_name_file_and_key(tmp_path: Path, text: str, key: str, warning: str) -> None:
    config = load_text(tmp_path, text + "\n")
    mine = [w for w in config.warnings if w.startswith(f"{config.path}: {key}: ")]
    assert len(mine) == 1, config.warnings
    assert warning in mine[0]


def test_group_socket_mode_is_fine_with_a_group(tmp_path: Path) -> None:
    text = f'[broker]\nsocket_mode = "0660"\nsocket_group = "{SOME_GROUP.gr_name}"\n'
    assert load_text(tmp_path, text).warnings == ()


def test_ignore_with_deny_fallthrough_is_quiet(tmp_path: Path) -> None:
    assert load_text(tmp_path, '[policy]\naction_no_jobs = "ignore"\n').warnings == ()


# --------------------------------------------------------------------------- exemptions


def test_an_exempt_group_that_does_not_exist_yet_is_a_warning_not_an_error(
        tmp_path: Path) -> None:
    config = load_text(tmp_path, f'[exempt]\ngroups = ["{NO_SUCH_GROUP}"]\n')
    assert config.exempt.groups == frozenset({NO_SUCH_GROUP})
    assert any(NO_SUCH_GROUP in w and "no reload needed" in w for w in config.warnings)


def test_entry_directories_must_differ(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match=r"admission\.principals_dir"):
        load_text(tmp_path, '[admission]\nkeys_dir = "/run/x"\nprincipals_dir = "/run/x"\n')


def test_empty_exempt_users_is_allowed(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[exempt]\nusers = []\n").exempt.users == frozenset()


# --------------------------------------------------------------------------- messages


def test_message_fields_match_the_decision_kinds() -> None:
    names = {f.name for f in dataclasses.fields(Messages)}
    assert names == {kind.value for kind in Message}


def test_default_messages() -> None:
    messages = Messages()
    assert messages.render(Message.NO_JOBS) == (
        "Access denied by sshd-adopt: you have no active jobs on this node"
    )
    assert messages.render(Message.UNKNOWN_SOURCE) == (
        "Access denied by sshd-adopt: unable to determine source job"
    )
    assert messages.render(Message.ADOPT_FAILED, job=42) == (
        "Access denied by sshd-adopt: failed to adopt the session into job 42"
    )
    assert messages.render(Message.NO_NODE) == (
        "Access denied by sshd-adopt: this host is not a Slurm compute node (no NodeName)"
    )


def test_render_fills_missing_fields_and_keeps_literal_braces() -> None:
    messages = Messages(no_jobs="{{{user}}} on {node}: {jobs!r}")
    assert messages.render(Message.NO_JOBS, user="bob") == "{bob} on ?: '?'"


def test_render_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="nodes"):
        Messages().render(Message.NO_JOBS, nodes="x")


def test_render_clips_long_expansions() -> None:
    text = Messages(unknown_source="jobs: {jobs}").render(
        Message.UNKNOWN_SOURCE, jobs=",".join(map(str, range(10_000)))
    )
    assert len(text) == MAX_MESSAGE_CHARS
    assert text.endswith("...")


def test_messages_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="uses the field"):
        Messages(no_node="{host}")


# --------------------------------------------------------------------------- parse_option


@pytest.mark.parametrize(("key", "text", "value"), [
    ("action_no_jobs", "ignore", NoJobsAction.IGNORE),
    ("action_unknown", "Newest", UnknownAction.NEWEST),
    ("action_adopt_failure", "allow", AdoptFailureAction.ALLOW),
    ("action_generic_failure", "DENY", GenericFailureAction.DENY),
    ("fallthrough", "allow", FallThrough.ALLOW),
    ("disable_x11", "1", True),
    ("disable_x11", "0", False),
    ("single_job_skip_rpc", "true", True),
    ("single_job_skip_rpc", "FALSE", False),
    ("ignore_root", "1", True),
    ("nodename", "node7", "node7"),
    ("log_level", "debug3", LogLevel.DEBUG3),
    ("log_level", "0", LogLevel.QUIET),
])
def test_parse_option(key: str, text: str, value: object) -> None:
    parsed = parse_option(key, text)
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize(("key", "text", "problem"), [
    ("action_unknown", "newestFOO", "newest, allow, deny"),  # upstream: prefix → newest
    ("action_unknown", "", "newest, allow, deny"),
    ("disable_x11", "yes", "1, true, 0, false"),
    ("disable_x11", "10", "1, true, 0, false"),
    ("log_level", "10", "0..9"),  # upstream clamps to 9
    ("log_level", " 3", "0..9"),
    ("log_level", "+3", "0..9"),
    ("log_level", "\u0663", "0..9"),  # ARABIC-INDIC DIGIT THREE: int() would take it
    ("nodename", "a/b", "node name"),
    ("acton_unknown", "deny", "did you mean 'action_unknown'?"),
    ("service", "sshd", "sshd_config Match"),
])
def test_parse_option_errors_name_the_key(key: str, text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        parse_option(key, text)
    assert str(info.value).startswith(f"{key}: ")


# --------------------------------------------------------------------------- overrides


def _strictness_cases() -> list[tuple[str, str, str]]:
    return [
        (key, current, new)
        for key, order in STRICTNESS.items()
        for current, new in itertools.product(order, order)
    ]


@pytest.mark.parametrize(("key", "current", "new"), _strictness_cases())
def test_overrides_may_only_tighten(key: str, current: str, new: str) -> None:
    base = replace(Options(), **{key: parse_option(key, current)})
    result, rejected = apply_overrides(base, {key: new}, source="test")
    order = STRICTNESS[key]
    if order.index(new) >= order.index(current):
        assert rejected == []
        assert str(getattr(result, key)) == new
        assert getattr(result, key) == parse_option(key, new)  # typed, not a str
    else:
        assert result == base
        assert len(rejected) == 1
        assert rejected[0].startswith(f"test: {key}={new!r} rejected: less strict than")


def test_strictness_covers_every_enum_value() -> None:
    for key, order in STRICTNESS.items():
        current = getattr(Options(), key)
        assert set(order) == {member.value for member in type(current)}, key


def test_policy_keys_are_the_options_fields() -> None:
    fields = {f.name for f in dataclasses.fields(Options)}
    assert set(values.POLICY) == fields
    assert set(STRICTNESS) <= fields
    assert fields >= FREE_OVERRIDES


@pytest.mark.parametrize(("key", "text", "value"), [
    ("single_job_skip_rpc", "0", False),
    ("disable_x11", "1", True),
    ("disable_x11", "0", False),
    ("log_level", "debug5", LogLevel.DEBUG5),
    ("log_level", "quiet", LogLevel.QUIET),
])
def test_free_overrides_are_accepted(key: str, text: str, value: object) -> None:
    result, rejected = apply_overrides(Options(), {key: text}, source="test")
    assert rejected == []
    assert getattr(result, key) == value


@pytest.mark.parametrize(("key", "text", "problem"), [
    ("nodename", "other", "may not be overridden"),
    ("ignore_root", "1", "may not be overridden"),
    ("ignore_root", "0", "may not be overridden"),
    ("action_unknonw", "deny", "did you mean 'action_unknown'?"),
    ("bogus", "1", "unknown option"),
    ("service", "*", "pam_slurm_adopt option"),
    ("action_unknown", "newestFOO", "newest, allow, deny"),
    ("disable_x11", "yes", "1, true, 0, false"),
    ("log_level", "11", "0..9"),
])
def test_refused_overrides_are_reported_not_raised(key: str, text: str, problem: str) -> None:
    result, rejected = apply_overrides(Options(), {key: text}, source="wrapper pid 7")
    assert result == Options()
    assert len(rejected) == 1
    assert rejected[0].startswith(f"wrapper pid 7: {key}={text!r} rejected: ")
    assert problem in rejected[0]


def test_a_refusal_does_not_block_the_other_overrides() -> None:
    result, rejected = apply_overrides(
        Options(),
        {"action_unknown": "allow", "action_adopt_failure": "deny", "fallthrough": "deny",
         "action_generic_failure": "deny", "disable_x11": "1"},
        source="s",
    )
    assert len(rejected) == 1 and "action_unknown" in rejected[0]
    assert result == dataclasses.replace(
        Options(), action_generic_failure=GenericFailureAction.DENY, disable_x11=True
    )


def test_no_overrides_return_the_same_options() -> None:
    options = Options()
    assert apply_overrides(options, {}, source="s") == (options, [])


def test_untrusted_text_is_escaped_and_clipped_in_refusals() -> None:
    _, rejected = apply_overrides(Options(), {"evil\nkey": "x" * 1000}, source="s")
    assert len(rejected) == 1
    assert "\n" not in rejected[0]
    assert "'evil\\nkey'" in rejected[0]
    assert len(rejected[0]) < 200


# --------------------------------------------------------------------------- shipped files


#: Keys that are unset by default: the example shows them commented out with a
#: sample value, which the tests leave commented out.
UNSET_BY_DEFAULT = frozenset({"policy.nodename", "broker.socket_group"})


def _example() -> str:
    return (REPO / "etc" / "sshd-adopt.toml.example").read_text()


def _uncommented_example() -> str:
    """The example file with its commented-out ``# key = value`` lines enabled."""
    unset = "|".join(key.split(".")[1] for key in UNSET_BY_DEFAULT)
    return re.sub(rf"(?m)^# ?(?!(?:{unset}) )([a-z_0-9]+ = )", r"\1", _example())


#: The one setting the example file makes (the admin group the shipped drop-in's
#: ``Match Group slurmusers,!clusteradm`` leaves out, which the sweeper must spare too).
EXAMPLE_EXEMPT = cfg.Exemptions(groups=frozenset({"clusteradm"}))


def _defaults_but_exempt(path: str, loaded: Config) -> Config:
    return dataclasses.replace(Config(path=path), exempt=EXAMPLE_EXEMPT, warnings=loaded.warnings)


def test_example_file_loads_to_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, _uncommented_example())
    loaded = load_config(path)
    assert loaded == _defaults_but_exempt(path, loaded)
    commented = write(tmp_path, _example(), "c.toml")
    loaded = load_config(commented)
    assert loaded == _defaults_but_exempt(commented, loaded)
    # Nothing else: a missing group is the only warning the example may cause.
    assert all("clusteradm" in warning for warning in loaded.warnings)


def test_example_file_and_reference_doc_cover_every_key() -> None:
    enabled = _uncommented_example()
    docs = (REPO / "docs" / "configuration.md").read_text()
    for section, schema in loader.SECTIONS.items():
        assert f"[{section}]" in enabled
        for key in schema:
            dotted = f"{section}.{key}"
            prefix = "# " if dotted in UNSET_BY_DEFAULT else ""
            assert re.search(rf"(?m)^{prefix}{key} = ", enabled), f"{dotted} not in example"
            assert f"`{dotted}`" in docs, f"{dotted} not in docs"


# --------------------------------------------------------------------------- value converters


@pytest.mark.parametrize(("value", "ok"), [
    (1, True), (1024, True), (0, False), (1025, False), (-3, False), (True, False), (2.0, False),
    ("4", False),
])
def test_counts_are_integers_within_their_bounds(value: object, ok: bool) -> None:
    convert = values.count_upto(1024)
    if ok:
        assert convert(value) == value
    else:
        with pytest.raises(InvalidValue):
            convert(value)


@pytest.mark.parametrize(("value", "ok"), [
    (0.001, True), (1, True), (values.MAX_SECONDS, True), (values.MAX_SECONDS + 1, False),
    (0, False), (-1, False), (float("inf"), False), (float("nan"), False), (False, False),
    ("2", False),
])
def test_seconds_are_positive_finite_and_plausible(value: object, ok: bool) -> None:
    if ok:
        assert values.positive_seconds(value) == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidValue):
            values.positive_seconds(value)


def test_a_choice_is_one_of_the_allowed_words() -> None:
    convert = values.one_of(("message", "refuse"))
    assert convert("refuse") == "refuse"
    for bad in ("restrict", "", 3):
        with pytest.raises(InvalidValue):
            convert(bad)


@pytest.mark.parametrize("path", ["", "a\x00b", "../keys", ".ssh/../../etc/shadow", "a/.."])
def test_keys_files_never_climb_out_of_the_home(path: str) -> None:
    with pytest.raises(InvalidValue):
        values.keys_file(path)
    assert values.keys_file(".ssh/authorized_keys..bak") == ".ssh/authorized_keys..bak"


def test_an_optional_value_may_be_empty_and_is_checked_otherwise() -> None:
    convert = values.optional(values.keys_file)
    assert convert("") == ""
    assert convert("%h/.principals") == "%h/.principals"
    with pytest.raises(InvalidValue):
        convert("../x")


def test_a_suggestion_names_the_one_closest_key() -> None:
    assert values.suggest("on_deni", ["on_deny", "timeout"]) == " (did you mean 'on_deny'?)"
    assert values.suggest("zzz", ["on_deny", "timeout"]) == ""


def test_admission_and_broker_settings_load(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[admission]\non_deny = "refuse"\nprincipals_file = ""\n'
                       'max_keys_bytes = 1024\n[broker]\nworkers = 3\n[callerid]\n'
                       'method = "native"\n')
    assert config.admission.on_deny == "refuse"
    assert config.admission.principals_file == ""
    assert config.admission.max_keys_bytes == 1024
    assert config.broker.workers == 3
    assert config.callerid.method == "native"
