"""SLURM dispatch through submitit: cluster profiles, the job body, sbatch, status and control.

This is the only module that imports submitit (lazily, so the rest of the CLI starts fast).
One ``launch pretrain|finetune|linprobe`` on a cluster is one SLURM job of N nodes x one task per GPU (one
task per node on CPU partitions). Every task exports the torch.distributed variables
from SLURM's, then builds the Trainer. A USR2 signal (preemption, or the time limit
coming) makes every rank stop at the same step boundary and checkpoint; rank 0 then
requeues the job, which resumes in the same run directory from the newest valid
checkpoint. A SIGTERM that comes without a USR2 first (``scancel``, a preemption after the
grace time or without one, an admin's requeue) also checkpoints if SLURM's KillWait allows,
but does not requeue: SLURM decides whether that job comes back. ``RUN/launch.json``
records the profile, the job ids, every attempt and the last error; ``RUN/slurm/subK/``
holds submitit's files and one log per task.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.config import REPO_ROOT, build_dataclass, experiment_from_dict, to_dict
from launcher.errors import ConfigError, RunDirError, UserError

log = logging.getLogger(__name__)

CLUSTERS_DIR = REPO_ROOT / "slurm" / "clusters"
LAUNCH_JSON = "launch.json"
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                 "SUSPENDED", "CONFIGURING", "COMPLETING", "PREEMPTED", "SIGNALING", "STAGE_OUT")
# Scratch folders that are local to each machine: submitit jobs fail silently there.
LOCAL_ONLY_DIRS = (Path("/tmp"), Path("/dev/shm"))


class SlurmError(UserError):
    """A cluster profile, flag or cluster state that stops a submission."""


# ----------------------------------------------------------------------------- profiles


@dataclass
class ClusterProfile:
    """One ``slurm/clusters/NAME.yaml``: where and how jobs of this cluster run."""

    partition: str
    runs_dir: str  # on a filesystem every node shares
    max_nodes: int
    time_min: int
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    signal_delay_s: int = 90
    setup: tuple[str, ...] = ()
    preempt_partition: str | None = None

    def __post_init__(self) -> None:
        for key in ("max_nodes", "time_min", "cpus_per_task"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or self.signal_delay_s < 0 or (self.mem_gb is not None and self.mem_gb <= 0):
            raise ValueError("gpus_per_node and signal_delay_s must be >= 0 and mem_gb > 0")
        if not Path(self.runs_dir).is_absolute():
            raise ValueError(f"runs_dir must be an absolute path on a shared filesystem, got {self.runs_dir!r}")
        check_shared(Path(self.runs_dir), "runs_dir")


def check_shared(path: Path, what: str) -> None:
    """Refuse node-local scratch folders: the job's files must be visible from every node."""
    resolved = Path(os.path.abspath(path))
    for local in LOCAL_ONLY_DIRS:
        if resolved == local or local in resolved.parents:
            raise RunDirError(
                f"{what} {path} is under {local}, which is local to each machine: SLURM jobs would "
                f"fail silently there. Use a directory on a filesystem all nodes share "
                f"(e.g. /var/tmp on the local test cluster, your cluster's scratch otherwise)."
            )


def profile_names() -> list[str]:
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    """Load ``slurm/clusters/NAME.yaml``; unknown names and keys are ConfigErrors."""
    path = CLUSTERS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown cluster profile {name!r}; known profiles: "
                          f"{', '.join(profile_names()) or 'none'} (files in {CLUSTERS_DIR})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster profile {path} is not valid YAML: {e}") from None
    try:
        return build_dataclass(ClusterProfile, raw, f"cluster profile {name}")
    except RunDirError as e:
        raise ConfigError(f"cluster profile {path}: {e}") from None


@dataclass
class Resources:
    """What one job asks for: the profile with the command line's overrides applied."""

    cluster: str
    nodes: int
    gpus_per_node: int
    partition: str
    time_min: int

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)


def resolve_resources(cluster: str, profile: ClusterProfile, nodes: int | None = None,
                      gpus_per_node: int | None = None, partition: str | None = None,
                      time_min: int | None = None) -> Resources:
    res = Resources(cluster=cluster, nodes=1 if nodes is None else nodes,
                    gpus_per_node=profile.gpus_per_node if gpus_per_node is None else gpus_per_node,
                    partition=partition or profile.partition,
                    time_min=profile.time_min if time_min is None else time_min)
    if res.nodes <= 0 or res.gpus_per_node < 0 or res.time_min <= 0:
        raise ConfigError("--nodes and --time must be positive and --gpus-per-node >= 0")
    if res.nodes > profile.max_nodes:
        raise ConfigError(f"--nodes {res.nodes} is more than cluster profile {cluster!r} allows "
                          f"(max_nodes: {profile.max_nodes}); ask for fewer nodes")
    return res


def parse_time(text: str) -> int:
    """``--time`` in minutes: ``90``, ``1:30:00`` (h:m:s) or ``2-00:00:00`` (days)."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:
            minutes = parts[0] * 60 + parts[1]
        else:
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
        return minutes + int(days or 0) * 24 * 60
    except ValueError:
        raise ConfigError(f"--time {text!r} is not minutes, H:MM:SS or D-HH:MM:SS") from None


# ----------------------------------------------------------------------------- cluster checks


def check_cluster(res: Resources) -> None:
    """Fail before anything is written if SLURM is missing or cannot run this job."""
    if shutil.which("sbatch") is None:
        raise SlurmError("no `sbatch` on PATH: this machine is not a SLURM login node. Run on one, start "
                         "the local test cluster (`bash slurm/local-cluster.sh up`), or use --local.")
    check_partition(res)


def check_partition(res: Resources) -> None:
    if shutil.which("sinfo") is None:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-p", res.partition, "-o", "%D"], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise SlurmError("`sinfo` did not answer in 30 s: is the SLURM controller up?") from None
    if out.returncode != 0:
        raise SlurmError(f"`sinfo` failed ({out.stderr.strip()}): is the SLURM controller up?")
    counts = [int(x) for x in out.stdout.split() if x.isdigit()]
    if not counts:
        known = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
        names = sorted(set(known.stdout.split()))
        raise SlurmError(f"partition {res.partition!r} does not exist on this cluster; partitions: "
                         f"{', '.join(names) or 'none'}. Pass --partition or fix the profile.")
    if res.nodes > sum(counts):
        raise SlurmError(f"--nodes {res.nodes} is more than partition {res.partition!r} has "
                         f"({sum(counts)} nodes); ask for fewer nodes")


# ----------------------------------------------------------------------------- the job


def restart_count() -> int:
    """How many times SLURM has requeued this job (our requeues and its own): the attempt."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def master_port(job_id: str, attempt: int) -> int:
    """A rendezvous port unique per job and attempt: nodes may share one network stack, and a
    requeued job must not meet a half-closed store of its previous attempt."""
    number = int("".join(c for c in job_id if c.isdigit()) or 0)
    return 20000 + (number * 131 + attempt * 7) % 40000


class TrainingJob:
    """The body of every task: export the distributed environment, train, requeue on USR2.

    submitit pickles this object; ``checkpoint()`` is its requeue hook for a USR2 that comes
    before training has started (the trainer then has nothing new to save, and the requeued
    job resumes from the newest checkpoint of the run directory, whatever its name).
    """

    def __init__(self, config: dict[str, Any], run_dir: str, use_gpu: bool, max_requeues: int) -> None:
        self.config, self.run_dir = config, run_dir
        self.use_gpu, self.max_requeues = use_gpu, max_requeues

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch.distributed as dist

        env = submitit.JobEnvironment()
        attempt = restart_count()
        os.environ["MASTER_PORT"] = str(master_port(env.job_id, attempt))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.use_gpu,
                                                              overwrite=True)
        if not self.use_gpu:
            os.environ["ACCELERATE_USE_CPU"] = "1"  # else every CPU rank believes it is rank 0
        run_dir, rank = Path(self.run_dir), env.global_rank
        if rank == 0:
            record_attempt(run_dir, env.job_id, attempt, outcome="running")
        trainer = None
        stopping: list[str] = []  # the signal that stopped this rank; the first one decides
        try:
            from launcher.trainer import Trainer  # lazily: the submitting process never needs torch

            trainer = Trainer(experiment_from_dict(self.config), run_dir)

            def on_signal(signum: int, frame: Any) -> None:
                # Every rank gets the signal; the trainer all-reduces the flag, so all ranks
                # checkpoint at the same step boundary and fit() returns on all of them. The
                # first signal decides: the SIGTERM that follows a USR2 is SLURM ending this
                # attempt after our own requeue, or after a preemption's grace time.
                name = signal.Signals(signum).name
                if stopping:
                    log.info("received %s while stopping on %s", name, stopping[0])
                    return
                stopping.append(name)
                if signum == signal.SIGUSR2:
                    log.warning("received SIGUSR2 (preemption or the time limit coming): checkpointing "
                                "at the next step boundary, then requeueing")
                else:
                    log.warning("received %s without SIGUSR2 first (scancel, or SLURM ending the job "
                                "itself): checkpointing at the next step boundary if KillWait allows; "
                                "SLURM decides whether the job comes back", name)
                trainer.request_stop()

            signal.signal(signal.SIGUSR2, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
            trainer.resume()
            result = trainer.fit()
            trainer.accelerator.wait_for_everyone()
        except BaseException as e:
            if not isinstance(e, SystemExit):
                record_attempt(run_dir, env.job_id, attempt, outcome="failed",
                               error=f"rank {rank}: {type(e).__name__}: {e}",
                               step=trainer.state.step if trainer is not None else None)
            raise
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # no rank may outlive the job (zombie jobs)

        if result.finished:
            if rank == 0:
                record_attempt(run_dir, env.job_id, attempt, outcome="finished", step=result.step)
            return {"step": result.step, "finished": True}
        if rank != 0:
            sys.exit(0)  # rank 0 decides; a non-zero exit here would kill it (--kill-on-bad-exit)
        # Requeue only after our own USR2: `scontrol requeue` also brings back a job that is
        # being cancelled.
        first = stopping[0] if stopping else "a signal to another rank"
        if first != "SIGUSR2":
            record_attempt(run_dir, env.job_id, attempt, outcome="terminated", step=result.step)
            log.info("stopped at step %d after %s; not requeueing", result.step, first)
            sys.exit(-1)  # no result file: if SLURM requeues the job, it comes back
        if attempt >= self.max_requeues:
            reason = (f"stopped at step {result.step} by a signal after {attempt} requeues; the limit is "
                      f"{self.max_requeues} (--max-requeues). Run `launch resume {run_dir}` to go on.")
            record_attempt(run_dir, env.job_id, attempt, outcome="stopped", step=result.step, error=reason)
            raise RuntimeError(reason)
        record_attempt(run_dir, env.job_id, attempt, outcome="requeued", step=result.step)
        try:
            subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60, capture_output=True)
            log.info("requeued job %s after step %d", env.job_id, result.step)
        except (subprocess.SubprocessError, OSError) as e:
            # A preempting partition with PreemptMode=REQUEUE may have requeued the job already.
            log.warning("scontrol requeue %s failed (%s); SLURM may requeue it itself", env.job_id, e)
        sys.exit(-1)  # like submitit after a requeue: no result file, the job comes back

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's USR2 handler calls this on rank 0 before ours is installed; it then requeues."""
        import submitit

        job_id, attempt = submitit.JobEnvironment().job_id, restart_count()
        if attempt >= self.max_requeues:
            reason = (f"signalled before training started after {attempt} requeues; the limit is "
                      f"{self.max_requeues} (--max-requeues). Run `launch resume {self.run_dir}` to go on.")
            record_attempt(Path(self.run_dir), job_id, attempt, outcome="stopped", error=reason)
            return None  # submitit then ends the job instead of requeueing it
        record_attempt(Path(self.run_dir), job_id, attempt, outcome="requeued")
        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.run_dir, self.use_gpu,
                                                             self.max_requeues))


# ----------------------------------------------------------------------------- launch.json


def read_launch(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / LAUNCH_JSON
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {LAUNCH_JSON}: it is not a SLURM run of this tool")
    return json.loads(path.read_text())


def write_launch(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = Path(run_dir) / f".{LAUNCH_JSON}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, Path(run_dir) / LAUNCH_JSON)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def record_attempt(run_dir: Path, job_id: str, attempt: int, outcome: str, step: int | None = None,
                   error: str | None = None) -> None:
    """Add or update the entry of (job, attempt) in RUN/launch.json.

    A new attempt of a job means SLURM requeued it: an earlier attempt still marked running
    (killed before it could report, e.g. at the end of a preemption's grace time) or
    terminated (it checkpointed on SIGTERM) is recorded as requeued by SLURM.
    """
    try:
        record = read_launch(run_dir)
    except (RunDirError, json.JSONDecodeError):
        record = {"jobs": []}
    attempts = record.setdefault("attempts", [])
    entry = next((a for a in attempts if a["job_id"] == job_id and a["attempt"] == attempt), None)
    if entry is None:
        for earlier in attempts:
            if earlier["job_id"] == job_id and earlier["attempt"] < attempt \
                    and earlier["outcome"] in ("running", "terminated"):
                earlier.update(outcome="requeued", by="slurm")
        entry = {"job_id": job_id, "attempt": attempt, "started": now()}
        attempts.append(entry)
    entry["outcome"] = outcome
    if outcome != "running":
        entry["ended"] = now()
    if step is not None:
        entry["step"] = step
    if error is not None:
        entry["error"] = error
        record["last_error"] = error
    write_launch(run_dir, record)


# ----------------------------------------------------------------------------- submission


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
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if profile.mem_gb is not None:
        params["mem"] = f"{int(profile.mem_gb)}GB" if profile.mem_gb == int(profile.mem_gb) \
            else f"{int(profile.mem_gb * 1024)}MB"
    for key in ("account", "qos", "constraint"):
        if getattr(profile, key) is not None:
            params[key] = getattr(profile, key)
    if profile.setup:
        params["setup"] = list(profile.setup)
    return params


def _executor(folder: Path, max_requeues: int, render_only: bool = False):
    from submitit.slurm.slurm import SlurmExecutor

    if render_only:  # the same executor, minus its check that srun exists
        class RenderOnly(SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 1

        return RenderOnly(folder, max_num_timeout=max_requeues)
    return SlurmExecutor(folder, max_num_timeout=max_requeues)


def next_submission_folder(run_dir: Path) -> Path:
    """A fresh submitit folder per submission: job ids restart when a cluster is rebuilt."""
    k = 1
    while (run_dir / "slurm" / f"sub{k}").exists():
        k += 1
    return run_dir / "slurm" / f"sub{k}"


def render_sbatch(profile: ClusterProfile, res: Resources, run_dir: Path, job_name: str,
                  max_requeues: int) -> str:
    """The exact sbatch script submit() would write for this run's next submission."""
    executor = _executor(next_submission_folder(run_dir), max_requeues, render_only=True)
    executor.update_parameters(**sbatch_parameters(profile, res, job_name))
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(cfg: Any, run_dir: Path, profile: ClusterProfile, res: Resources, max_requeues: int) -> str:
    """Submit the job (the run directory and its config.yaml must already exist); return its id."""
    run_dir = Path(run_dir).resolve()
    job = TrainingJob(to_dict(cfg), str(run_dir), res.gpus_per_node > 0, max_requeues)
    return submit_recorded(job, run_dir, profile, res, sbatch_parameters(profile, res, f"launch-{cfg.method.name}"),
                           max_requeues)


def submit_recorded(job_body: Any, run_dir: Path, profile: ClusterProfile, res: Resources,
                    parameters: dict[str, Any], max_requeues: int) -> str:
    """Submit ``job_body`` with submitit into ``run_dir/slurm/subK`` and record it in ``launch.json``."""
    folder = next_submission_folder(run_dir)
    executor = _executor(folder, max_requeues)
    executor.update_parameters(**parameters)
    try:
        record = read_launch(run_dir)
    except RunDirError:
        record = {"jobs": [], "attempts": []}
    record.update({"cluster": res.cluster, "profile": to_dict(profile), "resources": dataclasses.asdict(res),
                   "max_requeues": max_requeues})
    write_launch(run_dir, record)  # before the job starts: its rank 0 adds its attempts here
    job = executor.submit(job_body)
    record = read_launch(run_dir)
    record["jobs"].append({"job_id": job.job_id, "folder": str(folder.relative_to(run_dir)),
                           "submitted": now()})
    write_launch(run_dir, record)
    return job.job_id


# ----------------------------------------------------------------------------- operating runs


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job from SLURM accounting (the allocation, not its steps)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=30)
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id:
            states[job_id] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0"
    return states


def run_status(run_dir: Path) -> dict[str, Any]:
    """The state of a SLURM run: last job's state, step and loss reached, restarts, last error."""
    from launcher.runs import read_metrics

    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    metrics = read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    attempts = record.get("attempts", [])
    return {
        "run_dir": str(run_dir),
        "cluster": record.get("cluster"),
        "job_id": jobs[-1] if jobs else None,
        "state": states.get(jobs[-1], "UNKNOWN") if jobs else "NOT SUBMITTED",
        "jobs": {j: states.get(j, "UNKNOWN") for j in jobs},
        "step": last.get("step"),
        "loss": last.get("loss"),
        "restarts": sum(1 for a in attempts if a.get("outcome") == "requeued"),
        "last_error": record.get("last_error"),
    }


def find_runs() -> list[Path]:
    """Run directories with a launch.json under every profile's runs_dir."""
    runs: set[Path] = set()
    for name in profile_names():
        try:
            root = Path(load_profile(name).runs_dir)
        except UserError:
            continue
        runs.update(p.parent for p in root.glob(f"*/{LAUNCH_JSON}"))
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def cancel(run_dir: Path) -> list[str]:
    """scancel the run's jobs that are still active; return their ids."""
    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    active = [j for j in jobs if states.get(j, "PENDING") in ACTIVE_STATES]
    if active:
        if shutil.which("scancel") is None:
            raise SlurmError("no `scancel` on PATH: run this on the cluster's login node")
        subprocess.run(["scancel", *active], check=True, timeout=60)
        record["cancelled"] = now()
        write_launch(run_dir, record)
    return active


def check_not_active(run_dir: Path) -> None:
    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    active = {j: s for j, s in states.items() if s in ACTIVE_STATES}
    if active:
        raise SlurmError(f"run {run_dir} still has active job(s) {active}; `launch cancel {run_dir}` first")


def resume(run_dir: Path, max_requeues: int | None = None) -> str:
    """Resubmit a stopped run with its recorded config, profile and resources."""
    from launcher.config import read_yaml
    from launcher.runs import CONFIG

    run_dir = Path(run_dir).resolve()
    record = read_launch(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"{run_dir} has no {CONFIG}; nothing to resume")
    cfg = experiment_from_dict(read_yaml(run_dir / CONFIG))
    profile = build_dataclass(ClusterProfile, record["profile"], "recorded profile")
    res = Resources(**record["resources"])
    check_cluster(res)
    check_not_active(run_dir)
    return submit(cfg, run_dir, profile, res, record.get("max_requeues", 10) if max_requeues is None
                  else max_requeues)


def log_path(run_dir: Path, rank: int) -> Path:
    """The submitit log of task ``rank`` of the run's newest job."""
    record = read_launch(run_dir)
    if not record.get("jobs"):
        raise RunDirError(f"{run_dir} has no submitted job yet")
    job = record["jobs"][-1]
    return Path(run_dir) / job["folder"] / f"{job['job_id']}_{rank}_log.out"


def follow(path: Path, run_dir: Path, out: Any = sys.stdout, poll_s: float = 1.0) -> None:
    """Print ``path`` and what is appended to it until the run's job is no longer active."""
    position = 0
    while True:
        if path.exists():
            with open(path) as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            if chunk:
                out.write(chunk)
                out.flush()
        status = run_status(run_dir)
        if status["state"] not in ACTIVE_STATES and status["state"] != "UNKNOWN":
            return
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- Ray Tune sweeps

SWEEP_MAX_REQUEUES = 10  # preemptions requeue the sweep job; each attempt restores the sweep


def sweep_parameters(profile: ClusterProfile, res: Resources, job_name: str) -> dict[str, Any]:
    """sbatch parameters of a sweep job: one task per node, holding all of its CPUs and GPUs."""
    params = sbatch_parameters(profile, res, job_name)
    params.update(ntasks_per_node=1, cpus_per_task=profile.cpus_per_task * res.tasks_per_node)
    return params


def render_sweep_sbatch(profile: ClusterProfile, res: Resources, sweep_dir: Path, job_name: str) -> str:
    """The exact sbatch script submit_sweep() would write for this sweep's next submission."""
    executor = _executor(next_submission_folder(sweep_dir), SWEEP_MAX_REQUEUES, render_only=True)
    executor.update_parameters(**sweep_parameters(profile, res, job_name))
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit_sweep(sweep_dir: Path, storage: Path, profile: ClusterProfile, res: Resources, job_name: str) -> str:
    """Submit a sweep's job (its directory and sweep.yaml must already exist); return its id."""
    sweep_dir = Path(sweep_dir).resolve()
    job = RaySweepJob(str(sweep_dir), str(Path(storage).resolve()), res.gpus_per_node)
    return submit_recorded(job, sweep_dir, profile, res, sweep_parameters(profile, res, job_name), SWEEP_MAX_REQUEUES)


def _publish(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers on other nodes never see half a file


class RaySweepJob:
    """The body of every task of a sweep job: one Ray node per SLURM node, the sweep on the first.

    Task 0 starts the Ray head and publishes its address in a file of the job's submission
    folder (on the shared filesystem); the other tasks wait for it and start Ray workers that
    join. Task 0 then drives the sweep, and when it ends (or fails) writes ``done``: the workers
    stop their Ray node and say so, then task 0 stops the head. Each task stops only the Ray
    processes it started. Without a ``checkpoint()``, a preempted job is requeued by submitit and
    its next attempt restores the sweep; a job that runs out of time is not (resubmit it).
    """

    def __init__(self, sweep_dir: str, storage: str, gpus_per_node: int) -> None:
        self.sweep_dir, self.storage, self.gpus_per_node = sweep_dir, storage, gpus_per_node

    def __call__(self) -> dict[str, Any]:
        import submitit

        from launcher import tune

        env = submitit.JobEnvironment()
        # Every task's own log file (RUN/slurm/subK/JOB_TASK_log.out) says what its Ray node did.
        logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                            format=f"%(asctime)s [rank {env.global_rank}] %(levelname)s %(name)s: %(message)s")
        attempt = restart_count()
        # A fresh rendezvous per attempt: a requeued job must not find its previous head.
        rendezvous = Path(env.paths.folder) / f"ray_{env.job_id}_{attempt}"
        rendezvous.mkdir(parents=True, exist_ok=True)
        temp_dir = tune.ray_temp_dir(f"{env.job_id}-{attempt}-{env.node}")
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or 0) or None
        if env.global_rank == 0:
            return self._head(env, attempt, rendezvous, temp_dir, cpus)
        return self._worker(env, rendezvous, temp_dir, cpus)

    @staticmethod
    def _share_token(rendezvous: Path) -> None:
        """Task 0: a secret of this job's Ray cluster, readable by its owner only."""
        import secrets

        from launcher import tune

        token = secrets.token_hex(32)
        path = rendezvous / "token"
        path.touch(mode=0o600)
        path.write_text(token)
        tune.use_cluster_token(token)

    def _head(self, env: Any, attempt: int, rendezvous: Path, temp_dir: Path, cpus: int | None) -> dict[str, Any]:
        from launcher import tune

        sweep_dir = Path(self.sweep_dir)
        record_attempt(sweep_dir, env.job_id, attempt, outcome="running")
        try:
            self._share_token(rendezvous)  # before the head starts: it inherits the environment
            with tune.ray_node(temp_dir, num_cpus=cpus, num_gpus=self.gpus_per_node) as node:
                try:
                    _publish(rendezvous / "head", node.address)
                    sweep = tune.load_sweep(sweep_dir / "sweep.yaml")
                    tune.run_sweep(sweep, Path(self.storage), node.address, num_nodes=env.num_nodes)
                finally:
                    (rendezvous / "done").touch()
                    # The workers leave first, while the head still answers them.
                    stopped = [rendezvous / f"stopped_{k}" for k in range(1, env.num_nodes)]
                    deadline = time.monotonic() + 60
                    while not all(p.exists() for p in stopped) and time.monotonic() < deadline:
                        time.sleep(0.5)
        except BaseException as e:
            if not isinstance(e, SystemExit):
                record_attempt(sweep_dir, env.job_id, attempt, outcome="failed",
                               error=f"rank 0: {type(e).__name__}: {e}")
            raise
        record_attempt(sweep_dir, env.job_id, attempt, outcome="finished")
        return {"sweep": str(sweep_dir), "nodes": env.num_nodes}

    def _worker(self, env: Any, rendezvous: Path, temp_dir: Path, cpus: int | None) -> dict[str, Any]:
        from launcher import tune

        head, done = rendezvous / "head", rendezvous / "done"
        deadline = time.monotonic() + 600
        while not head.exists():
            if done.exists():  # the head failed before it could publish its address
                return {"node": env.node}
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Ray head address in {head} after 600 s; see the log of task 0")
            time.sleep(0.5)
        tune.use_cluster_token((rendezvous / "token").read_text())  # written before the address
        with tune.ray_node(temp_dir, head_address=head.read_text(), num_cpus=cpus,
                           num_gpus=self.gpus_per_node) as node:
            while not done.exists():
                if not node.alive():
                    raise RuntimeError(f"this task's Ray node exited (code {node.process.returncode}) "
                                       f"before the sweep ended; see this task's log")
                time.sleep(0.5)
        (rendezvous / f"stopped_{env.node}").touch()
        return {"node": env.node}
