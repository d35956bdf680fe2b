"""The broker's configuration: one TOML file, validated strictly.

One file (default :data:`DEFAULT_CONFIG_PATH`) holds everything: the
pam_slurm_adopt options under their upstream names in ``[policy]``, and the
broker's own settings in the other sections. ``docs/configuration.md`` is the
reference for every key. The rooms: :mod:`.settings` (what can be set, and the
defaults), :mod:`.values` (how each value is read), :mod:`.loader` (the file,
its errors and warnings) and :mod:`.overrides` (the tighten-only per-``Match``
options from the ForceCommand line).
"""

from sshd_adopt._internal.config.loader import InvalidConfig, load_config
from sshd_adopt._internal.config.overrides import apply_overrides, parse_option
from sshd_adopt._internal.config.settings import (
    DEFAULT_CONFIG_PATH,
    MAX_MESSAGE_CHARS,
    TEMPLATE_FIELDS,
    AdmissionSettings,
    AdoptionSettings,
    BrokerSettings,
    CallerIdMethod,
    CallerIdSettings,
    Config,
    Exemptions,
    LogSettings,
    LogTarget,
    Messages,
    SlurmSettings,
    SshdSettings,
    SweeperSettings,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_MESSAGE_CHARS",
    "TEMPLATE_FIELDS",
    "AdmissionSettings",
    "AdoptionSettings",
    "BrokerSettings",
    "CallerIdMethod",
    "CallerIdSettings",
    "Config",
    "Exemptions",
    "InvalidConfig",
    "LogSettings",
    "LogTarget",
    "Messages",
    "SlurmSettings",
    "SshdSettings",
    "SweeperSettings",
    "apply_overrides",
    "load_config",
    "parse_option",
]
