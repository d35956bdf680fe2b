"""sshd-adopt: put OpenSSH sessions on Slurm compute nodes into the user's job.

Everything lives in :mod:`sshd_adopt._internal` (the broker, the Slurm protocol
clients, the decision logic) and :mod:`sshd_adopt.cli` (thin command-line entry
points). Only the version and the error root are public.
"""

__version__ = "0.1.0"
