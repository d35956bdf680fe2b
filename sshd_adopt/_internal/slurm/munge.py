"""Mint the MUNGE credential of a callerid request, worth nothing to anyone but slurmd.

The callerid RPC carries a credential to another host, so whoever receives it
may try to use it. Three properties make it useless to anyone but the slurmd
it is meant for (munge(1), ``munge_ctx_set``; Slurm's ``auth_p_create`` in
``src/plugins/auth/munge/auth_munge.c`` sets the same options):

* **minted as the connecting user**, not as root: slurmd's
  ``_rpc_network_callerid`` (``src/slurmd/slurmd/req.c``) answers an ordinary
  uid with the job only when that uid owns it, which is all the broker asks;
  root's credential would be accepted by other Slurm verifiers (srun's
  ``mpi/pmi2`` spawn handler takes any uid-0 credential);
* **restricted to the uid slurmd decodes as** (``SlurmdUser``, root by
  default: ``MUNGE_OPT_UID_RESTRICTION``), so no other user can decode it;
* **bound to the message body** by its payload (the caller passes the K12
  hash, :mod:`sshd_adopt._internal.slurm.callerid`), with the site's ``AuthInfo``
  ``ttl=`` and ``socket=``.

munged takes the identity from its socket's peer (``SO_PEERCRED``). The broker
mints in-process through libmunge (``munge_encode``, as libslurm does), on a
throwaway thread that takes the user's effective ids
(:func:`sshd_adopt._internal.node.fsids.call_as_peer`): 0.2 ms where running the
``munge`` CLI as the user costs ~8 ms of a forked broker. Where libmunge cannot be
loaded or the machine's per-thread ``setresuid`` is unknown, the ``munge`` CLI is run
through :mod:`sshd_adopt._internal.run` with the user's credentials instead. Either way
with a deadline: a hung munged costs a login at most the callerid deadline.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal import run
from sshd_adopt._internal.node import fsids
from sshd_adopt.errors import CallerIdError

MUNGE_CLI: Final = "/usr/bin/munge"
#: Upper bound on what we accept as a credential (one is a few hundred bytes).
MAX_CREDENTIAL: Final = 16 * 1024
#: The library libslurm's auth/munge plugin links (Debian's libmunge2).
LIBMUNGE: Final = "libmunge.so.2"
#: ``munge_opt_t`` values (``src/libmunge/munge.h``).
_MUNGE_OPT_TTL: Final = 4
_MUNGE_OPT_SOCKET: Final = 8
_MUNGE_OPT_UID_RESTRICTION: Final = 9
#: Encodes whose thread has not finished (munged hung): beyond this, refuse at once.
_PENDING: Final = threading.BoundedSemaphore(32)


class MungeError(CallerIdError):
    """No credential: munged is down, hung, refused, or the ``munge`` CLI is missing."""


@dataclass(frozen=True)
class CredentialOptions:
    """How a credential is minted: who may decode it, its lifetime and munged's socket.

    ``restrict_uid`` is SlurmdUser's uid; ``ttl`` and ``socket`` come from
    slurm.conf's ``AuthInfo`` (``None``: munged's defaults, as in libslurm).
    """

    restrict_uid: int
    ttl: int | None = None
    socket: str | None = None

    def argv(self, munge: str = MUNGE_CLI) -> list[str]:
        """The ``munge`` command line (payload on stdin, credential on stdout)."""
        argv = [munge, "--restrict-uid", str(self.restrict_uid)]
        if self.ttl:
            argv += ["--ttl", str(self.ttl)]
        if self.socket:
            argv += ["--socket", self.socket]
        return argv


def encode(
    payload: bytes,
    *,
    requester: run.Identity,
    options: CredentialOptions,
    timeout: float,
    munge: str = MUNGE_CLI,
) -> bytes:
    """Return a fresh ``MUNGE:...:`` credential (ASCII, no NUL) carrying ``payload``.

    Minted as ``requester`` (its uid and primary gid), through libmunge when it loads,
    else by the ``munge`` CLI at ``munge``. Raises :class:`MungeError` when munged
    refuses, does not answer within ``timeout`` seconds, or neither way is available.
    """
    library = _libmunge()
    if library is not None and fsids.peer_ids_supported():
        credential = _encode_in_process(library, payload, requester, options, timeout)
    else:
        credential = _encode_by_cli(payload, requester, options, timeout, munge)
    if not credential.startswith(b"MUNGE:") or b"\0" in credential:
        raise MungeError("munge returned something that is not a credential")
    return credential


@functools.cache
def _libmunge() -> ctypes.CDLL | None:
    """libmunge, loaded once with its prototypes; None when it is not installed."""
    try:
        library = ctypes.CDLL(LIBMUNGE)
    except OSError:
        return None
    library.munge_ctx_create.restype = ctypes.c_void_p
    library.munge_ctx_create.argtypes = []
    library.munge_ctx_destroy.restype = None
    library.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
    library.munge_ctx_strerror.restype = ctypes.c_char_p
    library.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
    library.munge_encode.restype = ctypes.c_int
    library.munge_encode.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                     ctypes.c_char_p, ctypes.c_int]
    library.munge_ctx_set.restype = ctypes.c_int  # variadic: arguments typed per call
    return library


_free = ctypes.CDLL(None).free
_free.argtypes = [ctypes.c_void_p]
_free.restype = None


def _encode_in_process(library: ctypes.CDLL, payload: bytes, requester: run.Identity,
                       options: CredentialOptions, timeout: float) -> bytes:
    if timeout <= 0:
        raise MungeError("munge: no time left to mint a credential")
    if os.geteuid() != 0 and requester.uid != os.geteuid():
        raise MungeError(f"munge: cannot mint as uid {requester.uid} without root")

    def mint() -> bytes:
        ctx = library.munge_ctx_create()
        if not ctx:
            raise MungeError("munge: out of memory (munge_ctx_create)")
        try:
            settings: list[tuple[int, object]] = [
                (_MUNGE_OPT_UID_RESTRICTION, ctypes.c_uint(options.restrict_uid))]
            if options.ttl:
                settings.append((_MUNGE_OPT_TTL, ctypes.c_int(options.ttl)))
            if options.socket:
                settings.append((_MUNGE_OPT_SOCKET, ctypes.c_char_p(os.fsencode(options.socket))))
            for option, value in settings:
                if library.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(option), value):
                    raise MungeError(f"munge: option {option} refused: {_problem(library, ctx)}")
            out = ctypes.c_void_p()
            if library.munge_encode(ctypes.byref(out), ctx, payload, len(payload)) != 0:
                raise MungeError(f"munge: {_problem(library, ctx)}")
            try:
                credential = ctypes.string_at(out)
            finally:
                _free(out)
            if len(credential) > MAX_CREDENTIAL:
                raise MungeError(f"munge: a credential of {len(credential)} bytes")
            return credential
        finally:
            library.munge_ctx_destroy(ctx)

    if os.geteuid() != 0:  # already the requester (tests, an unprivileged broker)
        return mint()
    try:
        return fsids.call_as_peer(requester.uid, requester.gid, mint, timeout=timeout,
                                  what="munge_encode", pending=_PENDING)
    except fsids.FsidsError as err:
        raise MungeError(str(err)) from err


def _problem(library: ctypes.CDLL, ctx: int) -> str:
    said = library.munge_ctx_strerror(ctx)
    return said.decode(errors="replace") if said else "unknown error"


def _encode_by_cli(payload: bytes, requester: run.Identity, options: CredentialOptions,
                   timeout: float, munge: str) -> bytes:
    try:
        done = run.run(options.argv(munge), input=payload, timeout=timeout,
                       as_user=requester, max_output=MAX_CREDENTIAL)
    except run.ToolError as err:
        raise MungeError(str(err)) from err
    if done.returncode != 0:
        raise MungeError(f"{munge}: {done.problem()}")
    return done.stdout.strip()
