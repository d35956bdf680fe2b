"""Names appearing in and vanishing from one directory, from the kernel (inotify(7)).

Three libc calls and one fixed struct, through ctypes: a dependency for that would be
more code to trust in a root daemon than the few lines here.
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from dataclasses import dataclass
from typing import Final

_IN_MOVED_FROM: Final = 0x00000040
_IN_MOVED_TO: Final = 0x00000080
_IN_CREATE: Final = 0x00000100
_IN_DELETE: Final = 0x00000200
_IN_DELETE_SELF: Final = 0x00000400
_IN_MOVE_SELF: Final = 0x00000800
_IN_Q_OVERFLOW: Final = 0x00004000
_IN_IGNORED: Final = 0x00008000
_IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC
_EVENT: Final = struct.Struct("=iIII")  # wd, mask, cookie, len (then len bytes of name)
_WATCHED: Final = (_IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE_SELF
                   | _IN_MOVE_SELF | _IN_ONLYDIR)


class Change(enum.Enum):
    """What happened: a name came, a name went, events were lost, or the directory went."""

    APPEARED = "appeared"
    VANISHED = "vanished"
    OVERFLOW = "overflow"
    GONE = "gone"


@dataclass(frozen=True)
class DirEvent:
    change: Change
    name: str = ""


class DirWatch:
    """An inotify watch on one directory; :meth:`fileno` for ``select``, :meth:`read` to drain.

    Raises OSError (FileNotFoundError for a missing directory) when the watch cannot
    be set up.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = int(libc.inotify_add_watch(fd, os.fsencode(path), _WATCHED))
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"{path}: inotify_add_watch: {os.strerror(err)}", path)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[DirEvent]:
        """Every event queued now ([] when there is none)."""
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return []
        return parse_events(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse_events(data: bytes) -> list[DirEvent]:
    """Decode a buffer of ``struct inotify_event`` records (bounds checked)."""
    events: list[DirEvent] = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        if start + length > len(data):
            break
        name = data[start:start + length].split(b"\0", 1)[0].decode(errors="replace")
        offset = start + length
        if mask & _IN_Q_OVERFLOW:
            events.append(DirEvent(Change.OVERFLOW))
        elif mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
            events.append(DirEvent(Change.GONE))
        elif mask & (_IN_CREATE | _IN_MOVED_TO):
            events.append(DirEvent(Change.APPEARED, name))
        elif mask & (_IN_DELETE | _IN_MOVED_FROM):
            events.append(DirEvent(Change.VANISHED, name))
    return events
