"""Read and validate the TOML file: every problem at once, each naming the file and the key.

Why strict: pam_slurm_adopt compares option names and values on a fixed prefix
and silently keeps the default for anything it does not recognise
(``action_unknown=newestFOO`` means ``newest``, ``action_unknown=dney`` means
``newest`` too, with one syslog line). For a component that decides who gets
onto a compute node, a typo must stop the broker at start (or be refused by
``sshd-adoptd --check``), not quietly change the policy. So: unknown sections
and keys are errors (with a "did you mean"), types are checked exactly (a
boolean is not an integer), values must be whole words from the allowed set
(case-insensitive, as upstream), and combinations that cannot work are errors.

All problems of a file are collected and raised together as one
:class:`InvalidConfig` (a :class:`~sshd_adopt.errors.ConfigError`), one
problem per line, so an admin fixes the file in one pass. Combination checks
run only once every key is individually valid, since they would otherwise
reason about values we already know to be wrong.

Choices that are legal but let users in unconfined are not errors; they come
back as :attr:`Config.warnings`, which the broker logs at every start.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from logging.handlers import SysLogHandler
from typing import Any, Final, get_args

from sshd_adopt._internal import protocol
from sshd_adopt._internal.config.settings import (
    DEFAULT_CONFIG_PATH,
    AdmissionSettings,
    AdoptionSettings,
    BrokerSettings,
    CallerIdMethod,
    CallerIdSettings,
    Config,
    Exemptions,
    InvalidValue,
    LogSettings,
    LogTarget,
    Messages,
    OnDeny,
    SlurmSettings,
    SshdSettings,
    SweeperSettings,
)
from sshd_adopt._internal.config.values import (
    POLICY,
    UPSTREAM_ONLY,
    absolute_path,
    bool_toml,
    count_upto,
    keys_file,
    list_of,
    message_template,
    name_set,
    non_empty_paths,
    octal_mode,
    one_of,
    optional,
    plain_name,
    positive_seconds,
    suggest,
    toml_kind,
    want_str,
    words,
)
from sshd_adopt._internal.core.decision import Message
from sshd_adopt._internal.core.options import (
    AdoptFailureAction,
    FallThrough,
    GenericFailureAction,
    NoJobsAction,
    Options,
    UnknownAction,
)
from sshd_adopt.errors import ConfigError

#: The wrapper's default ``--timeout`` (``sshd_adopt/cli/wrapper.py``): the broker's
#: decision deadline should stay below it.
_WRAPPER_DEFAULT_TIMEOUT: Final = protocol.DEFAULT_WRAPPER_TIMEOUT


class InvalidConfig(ConfigError):
    """Every problem found in one configuration file, raised together.

    With one problem it reads exactly like that problem's
    :class:`~sshd_adopt.errors.ConfigError` (``path: key: problem``). With
    several, the message is ``path: N problems:`` followed by one complete
    ``path: key: problem`` line per problem, so each line can be grepped or
    logged on its own. :attr:`problems` holds them individually.
    """

    def __init__(self, problems: Iterable[ConfigError]) -> None:
        self.problems: tuple[ConfigError, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("InvalidConfig needs at least one problem")
        first = self.problems[0]
        if len(self.problems) == 1:
            super().__init__(first.path, first.key, first.problem)
        else:
            lines = "\n".join(f"  {problem}" for problem in self.problems)
            super().__init__(first.path, None, f"{len(self.problems)} problems:\n{lines}")



Schema = Mapping[str, Callable[[object], object]]

SECTIONS: Final[Mapping[str, Schema]] = {
    "policy": {key: spec.from_toml for key, spec in POLICY.items()},
    "broker": {
        "socket_path": absolute_path,
        "socket_mode": octal_mode,
        "socket_group": plain_name,
        "pid_file": absolute_path,
        "request_timeout": positive_seconds,
        "stepd_timeout": positive_seconds,
        "decision_deadline": positive_seconds,
        "workers": count_upto(1024),
        "max_connections": count_upto(65536),
        "max_per_uid": count_upto(65536),
        "proc_events": bool_toml,
        "reconcile_interval": positive_seconds,
        "spawn_socket": absolute_path,
    },
    "exempt": {"users": name_set, "groups": name_set},
    "callerid": {
        "deadline": positive_seconds,
        "method": one_of(get_args(CallerIdMethod)),
        "scontrol_path": absolute_path,
        "munge_path": absolute_path,
    },
    "messages": {kind.value: message_template for kind in Message},
    "slurm": {"conf_path": absolute_path},
    "sshd": {"executables": non_empty_paths},
    "log": {
        "target": one_of(get_args(LogTarget)),
        "facility": one_of(tuple(sorted(SysLogHandler.facility_names))),
        "ident": plain_name,
    },
    "admission": {
        "keys_dir": absolute_path,
        "principals_dir": absolute_path,
        "present_file": absolute_path,
        "keys_file": keys_file,
        "principals_file": optional(keys_file),
        "command_user": plain_name,
        "keys_command": want_str,
        "on_deny": one_of(get_args(OnDeny)),
        "message_shells": list_of(plain_name),
        "timeout": positive_seconds,
        "max_keys_bytes": count_upto(protocol.MAX_REPLY_FRAME // 2),
    },
    "adoption": {"early": bool_toml, "warm": bool_toml},
    "sweeper": {
        "enabled": bool_toml,
        "interval": positive_seconds,
        "grace": positive_seconds,
        "kill_after": positive_seconds,
    },
}


# --------------------------------------------------------------------------- loading


class _Loader:
    """Reads one parsed TOML document, collecting every problem and warning."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[ConfigError] = []
        self.warnings: list[str] = []

    def problem(self, key: str | None, text: str) -> None:
        self.problems.append(ConfigError(self.path, key, text))

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.path}: {key}: {text}")

    def _home_of(self, key: str) -> str | None:
        """The section that owns ``key``, for "belongs in [x]" hints."""
        return next((name for name, schema in SECTIONS.items() if key in schema), None)

    def document(self, doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Check every section and key; return the valid values per section."""
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for name, table in doc.items():
            if name not in SECTIONS:
                home = self._home_of(name)
                if home is not None:
                    self.problem(name, f"is not a section; it belongs in [{home}]")
                else:
                    self.problem(
                        name,
                        f"unknown section; sections: {words(SECTIONS)}"
                        + suggest(name, SECTIONS),
                    )
                continue
            if not isinstance(table, dict):
                self.problem(name, f"must be a table ([{name}]), got {toml_kind(table)}")
                continue
            values[name] = self.section(name, table)
        return values

    def section(self, name: str, table: Mapping[str, Any]) -> dict[str, Any]:
        schema = SECTIONS[name]
        out: dict[str, Any] = {}
        for key, raw in table.items():
            dotted = f"{name}.{key}"
            convert = schema.get(key)
            if convert is None:
                self.problem(dotted, self._unknown_key(name, key))
                continue
            try:
                out[key] = convert(raw)
            except InvalidValue as err:
                self.problem(dotted, str(err))
        return out

    def _unknown_key(self, section: str, key: str) -> str:
        if section == "policy" and key in UPSTREAM_ONLY:
            return UPSTREAM_ONLY[key]
        home = self._home_of(key)
        if home is not None:
            return f"unknown key in [{section}]; it belongs in [{home}]"
        keys = SECTIONS[section]
        return f"unknown key; [{section}] keys: {words(keys)}" + suggest(key, keys)

    def build(self, values: Mapping[str, Mapping[str, Any]]) -> Config:
        """Construct the settings from valid values; defaults fill the rest."""
        exempt = Exemptions(**values["exempt"])
        for group in sorted(exempt.groups):
            try:
                grp.getgrnam(group)
            except KeyError:
                self.warn("exempt.groups",
                          f"no group {group!r} exists (yet); it exempts its members as soon "
                          "as it does (no reload needed)")
        return Config(
            path=self.path,
            options=Options(**values["policy"]),
            broker=BrokerSettings(**values["broker"]),
            exempt=exempt,
            callerid=CallerIdSettings(**values["callerid"]),
            messages=Messages(**values["messages"]),
            slurm=SlurmSettings(**values["slurm"]),
            sshd=SshdSettings(**values["sshd"]),
            log=LogSettings(**values["log"]),
            admission=AdmissionSettings(**values["admission"]),
            adoption=AdoptionSettings(**values["adoption"]),
            sweeper=SweeperSettings(**values["sweeper"]),
        )

    def combinations(self, config: Config) -> None:
        """Errors for settings that cannot work together; warnings for ones that fail open."""
        options, broker = config.options, config.broker
        admission = config.admission
        if os.path.abspath(admission.keys_dir) == os.path.abspath(admission.principals_dir):
            self.problem("admission.principals_dir",
                         "must differ from admission.keys_dir (one entry per user in each)")
        if not options.ignore_root:
            self.problem(
                "policy.ignore_root",
                "cannot be false: pam_slurm_adopt forces it back to true in every "
                "configuration that can occur, and sshd-adopt always lets root in "
                "unadopted; remove the key (to keep root out, use sshd's PermitRootLogin)",
            )
        if broker.socket_group is not None:
            try:
                grp.getgrnam(broker.socket_group)
            except KeyError:
                self.problem(
                    "broker.socket_group",
                    f"no group {broker.socket_group!r} exists, so the socket cannot be given to it",
                )
        for key, seconds in (
            ("callerid.deadline", config.callerid.deadline),
            ("broker.stepd_timeout", broker.stepd_timeout),
        ):
            if seconds >= broker.decision_deadline:
                self.problem(
                    key,
                    f"{seconds:g} s must be shorter than broker.decision_deadline "
                    f"({broker.decision_deadline:g} s), which bounds the whole request",
                )
        self._warnings(config)

    def _warnings(self, config: Config) -> None:
        options, broker = config.options, config.broker
        open_fallthrough = options.fallthrough is FallThrough.ALLOW
        if options.action_no_jobs is NoJobsAction.IGNORE and open_fallthrough:
            self.warn(
                "policy.action_no_jobs",
                "'ignore' with fallthrough='allow': users without jobs get in",
            )
        if options.action_generic_failure is GenericFailureAction.ALLOW or (
            options.action_generic_failure is GenericFailureAction.IGNORE and open_fallthrough
        ):
            self.warn(
                "policy.action_generic_failure",
                "lets every user in unconfined whenever sshd-adopt cannot work "
                "(slurm.conf unreadable, node name unknown)",
            )
        if options.action_adopt_failure is AdoptFailureAction.ALLOW:
            self.warn(
                "policy.action_adopt_failure",
                "'allow' lets users in unconfined when adoption fails "
                "(pam_slurm_adopt's default; its documentation recommends 'deny')",
            )
        if options.action_unknown is UnknownAction.ALLOW:
            self.warn(
                "policy.action_unknown",
                "'allow' lets users with several jobs in unconfined when the source "
                "job cannot be determined",
            )
        group_ok = broker.socket_group is not None and broker.socket_mode & 0o020
        if not broker.socket_mode & 0o002 and not group_ok:
            self.warn(
                "broker.socket_mode",
                f"{broker.socket_mode:04o} lets no user connect to the broker "
                "(connecting needs write permission), so every wrapper request fails",
            )
        if broker.max_per_uid > broker.max_connections:
            self.warn(
                "broker.max_per_uid",
                f"{broker.max_per_uid} is above broker.max_connections "
                f"({broker.max_connections}), so it never applies",
            )
        if broker.decision_deadline >= _WRAPPER_DEFAULT_TIMEOUT:
            self.warn(
                "broker.decision_deadline",
                f"{broker.decision_deadline:g} s is not below the wrapper's default "
                f"--timeout ({_WRAPPER_DEFAULT_TIMEOUT:g} s): the wrapper may give up "
                "first; raise --timeout on the ForceCommand line",
            )

    def file_mode(self, st: os.stat_result) -> None:
        """Whoever can write this file decides who gets onto the node."""
        if st.st_mode & 0o002:
            self.problem(
                None, f"is writable by everyone (mode {st.st_mode & 0o7777:04o}); chmod o-w it"
            )
        elif st.st_mode & 0o020:
            self.warnings.append(
                f"{self.path}: is group-writable (mode {st.st_mode & 0o7777:04o}): "
                "members of its group control the login policy"
            )
        if os.geteuid() == 0 and st.st_uid != 0:
            self.warnings.append(
                f"{self.path}: is owned by uid {st.st_uid}, not root: "
                "that user controls the login policy"
            )


def load_config(path: str | None = None) -> Config:
    """Read and validate a configuration file.

    ``path`` None means :data:`DEFAULT_CONFIG_PATH`; if that file does not
    exist, the built-in defaults apply (with a warning), so a package works
    before the admin writes a file. A path given explicitly must exist: a
    mistyped ``--config`` must not silently run on defaults.

    Raises :class:`InvalidConfig` (a :class:`~sshd_adopt.errors.ConfigError`)
    listing every problem, or a plain ``ConfigError`` when the file cannot be
    read or is not TOML at all.
    """
    explicit = path is not None
    where = path if path is not None else DEFAULT_CONFIG_PATH
    loader = _Loader(where)
    try:
        with open(where, "rb") as handle:
            loader.file_mode(os.fstat(handle.fileno()))
            doc = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(where, None, "no such file") from None
        return Config(
            path=where,
            warnings=(f"{where}: no such file; using the built-in defaults",),
        )
    except OSError as err:
        raise ConfigError(where, None, f"cannot read: {err.strerror or err}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(where, None, f"not valid TOML: {err}") from None
    values = loader.document(doc)
    if loader.problems:
        raise InvalidConfig(loader.problems)
    config = loader.build(values)
    loader.combinations(config)
    if loader.problems:
        raise InvalidConfig(loader.problems)
    return dataclasses.replace(config, warnings=tuple(loader.warnings))


