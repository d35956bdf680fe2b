"""``sshd-adopt-keys``: sshd's AuthorizedKeysCommand, the auth-time gate.

sshd runs ``sshd-adopt-keys %u`` as the unprivileged
``AuthorizedKeysCommandUser`` while a user authenticates with a public key.
This asks the root broker whether the user may enter this node through this
connection and prints the user's keys only if so; with no keys printed, sshd
refuses the key ("Permission denied (publickey)"). The broker verifies who
we are and which connection we serve from /proc; the user name is the only
thing we say, and the broker checks it against the sshd monitor's own title.

Like the wrapper it imports almost nothing: it runs twice per publickey
login. It is bounded in time (sshd waits for it forever): on any failure it
prints nothing and exits non-zero, so the key is refused — a broken broker
locks managed users out, never lets them in unchecked (root and admins use
``AuthorizedKeysFile`` through sshd's ``Match`` and never reach us).
"""

import sys

from sshd_adopt._internal import protocol
from sshd_adopt.errors import BrokerProtocolError

USAGE = """\
usage: sshd-adopt-keys [--socket=PATH] [--timeout=SECONDS] USER

AuthorizedKeysCommand for sshd (run as AuthorizedKeysCommandUser): prints
USER's authorized keys if sshd-adoptd lets USER onto this node, else nothing.
  sshd_config:  AuthorizedKeysCommand /opt/sshd-adopt/bin/sshd-adopt-keys %u
"""

DEFAULT_TIMEOUT = 6.0


def ask(socket_path: str, user: str, timeout: float) -> dict[str, str]:
    """One "keys" request; the whole exchange is bounded by ``timeout``."""
    return protocol.exchange(socket_path, protocol.keys_request(user), timeout=timeout,
                             limit=protocol.MAX_REPLY_FRAME)


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 with keys on stdout, or non-zero with nothing on stdout."""
    args = sys.argv[1:] if argv is None else argv
    socket_path, timeout, users = protocol.DEFAULT_SOCKET, DEFAULT_TIMEOUT, []
    for arg in args:
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg.startswith("--socket="):
            socket_path = arg.partition("=")[2]
        elif arg.startswith("--timeout="):
            try:
                timeout = float(arg.partition("=")[2])
            except ValueError:
                raise SystemExit(f"sshd-adopt-keys: {arg!r} is not a number of seconds") from None
        elif arg.startswith("-"):
            raise SystemExit(f"sshd-adopt-keys: unknown option {arg!r}")
        else:
            users.append(arg)
    if len(users) != 1:
        raise SystemExit("sshd-adopt-keys: exactly one USER expected (sshd's %u)")
    try:
        reply = ask(socket_path, users[0], timeout)
    except (OSError, BrokerProtocolError) as err:
        sys.stderr.write(f"sshd-adopt-keys: broker unavailable: {err}\n")
        raise SystemExit(1) from None
    if reply.get("result") != protocol.KEYS:
        sys.stderr.write(f"sshd-adopt-keys: {users[0]}: {reply.get('message', 'refused')}\n")
        raise SystemExit(1)
    sys.stdout.write(reply.get("keys", ""))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
