"""Joining a job's extern step: the one place processes are put into a job.

Adoption goes through the job's slurmstepd (``REQUEST_ADD_EXTERN_PID``), never by
writing cgroup files: the stepd also does accounting and cleanup, and it refuses
anyone but root or SlurmUser (``src/slurmd/slurmstepd/req.c``). Before adding
anything, the step's owner is asked again (``REQUEST_STEP_UID``) and must be the
connection's user: the job list was filtered when it was read, but a job can end
and its id be reused, and a decision bug must not put a user into another's job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from sshd_adopt._internal.core.ports import Joined
from sshd_adopt._internal.core.state import BrokerState
from sshd_adopt._internal.logs import logger
from sshd_adopt._internal.slurm.stepd import StepdConnection, extern_socket_path
from sshd_adopt.errors import StepdError


class StepNotTheUsers(StepdError):
    """The extern step belongs to another uid than the one being adopted."""


class ExternStepClient:
    """:class:`~sshd_adopt._internal.core.ports.ExternSteps` through the real stepds."""

    def __init__(self, state: Callable[[], BrokerState],
                 namespaces_usable: Callable[[], bool] = lambda: True) -> None:
        self._state = state
        #: Whether sessions could enter a job's namespaces (the spawner is able to).
        self.namespaces_usable = namespaces_usable

    def join(self, job: int, uid: int, pids: Sequence[int], *, want_x11: bool,
             ask_namespaces: bool = True) -> Joined:
        """Add ``pids`` to ``job``'s extern step; the first (the sshd monitor) must succeed.

        The rest are added one by one, and one that exited meanwhile is skipped: its
        ancestor is in the job already. Returns the pids added and what the session
        exports (``SLURM_JOB_ID``; ``DISPLAY``/``XAUTHORITY`` for a job with X11).
        Raises :class:`StepNotTheUsers`, or another
        :class:`~sshd_adopt.errors.StepdError` when the step is gone or hung.
        """
        state = self._state()
        if not pids:
            raise ValueError("nothing to adopt")
        if state.nodename is None or state.spool_dir is None:
            raise StepdError("this node's NodeName or spool dir is unknown")
        path = extern_socket_path(state.spool_dir, state.nodename, job)
        adopted: list[int] = []
        with StepdConnection.open(path, timeout=state.config.broker.stepd_timeout) as stepd:
            owner = stepd.step_uid()
            if owner != uid:
                raise StepNotTheUsers(f"job {job} belongs to uid {owner}, not {uid}")
            stepd.add_extern_pid(pids[0])
            adopted.append(pids[0])
            for pid in pids[1:]:
                try:
                    stepd.add_extern_pid(pid)
                    adopted.append(pid)
                except StepdError as err:
                    logger().debug("pid %d not adopted into job %d: %s", pid, job, err)
            env = {"SLURM_JOB_ID": str(job)}
            if want_x11:
                display, xauthority = stepd.x11_display()
                if display:
                    env["DISPLAY"] = f"localhost:{display}.0"
                    if xauthority:
                        env["XAUTHORITY"] = xauthority
            namespaces = False
            if (ask_namespaces and state.slurm is not None and state.slurm.job_namespaces
                    and state.config.options.join_container and self.namespaces_usable()):
                # Asked only on nodes whose slurm.conf names a namespace plugin: every
                # other login keeps its one request per pid. The pids are in the job
                # already: a stepd that cannot say leaves the session outside the
                # namespace (as before), not unadopted.
                try:
                    found = stepd.namespace_fds()
                except StepdError as err:
                    logger().warning("job %d: its namespaces could not be asked (%s); the "
                                     "session sees the node's /tmp", job, err)
                    found = []
                for _kind, fd in found:
                    os.close(fd)
                namespaces = bool(found)
        for pid in adopted:
            logger().debug("Process %d adopted into job %d", pid, job)
        return Joined(tuple(adopted), env, namespaces)

    def namespaces(self, job: int, uid: int) -> list[tuple[int, int]]:
        """``job``'s namespaces as ``(CLONE_NEW* type, descriptor)``, in the order to join
        them (empty: it has none); the caller closes the descriptors.

        Raises :class:`StepNotTheUsers` when the step is not ``uid``'s, another
        :class:`~sshd_adopt.errors.StepdError` when it is gone, hung or cannot say.
        """
        state = self._state()
        if state.nodename is None or state.spool_dir is None:
            raise StepdError("this node's NodeName or spool dir is unknown")
        path = extern_socket_path(state.spool_dir, state.nodename, job)
        with StepdConnection.open(path, timeout=state.config.broker.stepd_timeout) as stepd:
            owner = stepd.step_uid()
            if owner != uid:
                raise StepNotTheUsers(f"job {job} belongs to uid {owner}, not {uid}")
            return stepd.namespace_fds()
