"""Encode a MUNGE credential: libmunge through ctypes, else the ``munge`` CLI.

The callerid RPC needs one fresh credential per request (the receiving
munged rejects replays, so a credential cannot be cached). Forking the
``munge`` CLI costs a few milliseconds per login; calling ``munge_encode()``
in ``libmunge.so.2`` costs about one, so the library is the normal path and
the CLI only the fallback for hosts where ``libmunge2`` is not installed.

Both paths are bounded by a caller-supplied timeout, because a hung munged
must not hold a login longer than the callerid deadline:

* The CLI runs under ``subprocess.run(timeout=...)``, which kills it.
* ``munge_encode()`` cannot be interrupted and has its own, much longer
  retry/timeout schedule inside libmunge, so it runs in a short-lived daemon
  thread that we stop waiting for at the timeout. That thread finishes (and
  frees the credential) whenever libmunge gives up; at most
  :data:`MAX_PENDING` such threads may be outstanding, so a wedged munged
  cannot make us pile up threads one login at a time.

Credentials are not restricted to a uid (libslurm does the same for client
requests: ``SLURM_AUTH_UID_ANY``), and the TTL is munged's default.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sshd_adopt.errors import CallerIdError

LIBMUNGE = "libmunge.so.2"
MUNGE_CLI = "munge"
#: ``munge_opt_t`` value of MUNGE_OPT_SOCKET in munge.h (0.5.x).
_MUNGE_OPT_SOCKET = 8
_EMUNGE_SUCCESS = 0
#: Encodes allowed to be in flight at once, counting ones we gave up waiting for.
MAX_PENDING = 8
#: Upper bound on what we accept from the CLI (a credential is a few hundred bytes).
_MAX_CREDENTIAL = 16 * 1024


class MungeError(CallerIdError):
    """No credential: munged is down, hung, or neither libmunge nor the CLI exist."""


@dataclass(frozen=True)
class _LibMunge:
    """The handful of C entry points we call, with their prototypes set."""

    encode: Callable[..., Any]
    strerror: Callable[..., Any]
    ctx_create: Callable[..., Any]
    ctx_set: Callable[..., Any]
    ctx_destroy: Callable[..., Any]
    free: Callable[..., Any]


_lib: _LibMunge | None = None
_lib_missing = False
_lib_lock = threading.Lock()
_pending = threading.BoundedSemaphore(MAX_PENDING)


def _load() -> _LibMunge | None:
    """Load libmunge once; ``None`` (remembered) when the library is not installed."""
    global _lib, _lib_missing  # noqa: PLW0603 - a process-wide cache of one dlopen()
    with _lib_lock:
        if _lib is not None or _lib_missing:
            return _lib
        try:
            so = ctypes.CDLL(LIBMUNGE)
        except OSError:
            _lib_missing = True
            return None
        # free() must be the allocator libmunge used: the process's libc.
        libc = ctypes.CDLL(None)
        encode = so.munge_encode
        encode.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        encode.restype = ctypes.c_int
        strerror = so.munge_strerror
        strerror.argtypes = [ctypes.c_int]
        strerror.restype = ctypes.c_char_p
        ctx_create = so.munge_ctx_create
        ctx_create.argtypes = []
        ctx_create.restype = ctypes.c_void_p
        # munge_ctx_set() is variadic; its one extra argument here is a char *.
        ctx_set = so.munge_ctx_set
        ctx_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        ctx_set.restype = ctypes.c_int
        ctx_destroy = so.munge_ctx_destroy
        ctx_destroy.argtypes = [ctypes.c_void_p]
        ctx_destroy.restype = None
        free = libc.free
        free.argtypes = [ctypes.c_void_p]
        free.restype = None
        _lib = _LibMunge(encode, strerror, ctx_create, ctx_set, ctx_destroy, free)
        return _lib


def libmunge_available() -> bool:
    """Whether ``libmunge.so.2`` can be loaded (decides which path :func:`encode` takes)."""
    return _load() is not None


def _encode_blocking(lib: _LibMunge, payload: bytes, socket_path: str | None) -> bytes:
    """Call ``munge_encode()`` and copy the credential out of C memory."""
    ctx: int | None = None
    if socket_path is not None:
        ctx = int(lib.ctx_create() or 0)
        if not ctx:
            raise MungeError("munge_ctx_create failed (out of memory)")
        rc = int(lib.ctx_set(ctx, _MUNGE_OPT_SOCKET, socket_path.encode()))
        if rc != _EMUNGE_SUCCESS:
            lib.ctx_destroy(ctx)
            raise MungeError(f"munge_ctx_set(socket): {_strerror(lib, rc)}")
    cred = ctypes.c_void_p()
    buf = ctypes.create_string_buffer(payload, len(payload))
    try:
        rc = int(lib.encode(ctypes.byref(cred), ctx, buf, len(payload)))
    finally:
        if ctx is not None:
            lib.ctx_destroy(ctx)
    try:
        if rc != _EMUNGE_SUCCESS:
            raise MungeError(f"munge_encode: {_strerror(lib, rc)}")
        if not cred.value:
            raise MungeError("munge_encode returned no credential")
        return ctypes.string_at(cred.value)
    finally:
        # On failure libmunge leaves *cred NULL; free(NULL) is a no-op.
        lib.free(cred)


def _strerror(lib: _LibMunge, rc: int) -> str:
    """munge_strerror() as text, with the numeric code for the log."""
    text = lib.strerror(rc)
    message = text.decode(errors="replace") if isinstance(text, bytes) else "unknown error"
    return f"{message} (munge error {rc})"


def encode_libmunge(payload: bytes, *, timeout: float, socket_path: str | None = None) -> bytes:
    """Encode through libmunge, waiting at most ``timeout`` seconds.

    Raises :class:`MungeError` if the library is missing, munged refuses, or
    the call outlives ``timeout`` (the call is then abandoned to its thread).
    """
    lib = _load()
    if lib is None:
        raise MungeError(f"{LIBMUNGE} is not installed")
    if timeout <= 0:
        raise MungeError("no time left to encode a munge credential")
    if not _pending.acquire(blocking=False):
        raise MungeError(f"{MAX_PENDING} munge_encode calls still pending: munged hung?")
    result: list[bytes] = []
    failure: list[MungeError] = []
    done = threading.Event()

    def work() -> None:
        try:
            result.append(_encode_blocking(lib, payload, socket_path))
        except MungeError as exc:
            failure.append(exc)
        finally:
            _pending.release()
            done.set()

    threading.Thread(target=work, name="munge-encode", daemon=True).start()
    if not done.wait(timeout):
        raise MungeError(f"munged did not answer within {timeout * 1000:.0f} ms")
    if failure:
        raise failure[0]
    return result[0]


def encode_cli(payload: bytes, *, timeout: float, socket_path: str | None = None) -> bytes:
    """Encode by running ``munge`` (payload on stdin, credential on stdout), killed at timeout."""
    if timeout <= 0:
        raise MungeError("no time left to encode a munge credential")
    argv = [MUNGE_CLI]
    if socket_path is not None:
        argv += ["--socket", socket_path]
    try:
        done = subprocess.run(
            argv, input=payload, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise MungeError(f"{MUNGE_CLI} is not installed (nor is {LIBMUNGE})") from exc
    except subprocess.TimeoutExpired as exc:
        raise MungeError(f"{MUNGE_CLI} did not finish within {timeout * 1000:.0f} ms") from exc
    except OSError as exc:
        raise MungeError(f"cannot run {MUNGE_CLI}: {exc}") from exc
    credential = done.stdout.strip()
    if done.returncode != 0:
        problem = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise MungeError(f"{MUNGE_CLI}: {problem}")
    if not credential.startswith(b"MUNGE:") or len(credential) > _MAX_CREDENTIAL:
        raise MungeError(f"{MUNGE_CLI} printed something that is not a credential")
    return credential


def encode(payload: bytes, *, timeout: float, socket_path: str | None = None) -> bytes:
    """Return a fresh ``MUNGE:...:`` credential (ASCII, no NUL) carrying ``payload``.

    libmunge when installed, else the CLI. A libmunge *failure* does not fall
    back to the CLI: both talk to the same munged, so the CLI would only fail
    again, later.
    """
    if libmunge_available():
        return encode_libmunge(payload, timeout=timeout, socket_path=socket_path)
    return encode_cli(payload, timeout=timeout, socket_path=socket_path)
