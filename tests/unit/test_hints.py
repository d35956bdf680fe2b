"""The denial hint: parsing squeue, bounding it in time, and the text users see."""

from __future__ import annotations

import time
from pathlib import Path

from sshd_adopt._internal.slurm import hints


def fake_squeue(tmp_path: Path, body: str) -> str:
    script = tmp_path / "squeue"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_parse_skips_junk_and_sorts() -> None:
    text = "15 n[2-3]\nJOBID NODELIST\n12 n1\n\n13\n"
    assert hints.parse_squeue(text) == [(12, "n1"), (15, "n[2-3]")]


def test_running_jobs_passes_the_right_arguments(tmp_path: Path) -> None:
    args = tmp_path / "args"
    squeue = fake_squeue(tmp_path, f'printf "%s\\n" "$@" > {args}\necho "12 n1"\n'
                                   'echo "15 n[2-3]"\n')
    assert hints.running_jobs_elsewhere("alice", squeue=squeue) == [(12, "n1"), (15, "n[2-3]")]
    assert args.read_text().splitlines() == ["-h", "-u", "alice", "-t", "R", "-o", "%A %N"]


def test_running_jobs_empty_means_answered(tmp_path: Path) -> None:
    assert hints.running_jobs_elsewhere("alice", squeue=fake_squeue(tmp_path, "exit 0\n")) == []


def test_failure_and_missing_command_give_none(tmp_path: Path) -> None:
    failing = fake_squeue(tmp_path, "echo 'slurm_load_jobs error' >&2; exit 1\n")
    assert hints.running_jobs_elsewhere("alice", squeue=failing) is None
    assert hints.running_jobs_elsewhere("alice", squeue=str(tmp_path / "absent")) is None
    assert hints.running_jobs_elsewhere("alice", squeue="no-such-squeue-here") is None


def test_a_hung_slurmctld_costs_at_most_the_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    hung = fake_squeue(tmp_path, f"sleep 5; touch {marker}\n")
    start = time.monotonic()
    assert hints.running_jobs_elsewhere("alice", timeout=0.3, squeue=hung) is None
    assert time.monotonic() - start < 1.5


def test_format_hint() -> None:
    assert hints.format_hint([(12, "n1"), (15, "n[2-3]")]) == (
        "Your running jobs: 12 on n1, 15 on n[2-3]. "
        "To get a shell inside one: srun --jobid=12 --overlap --pty bash"
    )
    assert hints.format_hint([]) == "You have no running jobs."


def test_format_hint_is_bounded() -> None:
    text = hints.format_hint([(n, f"n{n}") for n in range(1, 501)])
    assert "and 495 more" in text and len(text) < 300
