"""The broker's state: its configuration and what it knows of Slurm, swapped whole on SIGHUP."""

from __future__ import annotations

from dataclasses import dataclass

from sshd_adopt._internal.config import Config
from sshd_adopt._internal.slurm.facts import SlurmFacts


@dataclass(frozen=True)
class BrokerState:
    """Configuration and Slurm facts, replaced as a whole on reload.

    ``slurm`` is None when slurm.conf could not be read (``slurm_problem`` says why):
    root and exempt users still get in, everyone else meets ``action_generic_failure``.
    """

    config: Config
    slurm: SlurmFacts | None
    slurm_problem: str | None = None

    @property
    def nodename(self) -> str | None:
        """This node's Slurm NodeName (``policy.nodename`` wins; see ``load_slurm_facts``)."""
        return self.slurm.nodename if self.slurm is not None else None

    @property
    def spool_dir(self) -> str | None:
        """SlurmdSpoolDir with ``%n``/``%h`` expanded; None when the node is unknown."""
        return self.slurm.spool_dir if self.slurm is not None else None

    @property
    def node_known(self) -> bool:
        return self.nodename is not None and self.spool_dir is not None
