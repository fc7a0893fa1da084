"""ONE plan from a command to the cluster: a dry-run text, or a submitted, recorded job.

Every kind of job (``launcher/work.py``: ``TrainingWork``, ``ResumeWork``, ``StudyWork``,
``SweepArrayWork``, ``SweepWork``) describes itself through the ``Work`` interface below, and
``submit`` takes the same steps for all of them, in this order, so that bad input fails before
anything is written or submitted: the profile and the flags that override it, the directory
(shared by every node), the work's own checks (an existing run of another config, a batch that
does not divide over the ranks), then what this host lacks for a real submission (data it cannot
read, a directory it cannot write) and the live cluster checks (``sbatch``, partition, node count).
A dry run renders the exact sbatch script whatever that second group finds, and lists it; a
submission refuses on the first of them, then checks that no job is active in the directory, writes
the work's files (``config.yaml`` / ``sweep.yaml``), submits the job, and writes ``launch.json``.
This module holds only SLURM's mechanics: what a job is lives in ``launcher/work.py``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import to_dict
from launcher.errors import ConfigError, RunDirError, UserError
from launcher.slurm.control import check_not_active
from launcher.slurm.profiles import (
    ClusterProfile,
    Resources,
    SlurmError,
    check_shared,
    load_profile,
    parse_time,
    profile_name,
    resolve_resources,
)
from launcher.slurm.records import LAUNCH_JSON, now, read_launch, write_launch
from launcher.stopping import held_signals_python

STARTUP_S = 60  # from submission to the first step: Python, torch, the data and the model


@dataclass
class Request:
    """What the command line asks of the cluster; unset flags take the profile's values."""

    cluster: str
    nodes: int | None = None
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    max_requeues: int = 10
    profile: ClusterProfile | None = None  # a profile described on the spot (no file), else load `cluster`


class Work:
    """What a job runs and where its files go; subclasses fill in the parts that differ."""

    job_name: str
    max_requeues: int | None = None  # None: the request's

    def run_here(self, dry_run: bool, out: Any, err: Any) -> int:
        """Run the work on this machine instead (or write its dry run to ``out``, what it lacks to ``err``)."""
        raise ConfigError(f"{type(self).__name__} runs only as a SLURM job; pass --cluster")

    def directory(self, profile: ClusterProfile) -> Path:
        """Where the job's files go (absolute)."""
        raise NotImplementedError

    def resources(self, request: Request) -> tuple[ClusterProfile, Resources]:
        profile = request.profile or load_profile(request.cluster)
        time_min = None if request.time is None else parse_time(request.time)
        return profile, resolve_resources(
            profile_name(request.cluster), profile, request.nodes, request.gpus_per_node, request.partition, time_min
        )

    def check(self, directory: Path, res: Resources) -> bool:
        """Refuse what cannot run; whether the directory holds this work already (it resumes)."""
        raise NotImplementedError

    def missing(self, directory: Path, resuming: bool) -> list[UserError]:
        """What this host lacks for a real submission: a dry run lists it, a submission refuses."""
        return []

    def write(self, directory: Path) -> None:
        """The files the job reads (written only once every check has passed)."""

    def body(self, directory: Path, res: Resources, max_requeues: int) -> Any:
        """The picklable callable every task of the job runs."""
        raise NotImplementedError

    def sbatch_parameters(self, profile: ClusterProfile, res: Resources) -> dict[str, Any]:
        return sbatch_parameters(profile, res, self.job_name)

    def dry_run_text(self, directory: Path, resuming: bool, res: Resources, script: str) -> str:
        raise NotImplementedError

    def nothing_to_do(self) -> str | None:
        """Why nothing needs submitting (a sweep whose points have all finished), or None."""
        return None

    def array_size(self) -> int | None:
        """The number of tasks of a job array, or None for one job."""
        return None

    def submitted_text(self, job_id: str, directory: Path, resuming: bool, res: Resources) -> str:
        raise NotImplementedError


@dataclass
class Submission:
    text: str  # what to show the user: the dry run's config and script, or where the job went
    job_id: str | None = None  # None for a dry run
    # A dry run's list of what a real submission from this host would refuse on, each a paragraph.
    problems: list[str] = dataclasses.field(default_factory=list)


def submit(work: Work, request: Request, dry_run: bool = False) -> Submission:
    """Check, then render (dry run) or submit ``work`` as one SLURM job."""
    profile, res = work.resources(request)
    max_requeues = request.max_requeues if work.max_requeues is None else work.max_requeues
    if max_requeues < 0:
        raise ConfigError("--max-requeues must be >= 0")
    # SLURM signals signal_delay_s before the limit, and Python, torch and the first step need
    # their start-up: a limit shorter than both would end every attempt before it trained.
    if res.time_min * 60 < profile.signal_delay_s + STARTUP_S:
        need = -(-(profile.signal_delay_s + STARTUP_S) // 60)
        raise ConfigError(
            f"--time {res.time_min} min leaves no time to train: SLURM sends the checkpoint signal "
            f"{profile.signal_delay_s} s before the limit (signal_delay_s of the profile) and start-up takes "
            f"about {STARTUP_S} s. Ask for at least --time {need}."
        )
    directory = work.directory(profile)
    parameters = work.sbatch_parameters(profile, res)
    check_script_values(parameters, directory, res.cluster)
    check_shared(directory, "run directory")
    resuming = work.check(directory, res)
    if work.nothing_to_do() is not None:
        return Submission(work.nothing_to_do())
    missing = work.missing(directory, resuming)
    if dry_run:
        try:
            check_cluster(res)
        except SlurmError as e:
            missing.append(e)
        script = render_sbatch(parameters, directory, max_requeues, work.array_size())
        return Submission(work.dry_run_text(directory, resuming, res, script), problems=[str(e) for e in missing])
    if missing:
        raise missing[0]
    check_cluster(res)
    if resuming and (directory / LAUNCH_JSON).is_file():
        check_not_active(directory)
    work.write(directory)
    job_id = submit_recorded(
        work.body(directory, res, max_requeues),
        directory,
        profile,
        res,
        parameters,
        max_requeues,
    )
    return Submission(work.submitted_text(job_id, directory, resuming, res), job_id)


# ----------------------------------------------------------------------------- what reaches the script

# Where each sbatch parameter comes from, to name it in an error ({cluster}: the profile's name).
SCRIPT_FIELDS = {
    "job_name": "the job name",
    "partition": "the partition (--partition, or partition in cluster profile {cluster})",
    "account": "account in cluster profile {cluster}",
    "qos": "qos in cluster profile {cluster}",
    "constraint": "constraint in cluster profile {cluster}",
    "mem": "mem_gb in cluster profile {cluster}",
    "setup": "a setup line of cluster profile {cluster}",
}
# sbatch reads these out of an #SBATCH line itself: a backslash escapes the next character even
# inside quotes, and a line naming a heterogeneous job component starts a new job description.
SBATCH_MISREAD = ("\\", "hetjob", "packjob")


def check_script_values(parameters: dict[str, Any], directory: Path, cluster: str) -> None:
    """Refuse a value that could end a line or a word of the sbatch script, before anything is written.

    submitit shell-quotes every #SBATCH value and every argument of the srun line, so ``;``, ``&``,
    ``|``, ``$()``, backticks, quotes, ``#`` and non-ASCII text stay one word. What quoting cannot
    hold is a control character: a newline (or carriage return) inside a quoted #SBATCH value ends
    that comment line, so the rest would run as a command and sbatch would stop reading the
    directives after it. The setup lines are commands by design; each must still be one line.
    """
    values = [("the job's directory (--run-dir or --study-dir, or runs_dir of the profile and the name)", directory)]
    for key, value in parameters.items():
        label = SCRIPT_FIELDS.get(key, f"sbatch parameter {key}").format(cluster=repr(cluster))
        items = value if isinstance(value, (list, tuple)) else [value]
        values += [(label, item) for item in items if not isinstance(item, (bool, int, float, dict))]
    for label, value in values:
        text = str(value)
        bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ConfigError(
                f"{label} {text!r} holds the control character {bad!r}: in the sbatch script it would end a "
                f"line and run the rest as a command. Remove it (every value of a SLURM job must be one line "
                f"of printable text)."
            )
        if label.startswith("a setup line"):
            continue
        misread = next((m for m in SBATCH_MISREAD if m in text.lower()), None)
        if misread is not None:
            raise ConfigError(
                f"{label} {text!r} holds {misread!r}, which sbatch reads itself inside an #SBATCH line (a "
                f"backslash as an escape even inside quotes, hetjob/packjob as the start of another job), so "
                f"the job would not get this value. Remove it from the value."
            )
    if "%" in str(directory):
        raise ConfigError(
            f"the job's directory {directory} holds '%', which SLURM reads as a pattern (%j, %t...) in the "
            f"log file names it writes there. Use a directory without '%' (--run-dir, or the profile's runs_dir)."
        )


# ----------------------------------------------------------------------------- sbatch through submitit


def sbatch_parameters(profile: ClusterProfile, res: Resources, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its names) for one job."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "partition": res.partition,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": profile.cpus_per_task,
        "signal_delay_s": profile.signal_delay_s,
        "stderr_to_stdout": True,  # one log per task: RUN/slurm/subK/JOB_TASK_log.out
        # A rank that dies takes the others with it instead of leaving them to the time limit.
        "srun_args": ["--kill-on-bad-exit=1", "--wait=60"],
        # Requeueable whatever the cluster's default (JobRequeue=0 would make `scontrol requeue` fail).
        "additional_parameters": {"requeue": True},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if profile.mem_gb is not None:
        params["mem"] = (
            f"{int(profile.mem_gb)}GB" if profile.mem_gb == int(profile.mem_gb) else f"{int(profile.mem_gb * 1024)}MB"
        )
    for key in ("account", "qos", "constraint"):
        if getattr(profile, key) is not None:
            params[key] = getattr(profile, key)
    if profile.setup:
        params["setup"] = list(profile.setup)
    return params


def _executor(folder: Path, max_requeues: int):
    from submitit.slurm.slurm import SlurmExecutor

    # Every task starts with the stop signals held until its job body has its handlers.
    return SlurmExecutor(folder, max_num_timeout=max_requeues, python=held_signals_python(sys.executable))


def next_submission_folder(directory: Path) -> Path:
    """A fresh submitit folder per submission: job ids restart when a cluster is rebuilt."""
    k = 1
    while (directory / "slurm" / f"sub{k}").exists():
        k += 1
    return directory / "slurm" / f"sub{k}"


def render_sbatch(parameters: dict[str, Any], directory: Path, max_requeues: int, array: int | None = None) -> str:
    """The exact sbatch script a submission into ``directory`` would write now (``array`` tasks: a job array)."""
    from launcher.slurm.script import sbatch_script

    folder, python = next_submission_folder(directory), held_signals_python(sys.executable)
    return sbatch_script(parameters, folder, python, array if array and array > 1 else None)  # submitit: 1 is a job


def submit_recorded(
    job_body: Any,
    directory: Path,
    profile: ClusterProfile,
    res: Resources,
    parameters: dict[str, Any],
    max_requeues: int,
) -> str:
    """Submit ``job_body`` with submitit into ``directory/slurm/subK`` and record it in ``launch.json``."""
    folder = next_submission_folder(directory)
    executor = _executor(folder, max_requeues)
    executor.update_parameters(**parameters)
    try:
        record = read_launch(directory)
    except RunDirError:
        record = {"jobs": [], "attempts": []}
    record.update(
        {
            "cluster": res.cluster,
            "profile": to_dict(profile),
            "resources": dataclasses.asdict(res),
            "max_requeues": max_requeues,
        }
    )
    write_launch(directory, record)  # before the job starts: its rank 0 adds its attempts here
    if isinstance(job_body, list):  # a job array: one task per body, each a run of its own directory
        return submit_array(executor, job_body, directory, folder, record)
    job = executor.submit(job_body)
    record = read_launch(directory)
    record["jobs"].append({"job_id": job.job_id, "folder": str(folder.relative_to(directory)), "submitted": now()})
    write_launch(directory, record)
    return job.job_id


def submit_array(executor: Any, bodies: list[Any], directory: Path, folder: Path, record: dict[str, Any]) -> str:
    """Submit ``bodies`` as one SLURM job array; record the array in ``directory`` and each task in its run."""
    from launcher.slurm.records import updating

    shared = {k: record[k] for k in ("cluster", "profile", "resources", "max_requeues")}
    for body in bodies:  # before the tasks start: their rank 0 adds attempts to these records
        with updating(Path(body.run_dir)):
            try:
                task_record = read_launch(Path(body.run_dir))
            except RunDirError:
                task_record = {"jobs": [], "attempts": []}
            write_launch(Path(body.run_dir), {**task_record, **shared})
    jobs = executor.submit_array(bodies)
    array_id = jobs[0].job_id.split("_")[0]
    for body, job in zip(bodies, jobs):
        run_dir = Path(body.run_dir)
        with updating(run_dir):
            task_record = read_launch(run_dir)
            task_record["jobs"].append(
                {"job_id": job.job_id, "folder": os.path.relpath(folder, run_dir), "submitted": now()}
            )
            write_launch(run_dir, task_record)
    record = read_launch(directory)
    record["jobs"].append(
        {
            "job_id": array_id,
            "folder": str(folder.relative_to(directory)),
            "submitted": now(),
            "tasks": {Path(b.run_dir).name: j.job_id for b, j in zip(bodies, jobs)},
        }
    )
    write_launch(directory, record)
    return array_id


# ----------------------------------------------------------------------------- live cluster checks


def check_cluster(res: Resources) -> None:
    """Fail before anything is written if SLURM is missing or cannot run this job."""
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "no `sbatch` on PATH: this machine is not a SLURM login node. Run on one, start "
            "the local test cluster (`bash slurm/local-cluster.sh up`), or use --local."
        )
    check_partition(res)


def check_partition(res: Resources) -> None:
    if shutil.which("sinfo") is None:
        return
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-p", res.partition, "-o", "%D"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise SlurmError("`sinfo` did not answer in 30 s: is the SLURM controller up?") from None
    if out.returncode != 0:
        raise SlurmError(f"`sinfo` failed ({out.stderr.strip()}): is the SLURM controller up?")
    counts = [int(x) for x in out.stdout.split() if x.isdigit()]
    if not counts:
        known = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
        names = sorted(set(known.stdout.split()))
        raise SlurmError(
            f"partition {res.partition!r} does not exist on this cluster; partitions: "
            f"{', '.join(names) or 'none'}. Pass --partition or fix the profile."
        )
    if res.nodes > sum(counts):
        raise SlurmError(
            f"--nodes {res.nodes} is more than partition {res.partition!r} has "
            f"({sum(counts)} nodes); ask for fewer nodes"
        )
