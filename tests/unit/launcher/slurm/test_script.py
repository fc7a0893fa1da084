"""The dry run's sbatch script is the one submitit writes, for every kind of parameter the launcher sets."""

from __future__ import annotations

from pathlib import Path

import pytest
from submitit.slurm.slurm import _make_sbatch_string  # the text submitit writes; pinned here, not used by the tool

from launcher.slurm.script import sbatch_script
from launcher.stopping import held_signals_python

BASE = {
    "job_name": "launch-pcae",
    "partition": "gpu",
    "time": 120,
    "nodes": 4,
    "ntasks_per_node": 8,
    "cpus_per_task": 12,
    "signal_delay_s": 120,
    "stderr_to_stdout": True,
    "srun_args": ["--kill-on-bad-exit=1", "--wait=60"],
    "additional_parameters": {"requeue": True},
}


@pytest.mark.parametrize(
    "changes, array",
    [
        ({}, None),
        ({"gpus_per_node": 8, "mem": "512GB", "account": "my lab's", "qos": "high", "constraint": "a100&ib"}, None),
        ({"setup": ["module load cuda/12.4", "source ~/venv/bin/activate"], "stderr_to_stdout": False}, None),
        ({"array_parallelism": 3}, 7),
        ({}, 300),
        ({"job_name": "launch-sweep-pcae; rm -rf ~", "partition": "$(whoami)"}, 2),
    ],
)
def test_the_dry_run_script_is_submitits(tmp_path: Path, changes: dict, array: int | None) -> None:
    parameters = {**BASE, **changes}
    folder = tmp_path / "run" / "slurm" / "sub1"
    python = held_signals_python("/opt/venv/bin/python")
    command = f"{python} -u -m submitit.core._submit {folder}"
    extra = {} if array is None else {"map_count": array}
    assert sbatch_script(parameters, folder, python, array) == _make_sbatch_string(
        command=command, folder=folder, **parameters, **extra
    )
