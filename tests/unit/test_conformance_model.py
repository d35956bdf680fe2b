"""The conformance suite's own logic: reading the probe and per-release expectations."""

from __future__ import annotations

from tests.conformance.matrix import BY_KEY, Expectation, Scenario
from tests.conformance.model import Observation, Row, parse_probe

V1 = ("@@ JOB=7 DISPLAY= XAUTHORITY= PID=42\n"
      "4:memory:/slurm_n1/uid_2001/job_7/step_extern\n0::/\n@@L42 7 extern\n")
V2 = ("@@ JOB=7 DISPLAY= XAUTHORITY= PID=42\n4:memory:/process_api/x\n"
      "0::/system.slice/f1_slurmstepd.scope/sFQDM8MTQH8E00/step_extern/user/task_special\n"
      "@@L42 7 extern\n")


def test_a_v1_memory_line_names_the_job() -> None:
    obs = parse_probe(0, V1, "", {7: "A"}, 0.1)
    assert (obs.cgroup, obs.job_env, obs.listpids) == ("A (extern)", "A", "listed")


def test_a_v2_unified_line_names_the_job_through_its_sluid() -> None:
    obs = parse_probe(0, V2, "", {7: "A"}, 0.1,
                      job_of_sluid={"sFQDM8MTQH8E00": 7}.get)
    assert (obs.cgroup, obs.listpids) == ("A (extern)", "listed")
    unknown = parse_probe(0, V2, "", {7: "A"}, 0.1)
    assert unknown.cgroup == "other job (extern)"


def _obs(job: str) -> Observation:
    return Observation("allowed", 0, "", f"{job} (extern)", job, "unset", "listed")


def test_a_release_of_its_own_is_expected_there_only() -> None:
    scenario = BY_KEY["several_login"]
    differs = Row.compare("several_login", _obs("J1"), _obs("J3 (newest)"))
    same = Row.compare("several_login", _obs("J3 (newest)"), _obs("J3 (newest)"))
    assert scenario.check(same) == []
    assert scenario.check(differs)  # 22.05, 24.11: both must take the newest
    on_2605 = scenario.for_release("slurm-26.05")
    assert on_2605.check(differs) == []
    assert on_2605.check(same) == []  # upstream's pick is arbitrary there
    assert on_2605.verdict(differs) == "differs on purpose"


def test_an_arbitrary_upstream_still_fails_on_other_fields() -> None:
    scenario = Scenario("k", "t", "s", "same", releases=(
        ("slurm-26.05", Expectation("differs on purpose", frozenset({"job_env"}),
                                    "why", upstream_arbitrary=True)),))
    other = Row.compare("k", _obs("J1"), Observation("refused", 255, "no", "none", "unset",
                                                     "unset", "-"))
    assert scenario.for_release("slurm-26.05").check(other)
