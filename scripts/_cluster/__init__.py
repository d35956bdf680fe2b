"""The lab harness behind scripts/cluster (the entry point: arguments, dispatch).

Where things are, in the order ``scripts/cluster up`` needs them:

  generation.py  the lab generations (bookworm, trixie), the hosts, and the one this run
                 works on: read its paths as ``lab.RUN``, ``lab.VAR``, ... at call time
  util.py        say/debug, run (a command, LabError on failure), write_if_changed, fill
                 (scripts/lab/*.in templates), digest, tail, wait_for
  host.py        packages, a chroot generation's Debian root, lab users and keys, munge key
  lab_venv.py    the venv with this checkout installed, and the check that it is this one
  configs.py     every config file (Slurm, hosts, ssh, PAM, sshd-adopt) and their digests
  namespaces.py  the hosts' namespaces: creating, entering (nsenter), removing
  processes.py   pids with start times, stopping them, processes in the lab's namespaces
  daemons.py     which daemon runs where, starting and stopping them, state.json
  slurm.py       queue and node states, the trivial job, recovery after slurmctld crashed
  commands.py    cmd_up, cmd_down, cmd_status, cmd_exec, cmd_reinstall, cmd_sysnode,
                 cmd_job_container
  jobcontainer.py  Slurm's tmpfs job container (job-container on|off): its flag, the
                 slurm.conf line and job_container.conf
  cgroupv2.py    cgroup v2 nodes on this hybrid host (forky): the shim for slurmd
  kerberos.py    the lab's Kerberos realm (an MIT KDC on ctl) for GSSAPI logins
  sysnode.py     forky's node s1, booted with systemd as its init (sysnode up|down|status)

Helper programs the lab runs as processes (standalone scripts, not imported):

  syslog_sink.py  the lab's /dev/log, written to <log dir>/syslog.log
  rootsquash.py   a FUSE mount that hides fay's home from root, as NFS root_squash does
"""
