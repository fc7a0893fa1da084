"""The sbatch script of a submission, rendered here for a dry run: the text submitit writes.

submitit renders its script inside ``SlurmExecutor`` with no public way to ask for the text, so
the dry run renders it itself from the same executor parameters, in submitit's layout: the
``#SBATCH`` lines sorted by name, each value shell-quoted, then the profile's setup lines, then
the ``srun`` line that starts ``python -m submitit.core._submit FOLDER`` on every task. The
integration test submits a job to the local cluster and checks that the script submitit wrote is
this text, so a submitit that changes its layout fails there, not on a user's cluster.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

# What submitit fills in when the executor parameters leave it out (SlurmExecutor's defaults).
DEFAULTS = {"job_name": "submitit", "time": 5, "nodes": 1, "wckey": "submitit"}
SIGNAL = "USR2"  # submitit's checkpoint-and-requeue signal, sent signal_delay_s before the limit
DEFAULT_SIGNAL_DELAY_S = 90
DEFAULT_ARRAY_PARALLELISM = 256
# Executor parameters that shape the script but are not #SBATCH options of their own.
NOT_SBATCH = {"setup", "signal_delay_s", "stderr_to_stdout", "srun_args", "array_parallelism", "additional_parameters"}


def sbatch_line(key: str, value: Any) -> str:
    """One ``#SBATCH`` line; ``True`` is a bare flag (``--requeue``), anything else a quoted value."""
    key = key.replace("_", "-")
    return f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_script(parameters: dict[str, Any], folder: Path, python: str, array: int | None = None) -> str:
    """The script submitit would write into ``folder`` for ``parameters`` (``array``: tasks of a job array)."""
    sbatch = {**DEFAULTS, **{k: v for k, v in parameters.items() if k not in NOT_SBATCH and v is not None}}
    sbatch["signal"] = f"{SIGNAL}@{parameters.get('signal_delay_s', DEFAULT_SIGNAL_DELAY_S)}"
    stdout, stderr = f"{folder}/%j_%t_log.out", f"{folder}/%j_%t_log.err"
    if array is not None:
        parallel = min(array, parameters.get("array_parallelism", DEFAULT_ARRAY_PARALLELISM))
        sbatch["array"] = f"0-{array - 1}%{parallel}"
        stdout, stderr = stdout.replace("%j", "%A_%a"), stderr.replace("%j", "%A_%a")
    separate_stderr = not parameters.get("stderr_to_stdout", False)
    sbatch["output"] = stdout.replace("%t", "0")
    if separate_stderr:
        sbatch["error"] = stderr.replace("%t", "0")
    sbatch["open-mode"] = "append"  # spelt as submitit spells it: the key's place in the sorted lines
    sbatch.update(parameters.get("additional_parameters") or {})
    lines = ["#!/bin/bash", "", "# Parameters", *(sbatch_line(k, sbatch[k]) for k in sorted(sbatch))]
    if parameters.get("setup"):
        lines += ["", "# setup", *parameters["setup"]]
    srun = ["srun", "--unbuffered", "--output", stdout, *(["--error", stderr] if separate_stderr else [])]
    srun += list(parameters.get("srun_args") or [])
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", " ".join(map(shlex.quote, srun)) + " " + command, ""]
    return "\n".join(lines)
