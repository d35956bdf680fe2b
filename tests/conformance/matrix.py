"""The scenario matrix: what each row sets up and the verdict it is EXPECTED to get.

A row's expected verdict is part of the code on purpose: the suite computes the actual
verdict from what both front ends did and fails when they disagree, so that a behaviour
change on either side (an sshd-adopt regression, a different Slurm generation) shows up as a
failing test instead of a silently different report. ``differs on purpose`` names the exact
fields that differ and why; any other field differing too, or these fields no longer
differing, is a deviation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tests.conformance.model import Row, Verdict

GATE = ("sshd-adopt tells the refused user why in its own words (with hint lines on where "
        "their jobs run), and nothing of theirs runs on the node: their key is accepted "
        "`restrict`-ed, the drop-in's SetEnv SHLVL=1 keeps bash from reading ~/.bashrc, "
        "and the wrapper prints the reason; users whose shell would read a startup file "
        "anyway (zsh, fish...), and every user with admission.on_deny=\"refuse\", are refused "
        "during publickey authentication with sshd's \"Permission denied (publickey)\" and "
        "the reason in the broker log")


KEYLESS_REFUSAL = (
    "no key entry is consulted for a keyless login: the keyless profile's gate is sshd's "
    "PAM account phase (managed users' own service sshd-adopt on OpenSSH 9.8 and later, a "
    "block in /etc/pam.d/sshd before), so bob is refused where pam_slurm_adopt refuses "
    "him, before authentication succeeds; he reads sshd-adopt's fixed message, not "
    "pam_slurm_adopt's")


@dataclass(frozen=True)
class Expectation:
    """What a row is expected to give on one Slurm release where it differs from the rest."""

    expected: Verdict
    fields: frozenset[str] = frozenset()
    reason: str = ""
    #: pam_slurm_adopt's choice is not defined on this release (a bug of it), so its row
    #: may also come out "same", or differ in only some of ``fields``; sshd-adopt's side
    #: is still asserted by its own tests.
    upstream_arbitrary: bool = False


@dataclass(frozen=True)
class Scenario:
    """One row of the matrix."""

    key: str
    title: str
    setup: str  # what state both front ends face
    expected: Verdict
    fields: frozenset[str] = frozenset()  # the fields that differ on purpose
    reason: str = ""
    #: Slurm release ("slurm-26.05", as results files are named) -> its own expectation
    releases: tuple[tuple[str, Expectation], ...] = ()
    upstream_arbitrary: bool = False

    def for_release(self, release: str) -> Scenario:
        """This row as expected on ``release`` (its own expectation there, if any)."""
        own = dict(self.releases).get(release)
        if own is None:
            return self
        return dataclasses.replace(self, expected=own.expected, fields=own.fields,
                                   reason=own.reason, releases=(),
                                   upstream_arbitrary=own.upstream_arbitrary)

    def check(self, row: Row) -> list[str]:
        """Problems with ``row`` against the expectation (empty: as expected)."""
        if self.expected == "not run":
            return []
        if row.pam is None or row.adopt is None:
            return [f"{self.key}: not observed"]
        got = set(row.differing)
        if self.upstream_arbitrary and got <= self.fields:
            return []
        if self.expected == "same" and got:
            return [f"{self.key}: expected same, but {sorted(got)} differ"]
        if self.expected == "differs on purpose" and got != set(self.fields):
            return [f"{self.key}: expected exactly {sorted(self.fields)} to differ "
                    f"({self.reason}), got {sorted(got)}"]
        return []

    def verdict(self, row: Row | None) -> Verdict:
        """The ACTUAL verdict of ``row``: ``differs`` whenever it deviates from the matrix."""
        if self.expected == "not run" or row is None:
            return "not run"
        if not row.differing:
            return "same"
        return "differs on purpose" if not self.check(row) else "differs"


def _s(key: str, title: str, setup: str, expected: Verdict = "same",
       fields: tuple[str, ...] = (), reason: str = "",
       releases: tuple[tuple[str, Expectation], ...] = ()) -> Scenario:
    return Scenario(key, title, setup, expected, frozenset(fields), reason, releases)


#: Slurm 26.05's pam_slurm_adopt sorts a user's extern steps "newest first" with a
#: comparator that takes list_sort's pointers to list items for the items themselves
#: (``_sort_steps_by_start_time`` casts ``void *`` to ``step_loc_t *``; ``list_sort`` hands
#: qsort an array of pointers), so it compares bytes near that array, not start times: the
#: job it adopts into is whatever that order gives (seen in the lab: the oldest, the middle
#: and the newest of three). sshd-adopt's own pick, the newest, is asserted on every
#: generation by tests/integration/test_adoption.py::
#: test_several_jobs_newest_adopts_the_job_started_last.
NEWEST_26_05 = Expectation(
    "differs on purpose", frozenset({"cgroup", "job_env"}),
    "pam_slurm_adopt 26.05 does not take the newest job: its sort compares list_sort's "
    "pointers as if they were the steps (`_sort_steps_by_start_time`), so its pick is "
    "arbitrary (the oldest, the middle or the newest of three in different lab runs: any "
    "verdict is expected); sshd-adopt takes the extern stepd that started last",
    upstream_arbitrary=True)
#: The same, when one of the jobs has X11: the arbitrary pick may also differ in it.
NEWEST_26_05_X11 = dataclasses.replace(NEWEST_26_05,
                                       fields=frozenset({"cgroup", "job_env", "x11"}))


SCENARIOS: tuple[Scenario, ...] = (
    _s("root", "root", "alice has a job on n1; root logs in from login", "same"),
    _s("no_jobs_deny", "no jobs, action_no_jobs=deny", "bob (slurmusers) has no job on n1",
       "differs on purpose", ("stderr",),
       GATE),
    _s("no_jobs_ignore", "no jobs, action_no_jobs=ignore",
       "bob has no job; both sides set action_no_jobs=ignore",
       "differs on purpose", ("outcome", "exit", "stderr"),
       "design choice (fail closed): PAM_IGNORE lets the rest of the PAM stack decide "
       "(here pam_unix: success, so bob gets in unconfined); sshd-adopt has no next module "
       "and resolves ignore through policy.fallthrough, default deny"),
    _s("no_jobs_ignore_fallthrough_allow", "no jobs, ignore + fallthrough=allow",
       "as above, sshd-adopt also sets fallthrough=allow",
       "same", (), ""),
    _s("dave_unmanaged", "local user, not in slurmusers",
       "dave exists on the node with a key, is not in slurmusers, has no job",
       "differs on purpose", ("outcome", "exit", "stderr"),
       "design choice: sshd-adopt manages only the sshd Match group (slurmusers); "
       "pam_slurm_adopt applies to everyone in the PAM stack and refuses dave (no jobs)"),
    _s("dave_managed", "local user in slurmusers, never used Slurm",
       "dave added to slurmusers, no job", "differs on purpose", ("stderr",),
       GATE),
    _s("one_job", "one job", "alice has one job on n1", "same"),
    _s("x11_one_job", "X11 job",
       "alice's X server (Xvfb) on the login host; her job is `salloc --x11` on n1+n2 from "
       "there; ssh from login to n1", "same"),
    _s("x11_callerid", "X11 job, from inside it (callerid)",
       "as above, alice also holds an older plain job on n2; an `srun --overlap` step of "
       "the X11 job on n1 sshes to n2 (a login that hangs is ended after 20 s)", "same",
       (), "", (("slurm-26.05", Expectation(
           "differs on purpose",
           frozenset({"outcome", "exit", "stderr", "cgroup", "job_env", "x11", "listpids"}),
           "pam_slurm_adopt 26.05 hangs: on the callerid path it reads the stepd's X11 reply "
           "with protocol version 0 (the display only, reference §1.6), so the namespace-fd "
           "request that follows reads the xauthority bytes instead (`receive_fd_over_socket: "
           "CMSG_FIRSTHDR failed`, over and over) and the login never completes; sshd-adopt "
           "always reads the whole reply")),)),
    _s("x11_newest", "X11 job, the newest of several",
       "as above, ssh from login to n2 (no callerid: the newest job, the X11 one)", "same",
       (), "", (("slurm-26.05", NEWEST_26_05_X11),)),
    _s("disable_x11", "disable_x11 with an X11 job",
       "as the X11 job row, disable_x11 set on both sides", "same"),
    _s("x11_other_job", "X11 job and a newer plain job",
       "as above plus a plain job on n2 newer than the X11 job; ssh from login to n2 "
       "(the newest: the plain job)", "same", (), "", (("slurm-26.05", NEWEST_26_05_X11),)),
    _s("several_inside", "several jobs, from inside one (callerid)",
       "alice has another job on n2 and a job on n1+n2 whose batch step sshes to n2",
       "same"),
    _s("several_compute", "several jobs, from a compute node outside any job",
       "three jobs of alice on n2; ssh from n1 (slurmd there answers: no job)", "same", (),
       "both take the newest job: the lab's PAM line sets nodename=, so 22.05 finds the "
       "cgroup for its mtime comparison (without it, reference §5.6 would bite)",
       (("slurm-26.05", NEWEST_26_05),)),
    _s("several_login", "several jobs, from the login host",
       "three jobs of alice on n2; ssh from login (no slurmd: source unknown)", "same", (),
       "as above", (("slurm-26.05", NEWEST_26_05),)),
    _s("unknown_allow", "action_unknown=allow", "three jobs on n2, from login", "same"),
    _s("unknown_deny", "action_unknown=deny", "three jobs on n2, from login",
       "differs on purpose", ("stderr",), GATE),
    _s("adopt_failure_deny", "adoption fails, action_adopt_failure=deny",
       "one job; slurmstepd's ADD_EXTERN_PID fails for real for both (cgroup v1: its "
       "step_extern cpuset has no memory nodes, ENOSPC; cgroup v2: the kernel refuses the "
       "job's task cgroup, EAGAIN)", "differs on purpose", ("stderr",),
       "message names sshd-adopt and the job; upstream's says \"into cgroup\""),
    _s("adopt_failure_allow", "adoption fails, action_adopt_failure=allow",
       "as above, both sides set action_adopt_failure=allow", "differs on purpose",
       ("cgroup", "listpids"),
       "allow means unconfined in sshd-adopt (documented); upstream's session is left "
       "half-adopted by the failed ADD_EXTERN_PID (in the job's cgroups and listpids, "
       "without SLURM_JOB_ID): a side effect, not a policy",
       (("slurm-26.05", Expectation(
           "same", frozenset(),
           "on the cgroup v2 lab the stepd fails before it moves anything (it cannot make "
           "the job's task cgroup: cgroup.max.descendants 0 on step_extern/user), so "
           "neither session is in the job")),)),
    _s("stepd_hung", "the extern slurmstepd does not answer",
       "one job; its extern slurmstepd is SIGSTOPped for 6 s", "differs on purpose",
       ("cgroup", "job_env", "listpids"),
       "design choice (bounded): sshd-adopt gives up on the stepd after "
       "broker.stepd_timeout (2 s) and applies action_adopt_failure (allow on both sides "
       "in this row: the session runs outside the job); pam_slurm_adopt waits for as long "
       "as the stepd is stopped (no bound) and adopts once it resumes"),
    _s("job_starting", "job still starting (extern step not up)",
       "sbatch done and the job allocated to n1, but n1's slurmd is stopped so the "
       "extern step does not exist yet", "differs on purpose", ("stderr",),
       GATE),
    _s("job_ending", "the job ends while the session runs",
       "one job that ends 3 s after the login (its batch script exits)", "same"),
    _s("hostbased_one_job", "hostbased login, one job",
       "sshd-adopt's drop-in lets managed users in by hostbased (scripts/install "
       "--auth-methods); alice has one job on n1 and logs in from login by hostbased "
       "(ssh-keysign, shosts.equiv)", "same"),
    _s("hostbased_no_job", "hostbased login, no job",
       "as above, bob (no job) logs in by hostbased", "differs on purpose",
       ("stderr",), KEYLESS_REFUSAL),
    _s("gssapi_one_job", "GSSAPI login, one job",
       "the drop-in also lets managed users in by gssapi-with-mic; alice holds a ticket of "
       "the lab's realm (an MIT KDC on ctl) and has one job on n1", "same"),
    _s("gssapi_no_job", "GSSAPI login, no job",
       "as above, bob (ticket, no job) logs in by GSSAPI", "differs on purpose",
       ("stderr",), KEYLESS_REFUSAL),
    _s("pam_systemd", "pam_systemd in the PAM stack (node booted with systemd)",
       "26.05 lab only: node s1 boots systemd as its init, logind runs, and both sshds use "
       "Debian's PAM stack with pam_systemd (sshd-adopt's drop-in on port 22, "
       "pam_slurm_adopt in the account phase on port 2222); alice has one job on s1; the "
       "probe runs 10 s after login, then the job is cancelled", "differs on purpose",
       ("cgroup", "listpids", "dies", "exit", "stderr"),
       "pam_slurm_adopt adopts in PAM's account phase, then pam_systemd (session phase) "
       "moves the session into logind's session scope, out of the job: not counted to it, "
       "not ended with it (why Slurm's documentation tells sites to disable pam_systemd; "
       "exit and stderr follow: that session outlives the job, its client is killed); "
       "sshd-adopt adopts after the session phase, so the session is in the job, ends "
       "with it, and keeps its logind session and XDG_RUNTIME_DIR"),
    _s("nodename", "nodename differing from the hostname",
       "24.11 and 26.05 labs only (the 22.05 lab names its nodes after the hosts): alice has a "
       "job on host n1, whose Slurm NodeName is t1 (f1 on 26.05; NodeAddr = n1's address, "
       "t1 an /etc/hosts alias of n1); neither side is given nodename (every other row "
       "gives it to both)", "same",
       (), "pam_slurm_adopt finds t1 through the resolver's alias of the host name; "
       "sshd-adopt does no DNS lookups and finds it as the one NodeAddr that is an address "
       "of this host (where NodeAddr is a name, set policy.nodename)"),
)

BY_KEY = {scenario.key: scenario for scenario in SCENARIOS}
