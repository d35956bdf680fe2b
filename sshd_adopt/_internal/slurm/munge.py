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

The ``munge`` CLI is run through :mod:`sshd_adopt._internal.run` with the
user's credentials (munged takes the identity from its socket's peer), a fixed
environment and a deadline: a hung munged costs a login at most the callerid
deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sshd_adopt._internal import run
from sshd_adopt.errors import CallerIdError

MUNGE_CLI: Final = "/usr/bin/munge"
#: Upper bound on what we accept as a credential (one is a few hundred bytes).
MAX_CREDENTIAL: Final = 16 * 1024


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

    Minted as ``requester``. Raises :class:`MungeError` when munged refuses,
    does not answer within ``timeout`` seconds, or the CLI is missing.
    """
    try:
        done = run.run(options.argv(munge), input=payload, timeout=timeout,
                       as_user=requester, max_output=MAX_CREDENTIAL)
    except run.ToolError as err:
        raise MungeError(str(err)) from err
    credential = done.stdout.strip()
    if done.returncode != 0:
        raise MungeError(f"{munge}: {done.problem()}")
    if not credential.startswith(b"MUNGE:") or b"\0" in credential:
        raise MungeError(f"{munge} printed something that is not a credential")
    return credential
