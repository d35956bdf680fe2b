"""A minimal syslog sink for the lab.

Binds a unix datagram socket (the lab's /dev/log is a symlink to it inside the lab mount
namespaces only) and appends every message, one per line, to a log file. It exists so that
pam_slurm_adopt (which logs through syslog(3), facility authpriv) and anything else that
logs to /dev/log inside the lab leaves lines the tests can read, without running rsyslogd and
without touching the host's /dev/log.

Usage: syslog_sink.py SOCKET_PATH LOG_FILE
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import sys

FACILITIES = {
    0: "kern", 1: "user", 2: "mail", 3: "daemon", 4: "auth", 5: "syslog", 6: "lpr", 7: "news",
    8: "uucp", 9: "cron", 10: "authpriv", 11: "ftp", 16: "local0", 17: "local1", 18: "local2",
    19: "local3", 20: "local4", 21: "local5", 22: "local6", 23: "local7",
}
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def format_record(data: bytes) -> bytes:
    """Turn one raw syslog datagram into one log line (bytes, newline-terminated)."""
    text = data.decode("utf-8", errors="replace").rstrip("\n\x00")
    tag = "?"
    if text.startswith("<") and ">" in text[:6]:
        end = text.index(">")
        try:
            pri = int(text[1:end])
        except ValueError:
            pri = -1
        if pri >= 0:
            tag = f"{FACILITIES.get(pri >> 3, str(pri >> 3))}.{SEVERITIES[pri & 7]}"
            text = text[end + 1 :]
    stamp = dt.datetime.now().isoformat(timespec="milliseconds")
    line = f"{stamp} {tag} {text}".replace("\n", " ")
    return (line + "\n").encode()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    sock_path, log_path = argv[1], argv[2]
    if os.path.lexists(sock_path):
        os.unlink(sock_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    os.chmod(sock_path, 0o666)

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while True:
            data = sock.recv(65536)
            if data:
                os.write(fd, format_record(data))
    finally:
        os.close(fd)
        sock.close()
        if os.path.lexists(sock_path):
            os.unlink(sock_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
