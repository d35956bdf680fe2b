"""What sshd itself would run for a session: the program, its arguments, its environment.

Shared by the ForceCommand wrapper (which execs it) and the broker's privileged spawn
(which starts it inside a job's namespaces), so both run exactly the same thing. Pure
functions over builtins only: the wrapper imports this on every login.
"""

#: Variables the session never sees: the ForceCommand's own input (sshd sets
#: ``SSH_ORIGINAL_COMMAND`` for it) and the drop-in's ``SetEnv SHLVL=1``, which only
#: keeps Debian's bash from reading ``~/.bashrc`` for the wrapper's own shell.
HIDDEN = ("SSH_ORIGINAL_COMMAND", "SHLVL")
#: What a job exports into its sessions (from the broker's answer: ``env.<name>``).
EXPORTED = frozenset({"SLURM_JOB_ID", "DISPLAY", "XAUTHORITY"})


def session_argv(shell: str, command: str | None, sftp_server: str) -> list[str]:
    """sshd's argv for a session (``session.c: do_child``): ``-<shell name>`` for a login
    shell, else ``<shell name> -c <command>``; ``internal-sftp`` (a subsystem handed to a
    ForceCommand as its command line) becomes ``sftp_server`` with the same arguments,
    since the internal server lives inside sshd."""
    name = shell.rsplit("/", 1)[-1]
    if command is None:
        return ["-" + name]
    if command == "internal-sftp" or command.startswith("internal-sftp "):
        command = sftp_server + command[len("internal-sftp"):]
    return [name, "-c", command]


def session_environment(base: dict[str, str], exported: dict[str, str]) -> dict[str, str]:
    """The session's environment: ``base`` (what sshd gave the ForceCommand) without
    :data:`HIDDEN`, plus what the job exports (``SLURM_JOB_ID``, X11's ``DISPLAY``...)."""
    env = {key: value for key, value in base.items() if key not in HIDDEN}
    env.update(exported)
    return env
