"""The README opens with the two commands, and CI runs the second one."""

from __future__ import annotations

import re

from tests.helpers import REPO


def first_code_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_setup_plus_main_job_and_setup_plus_tests() -> None:
    main_job, tests = first_code_block()
    assert main_job.startswith("bash setup.sh && ") and "launch pretrain pcae --local" in main_job
    assert tests.startswith("bash setup.sh && ") and "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = first_code_block()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_ci_starts_the_slurm_cluster_before_the_tests_and_stops_it_after() -> None:
    _, tests = first_code_block()
    assert "bash slurm/local-cluster.sh up && " in tests and tests.index("up &&") < tests.index("pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    trap = "trap 'bash slurm/local-cluster.sh down' EXIT"
    assert trap in ci and ci.index(trap) < ci.index(tests)
