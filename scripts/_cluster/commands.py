"""The scripts/cluster commands: up, down, status, exec, reinstall, sysnode, job-container.

``cmd_up`` is the one with a plan: install what is missing (packages or the chroot root,
users, munge key, venv), create the namespaces unless they exist with the same layout,
write the configs, then start in three phases (syslog sink and munged; slurmctld; the
rest), restarting what died or whose configuration changed, and finish with a trivial
job. ``teardown`` (``down``) undoes it in reverse. Each ``cmd_*`` takes the parsed
arguments and returns the exit status; errors are raised as ``LabError``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import time
from pathlib import Path

from . import cgroupv2, jobcontainer, kerberos, sysnode
from . import generation as lab
from .configs import DROPIN, broker_exe, skip_broker, skip_dropin, write_configs
from .daemons import (
    LAB_CGROUPS,
    apply_recorded_options,
    broker_cgroup,
    daemons,
    entry_alive,
    entry_target,
    load_state,
    load_state_file,
    save_state,
    start_daemon,
    stop_entries,
    validate_sshd_configs,
    wait_ready,
)
from .generation import COMPUTE, HOSTS, sname
from .host import ensure_munge_key, ensure_packages, ensure_root_users, ensure_users
from .lab_venv import ensure_venv
from .namespaces import (
    create_namespaces,
    in_host,
    layout_digest,
    mnt_ns_below_new_ones,
    mountpoints,
    namespaces_ok,
    nsenter,
    remove_namespaces,
)
from .processes import kill_and_wait, lab_processes
from .slurm import (
    CGROUP_CONTROLLERS,
    dirs_deepest_first,
    ensure_nodes_up,
    node_states,
    nodes_idle,
    reset_slurmds_after_crash,
    squeue_ids,
    trivial_job,
)
from .util import CLEAN_ENV, SCRIPT, LabError, say, tail, wait_for


def rotate_logs() -> None:
    prev = lab.LOG / "previous"
    if prev.exists():
        shutil.rmtree(prev)
    prev.mkdir(parents=True)
    for path in lab.LOG.iterdir():
        if path.is_file():
            path.rename(prev / path.name)


def fresh_slurm_state() -> None:
    # Only after teardown: the job containers' mounts went with the nodes' namespaces.
    for path in [lab.VAR / "slurmctld", *(lab.VAR / f"slurmd-{sname(n)}" for n in COMPUTE),
                 jobcontainer.base_path()]:
        if path.exists():
            shutil.rmtree(path)


def cmd_up(args: argparse.Namespace) -> int:
    """`up`: install, configure and start what is missing, dead or changed; 1 if an
    optional daemon (a broker) failed."""
    t0 = time.monotonic()
    if args.skip_broker:
        os.environ["SSHD_ADOPT_LAB_SKIP_BROKER"] = "1"
    if args.skip_dropin:
        os.environ["SSHD_ADOPT_LAB_SKIP_DROPIN"] = "1"
    ensure_packages()
    ensure_munge_key()
    if lab.GEN.root is not None:
        ensure_root_users()
    else:
        ensure_users()
    ensure_venv()
    state = load_state()
    fresh = not namespaces_ok()
    if not fresh and not state:
        say("namespaces exist but no daemon is recorded: starting over")
        fresh = True
    elif not fresh and load_state_file().get("layout") != layout_digest():
        say("the namespace layout changed: starting over")
        fresh = True
    elif not fresh and jobcontainer.enabled() and not mnt_ns_below_new_ones(COMPUTE):
        say("the job container needs node mount namespaces older (by id) than any new one, "
            "which these are not (Linux 6.18 ids, namespaces.next_mnt_ns_ids): starting over")
        fresh = True
    if fresh:
        say("creating namespaces (fresh start)")
        teardown(quiet=True)
        lab.LOG.mkdir(parents=True, exist_ok=True)
        rotate_logs()
        fresh_slurm_state()
        state = {}
        digests = write_configs()
        create_namespaces()
    else:
        digests = write_configs()
    kerberos.ensure_realm()
    validate_sshd_configs()
    if DROPIN.is_file() and not skip_dropin():
        say(f"sshd :22 includes the drop-in {DROPIN}")
    else:
        say(f"sshd :22 runs WITHOUT the drop-in ({DROPIN} missing or skipped)")
    if skip_broker():
        say("broker skipped (SSHD_ADOPT_LAB_SKIP_BROKER / --skip-broker)")
    elif not lab.GEN.in_root(broker_exe()).exists():
        say(f"broker not started: {lab.GEN.in_root(broker_exe())} does not exist yet")

    wanted = daemons()
    names = {d.name for d in wanted}
    # Daemons we started before but no longer want (e.g. broker skipped now).
    obsolete = [e for n, e in state.items() if n not in names]
    stop_entries(obsolete)
    state = {n: e for n, e in state.items() if n in names}

    # Restart what is dead or whose configuration changed.
    # slurmctld found dead (not stopped by us): it may have lost its newest jobs and will
    # hand their ids out again, which slurmds that saw those ids mishandle (no extern step:
    # the id is in their cred_state cache). See reset_slurmds_after_crash().
    ctld_crashed = not fresh and "slurmctld" in state and not entry_alive(state["slurmctld"])
    restart_slurmds = False
    for d in wanted:
        entry = state.get(d.name)
        changed = entry is not None and (
            entry.get("digest") != digests.get(d.name, entry.get("digest"))
            # how it is started (e.g. the brokers' privileges) counts as configuration too
            or entry.get("argv", d.argv) != d.argv)
        if entry_alive(entry) and changed:
            say(f"{d.name}: configuration changed, restarting")
            assert entry is not None
            stop_entries([entry])
            state.pop(d.name)
            if d.name == "slurmctld":
                restart_slurmds = True
    if restart_slurmds:
        stop_entries([state.pop(n) for n in list(state) if n.startswith("slurmd-")])

    if cgroupv2.enabled():
        cgroupv2.note_system_slice()
    phases = [
        [d for d in wanted if d.name in ("syslog", "munged")],
        [d for d in wanted if d.name == "slurmctld"],
        [d for d in wanted if d.name not in ("syslog", "munged", "slurmctld")],
    ]
    warnings = []
    for index, phase in enumerate(phases):
        if index == 2 and ctld_crashed:
            reset_slurmds_after_crash(state)
            save_state(state)
        started = []
        for d in phase:
            if entry_alive(state.get(d.name)):
                continue
            if d.name in state:
                say(f"{d.name}: was dead, restarting")
            entry = start_daemon(d)
            entry["digest"] = digests.get(d.name, "")
            state[d.name] = entry
            save_state(state)
            started.append(d)
        for d in started:
            try:
                wait_ready(d, state[d.name])
            except LabError as exc:
                if not d.optional:
                    raise
                warnings.append(str(exc))
                say(f"WARNING: {exc}")
    save_state(state)

    if not wait_for(nodes_idle, 45, 0.5):
        ensure_nodes_up()
        if not wait_for(nodes_idle, 20, 0.5):
            proc = in_host("ctl", "sinfo", "-N", check=False)
            raise LabError(
                "compute nodes not idle:\n" + proc.stdout + "".join(
                    f"\n--- tail of {lab.LOG}/slurmd-{sname(n)}.log\n"
                    f"{tail(lab.LOG / f'slurmd-{sname(n)}.log', 10)}"
                    for n in COMPUTE)
                + f"\n--- tail of {lab.LOG}/slurmctld.log\n{tail(lab.LOG / 'slurmctld.log', 15)}")
    trivial_job()
    say(f"cluster is up ({time.monotonic() - t0:.1f}s); logs in {lab.LOG}/, "
        f"pam_slurm_adopt/syslog lines in {lab.LOG}/syslog.log; "
        f"enter a host with: {SCRIPT} exec n1 -- CMD")
    if warnings:
        say(f"{len(warnings)} optional daemon(s) failed: the broker is not usable")
        return 1
    return 0


def teardown(quiet: bool = False) -> None:
    """Cancel jobs, stop the daemons and everything else in the lab namespaces, then
    remove the namespaces, the lab cgroups and the run dir."""
    if sysnode.supported():
        sysnode.cmd_down(quiet=quiet)
    state = load_state()
    have_ns = namespaces_ok()
    ctld = state.get("slurmctld")
    if have_ns and entry_alive(ctld):
        ids = squeue_ids()
        if ids:
            if not quiet:
                say(f"cancelling {len(ids)} job(s)")
            in_host("ctl", "scancel", *ids, check=False)
            wait_for(lambda: not squeue_ids(), 30, 0.5)
    # Stop in reverse start order, then anything else left in the lab namespaces
    # (slurmstepds, ssh sessions, strays started with `cluster exec`).
    order = [d.name for d in daemons()]
    names = sorted(state, key=lambda n: -order.index(n) if n in order else 0)
    for name in names:
        stop_entries([state[name]])
    kill_and_wait(lab_processes())
    remove_namespaces()
    remove_lab_cgroups()
    if lab.STATE_FILE.exists():
        lab.STATE_FILE.unlink()
    if lab.RUN.exists() and str(lab.NSDIR) not in mountpoints():
        shutil.rmtree(lab.RUN, ignore_errors=True)


def remove_lab_cgroups() -> None:
    """Remove the cgroups Slurm made for the lab nodes (slurm_<NodeName>, children first)
    and the brokers' own (scripts/_cluster/daemons.py: broker_cgroup)."""
    root = Path("/sys/fs/cgroup")
    dirs: list[Path] = []
    for ctrl in [*CGROUP_CONTROLLERS, "systemd", "unified", ""]:
        base = root / ctrl if ctrl else root
        for node in map(sname, COMPUTE):
            for name in (f"slurm_{node}", f"{node}_slurmstepd.scope"):
                top = base / name
                if top.is_dir():
                    dirs += dirs_deepest_first(top)
    # cgroup v2 nodes: their scopes, one slice deep on the host's cgroup2 hierarchy.
    if cgroupv2.enabled():
        for scope in cgroupv2.lab_cgroups(list(map(sname, COMPUTE))):
            dirs += dirs_deepest_first(scope)
    # The brokers' own cgroups (and the two each warms the migration path in).
    for node in COMPUTE:
        own = broker_cgroup(node)
        if own is not None and own.is_dir():
            dirs += dirs_deepest_first(own)
    for path in dirs:
        for _ in range(20):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
    with contextlib.suppress(OSError):  # the other generation's may still be there
        LAB_CGROUPS.rmdir()
    if cgroupv2.enabled():
        made = cgroupv2.lab_slice()
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()
                cgroupv2.forget_system_slice()


def cmd_down(args: argparse.Namespace) -> int:
    """`down`: teardown and a fresh Slurm state; --purge also deletes state and logs."""
    t0 = time.monotonic()
    teardown()
    fresh_slurm_state()
    if args.purge:
        for path in (lab.VAR, lab.LOG):
            shutil.rmtree(path, ignore_errors=True)
    say(f"cluster is down ({time.monotonic() - t0:.1f}s)")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    """`status`: the namespaces and every daemon; 1 if anything is down."""
    apply_recorded_options()
    state = load_state()
    ns_ok = namespaces_ok()
    ok = ns_ok
    print(f"namespaces: {'ok' if ns_ok else 'MISSING'} ({lab.NSDIR})")
    for d in daemons():
        entry = state.get(d.name)
        alive = ns_ok and entry_alive(entry)
        ok = ok and alive
        pid = entry.get("pid") if entry else "-"
        log = entry.get("log") if entry else (d.own_log or d.log)
        print(f"{d.name:18} {d.host:5} {'alive' if alive else 'DOWN':6} pid={pid!s:8} log={log}")
    if sysnode.supported():
        pid = sysnode.init_pid()
        print(f"note: the systemd node {sysnode.HOST} is "
              + (f"running (systemd pid {pid}; details: sysnode status)" if pid is not None
                 else "not booted (sysnode up boots it)"))
    if not DROPIN.is_file():
        print(f"note: {DROPIN} does not exist: sshd :22 runs without the drop-in")
    if skip_broker():
        print("note: the broker was skipped by the last `up`")
    elif not lab.GEN.in_root(broker_exe()).exists():
        print(f"note: {lab.GEN.in_root(broker_exe())} does not exist: no broker")
    if skip_dropin():
        print("note: the drop-in was skipped by the last `up`")
    return 0 if ok else 1


def cmd_exec(args: argparse.Namespace) -> int:
    """`exec`: replace this process with a command in a lab host's namespaces."""
    if args.host == sysnode.HOST and sysnode.supported():
        command = list(args.command) or ["/bin/bash", "-l"]
        if args.user:
            command = ["setpriv", "--reuid", args.user, "--regid", args.user, "--init-groups",
                       "--reset-env", "--", *command]
        argv = sysnode.enter(*command)
        os.execvp(argv[0], argv)
    if args.host not in HOSTS:
        raise LabError(f"unknown host {args.host!r}; hosts: {', '.join(HOSTS)}")
    if not namespaces_ok():
        raise LabError("the cluster is not up (run: scripts/cluster up)")
    command = list(args.command)
    if not command:
        command = ["/bin/bash", "-l"] if not args.user else ["/bin/bash"]
    wd = "/"
    if args.user:
        pw = pwd.getpwnam(args.user)
        wd = pw.pw_dir
        command = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                   "--reset-env", "--", *command]
    env = dict(os.environ) if args.keep_env else dict(CLEAN_ENV)
    argv = [*nsenter(args.host, wd=wd), *command]
    os.execvpe(argv[0], argv, env)
    return 127  # not reached


def cmd_sysnode(args: argparse.Namespace) -> int:
    """`sysnode up|down|status`: the compute node booted with systemd (sysnode.py)."""
    if args.action == "up":
        sysnode.cmd_up()
    elif args.action == "down":
        sysnode.cmd_down()
    else:
        return sysnode.cmd_status()
    return 0


def cmd_job_container(args: argparse.Namespace) -> int:
    """`job-container on|off|status`: Slurm's tmpfs job container (jobcontainer.py).

    on/off set the flag `up` reads, then, if the lab is up, cancel every job (a job that
    outlives the switch would keep, or miss, its container's mounts: slurmd removes them
    when a job ends only while it has the plugin) and run `up`, which restarts slurmctld
    and the slurmds whose configuration changed, waits for the nodes and runs the trivial
    job; then wait until every node is idle. Idempotent: nothing restarts when the running
    daemons already have the configuration asked for.
    """
    if args.action == "status":
        print("on" if jobcontainer.enabled() else "off")
        return 0
    t0 = time.monotonic()
    apply_recorded_options()  # `up` below starts what the last `up` was asked to start
    changed = jobcontainer.set_enabled(args.action == "on")
    if not namespaces_ok():
        say(f"job container {args.action}; the lab is not up: the next `up` applies it")
        return 0
    ctld = load_state().get("slurmctld")
    digests = write_configs()
    restart = not entry_alive(ctld) or (ctld or {}).get("digest") != digests["slurmctld"]
    if restart:
        ids = squeue_ids()
        if ids:
            say(f"cancelling {len(ids)} job(s): the Slurm daemons restart")
            in_host("ctl", "scancel", *ids, check=False)
            if not wait_for(lambda: not squeue_ids(), 60, 0.5):
                raise LabError(f"jobs still in the queue after scancel: {squeue_ids()}")
        # slurmd unmounts a job's container when the job has ended: wait for that
        slurmds = [t[0] for t in (entry_target(e) for n, e in load_state().items()
                                  if n.startswith("slurmd-")) if t is not None]

        def left() -> list[str]:
            return [point for pid in slurmds for point in jobcontainer.mounts(pid)]

        if not wait_for(lambda: not left(), 30, 0.5):
            say(f"WARNING: job containers still mounted: {left()}")
    rc = cmd_up(argparse.Namespace(skip_broker=False, skip_dropin=False))
    if restart:
        # As an admin would (systemctl reload sshd-adoptd): the brokers read slurm.conf
        # again, and with it whether jobs here have namespaces.
        reloading: dict[Path, int] = {}
        for name, entry in load_state().items():
            target = entry_target(entry) if name.startswith("sshd-adoptd-") else None
            log = lab.LOG / f"{name}.log"
            if target is not None and log.exists():
                reloading[log] = log.stat().st_size
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target[0], signal.SIGHUP)

        def reloaded() -> bool:
            return all(b"reloaded" in log.read_bytes()[size:]
                       for log, size in reloading.items())

        if not wait_for(reloaded, 15, 0.2):
            say("WARNING: not every broker logged its reload")
    nodes = {sname(n) for n in COMPUTE}
    # After a restart no job is left: every node goes back to idle (`up` ran the trivial job).
    if restart and not wait_for(lambda: all(node_states().get(n) == "idle" for n in nodes),
                                60, 0.5):
        raise LabError(f"compute nodes not idle: {node_states()}")
    jobcontainer.remove_empty_base()  # off: its directories, if empty
    if changed and sysnode.supported() and sysnode.init_pid() is not None:
        say(f"note: {sysnode.HOST} keeps its slurmd as it was booted: "
            "`sysnode down` and `sysnode up` make it follow")
    say(f"job container {args.action} ({time.monotonic() - t0:.1f}s)")
    return rc


def cmd_reinstall(_args: argparse.Namespace) -> int:
    """`reinstall`: install the checkout into the venv again and restart the brokers."""
    apply_recorded_options()
    ensure_venv(force=True)
    state = load_state()
    brokers = [n for n in state if n.startswith("sshd-adoptd-")]
    stop_entries([state.pop(n) for n in brokers])
    save_state(state)
    if not namespaces_ok():
        say("venv reinstalled; cluster not up, nothing to restart")
        return 0
    digests = write_configs()
    rc = 0
    for d in daemons():
        if not d.name.startswith("sshd-adoptd-"):
            continue
        entry = start_daemon(d)
        entry["digest"] = digests.get(d.name, "")
        state[d.name] = entry
        save_state(state)
        try:
            wait_ready(d, entry)
        except LabError as exc:
            say(f"WARNING: {exc}")
            rc = 1
    say("reinstalled; brokers restarted" if rc == 0 else "reinstalled; broker(s) failed")
    return rc
