"""Operating a SLURM run from the login node: state from sacct, cancel, logs, follow.

Nothing here imports torch or submitit: ``launch status|logs|cancel`` answer in a moment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from launcher.errors import RunDirError, UserError
from launcher.runs import read_metrics
from launcher.slurm.profiles import SlurmError, load_profile, profile_names
from launcher.slurm.records import GRID_FILE, LAUNCH_JSON, LOCAL_JSON, now, read_launch, update_launch

ACTIVE_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "PREEMPTED",
    "SIGNALING",
    "STAGE_OUT",
)


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """State of each job from SLURM accounting (the allocation, not its steps)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if job_id:
            states[job_id] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0"
    return states


def job_costs(job_ids: list[str]) -> dict[str, float]:
    """Wall time, node-hours, CPU-hours and GPU-hours of every attempt of the jobs (``sacct -D``).

    Each attempt (a requeue keeps the job id) is one row of the allocation: its elapsed seconds
    times the nodes, CPUs and GPUs it held (``AllocTRES``). A running attempt counts its time so far.
    """
    totals = {"wall_seconds": 0.0, "node_hours": 0.0, "cpu_hours": 0.0, "gpu_hours": 0.0, "attempts": 0}
    if not job_ids or shutil.which("sacct") is None:
        return totals
    out = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,ElapsedRaw,AllocTRES,NNodes", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in out.stdout.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or not fields[1].isdigit():
            continue
        seconds = float(fields[1])
        tres = dict(item.split("=", 1) for item in fields[2].split(",") if "=" in item)
        nodes = float(tres.get("node", fields[3] or 0) or 0)
        totals["wall_seconds"] += seconds
        totals["node_hours"] += seconds * nodes / 3600
        totals["cpu_hours"] += seconds * float(tres.get("cpu", 0) or 0) / 3600
        totals["gpu_hours"] += seconds * float(tres.get("gres/gpu", 0) or 0) / 3600
        totals["attempts"] += 1
    return totals


def run_status(run_dir: Path) -> dict[str, Any]:
    """The state of a run: a SLURM run's last job, step and loss reached, restarts, last error, cost.

    A SLURM run's cost (every attempt, from sacct) is also kept in its launch.json; a local run
    (``RUN/local.json``) has its wall time. A fine-tuning or probe run adds its source's cost.
    """
    from launcher import local_runs

    if local_runs.is_local_run(run_dir):
        return {**local_runs.status(run_dir), "source_cost": source_cost(run_dir)}
    if not is_run(run_dir) and (Path(run_dir) / "config.yaml").is_file():
        raise RunDirError(
            f"{run_dir} holds a config but no record of training yet: it is preparing its data, or it never "
            f"started. Run the command that made it again to start it"
        )
    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    metrics = read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    attempts = record.get("attempts", [])
    cost = job_costs(jobs)
    if cost["attempts"]:
        try:
            update_launch(run_dir, cost=cost)
        except OSError:
            pass  # a read-only view of the run: the cost is shown all the same
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
        "cost": cost if cost["attempts"] else record.get("cost", cost),  # sacct, else what it said before
        "source_cost": source_cost(run_dir),
    }


def format_status(status: dict[str, Any]) -> str:
    """``run_status`` as ``launch status RUN`` prints it: where, state, step, loss, restarts, cost."""
    loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
    step = "-" if status["step"] is None else str(status["step"])
    if status.get("pid") is not None:  # a run of this machine
        where = f"local run, pid {status['pid']} on {status['host']},"
        step += f"/{status['total_steps']}" if status.get("total_steps") else ""
    else:
        where = f"job {status['job_id']} on {status['cluster']}"
    line = f"{status['run_dir']}: {where} {status['state']}, step {step}, loss {loss}, restarts {status['restarts']}"
    cost = status.get("cost") or {}
    if cost.get("attempts"):
        line += (
            f"\n  cost: {cost['attempts']} attempt(s), {cost['wall_seconds'] / 3600:.3f} h wall time, "
            f"{cost['node_hours']:.3f} node-hours, {cost.get('cpu_hours', 0.0):.3f} CPU-hours, "
            f"{cost['gpu_hours']:.3f} GPU-hours"
        )
    source = status.get("source_cost")
    if source and source.get("attempts"):
        line += (
            f"\n  with its source {source['run_dir']}: {cost.get('node_hours', 0) + source['node_hours']:.3f} "
            f"node-hours, {cost.get('gpu_hours', 0) + source['gpu_hours']:.3f} GPU-hours in all"
        )
    if status["last_error"]:
        line += f"\n  last error: {status['last_error']}"
    return line


def source_cost(run_dir: Path) -> dict[str, Any] | None:
    """The cost of the run a fine-tuning or probe run started from (its ``method.pretrained``), if known."""
    from launcher.runs import CONFIG, read_run_config

    if not (Path(run_dir) / CONFIG).is_file():
        return None
    pretrained = read_run_config(run_dir)["method"].get("pretrained")
    if not pretrained:
        return None
    source = Path(pretrained)
    source = source.parents[1] if source.parent.name == "checkpoints" else source
    if not ((source / LAUNCH_JSON).is_file() or (source / LOCAL_JSON).is_file()):
        return None
    return {"run_dir": str(source), **run_status(source)["cost"]}


def find_runs(roots: list[Path] | None = None) -> list[Path]:
    """Runs (SLURM and local) and sweeps directly under ``roots``, oldest first; by default under
    ``./runs`` and every profile's runs_dir."""
    if roots is None:
        roots = [Path("runs")]
        for name in profile_names():
            try:
                roots.append(Path(load_profile(name).runs_dir))
            except UserError:
                continue
    found: dict[Path, tuple[float, Path]] = {}
    for root in roots:
        for record in (LAUNCH_JSON, LOCAL_JSON, GRID_FILE):
            for path in Path(root).expanduser().glob(f"*/{record}"):
                key = path.parent.resolve()
                touched = max(path.stat().st_mtime, found.get(key, (0.0, path))[0])
                found[key] = (touched, path.parent)
    return [run for _, run in sorted(found.values(), key=lambda item: item[0])]


def cancel(run_dir: Path) -> list[str]:
    """scancel the run's jobs that are still active; return their ids."""
    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    active = [j for j in jobs if any(state in ACTIVE_STATES for state in job_states(j, states))]
    if active:
        if shutil.which("scancel") is None:
            raise SlurmError("no `scancel` on PATH: run this on the cluster's login node")
        subprocess.run(["scancel", *active], check=True, timeout=60)
        update_launch(run_dir, cancelled=now())
    return active


def job_states(job_id: str, states: dict[str, str]) -> list[str]:
    """The states sacct gave for a job, or for every task of an array job (``ID_K``, ``ID_[K-L]``);
    a job sacct does not know yet is taken as pending."""
    found = [state for key, state in states.items() if key == job_id or key.startswith(f"{job_id}_")]
    return found or ["PENDING"]


def check_not_active(run_dir: Path) -> None:
    record = read_launch(run_dir)
    jobs = [j["job_id"] for j in record.get("jobs", [])]
    states = sacct_states(jobs)
    active = {j: s for j, s in states.items() if s in ACTIVE_STATES}
    if active:
        raise SlurmError(f"run {run_dir} still has active job(s) {active}; `launch cancel {run_dir}` first")


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run directory with a record of its jobs (SLURM) or attempts (this machine)."""
    return (Path(path) / LAUNCH_JSON).is_file() or (Path(path) / LOCAL_JSON).is_file()


def log_paths(run_dir: Path, rank: int) -> list[Path]:
    """Where task ``rank`` of the run logged: submitit's log of its newest job, then the trainer's own;
    for a run of this machine, the trainer's log alone."""
    from launcher import local_runs

    if local_runs.is_local_run(run_dir):
        return [local_runs.log_path(run_dir, rank)]
    return [log_path(run_dir, rank), Path(run_dir) / "logs" / f"rank_{rank}.log"]


def log_path(run_dir: Path, rank: int) -> Path:
    """The submitit log of task ``rank`` of the run's newest job."""
    record = read_launch(run_dir)
    if not record.get("jobs"):
        raise RunDirError(f"{run_dir} has no submitted job yet")
    job = record["jobs"][-1]
    return Path(run_dir) / job["folder"] / f"{job['job_id']}_{rank}_log.out"


def follow(paths: list[Path], run_dir: Path, out: Any = None, poll_s: float = 1.0) -> None:
    """Print ``paths`` (to ``out``, by default standard output) and what is appended to them until the
    run is no longer active."""
    out = out or sys.stdout
    positions = dict.fromkeys(paths, 0)
    ended = False
    while True:
        for path in paths:
            if path.exists():
                with open(path) as f:
                    f.seek(positions[path])
                    chunk = f.read()
                    positions[path] = f.tell()
                if chunk:
                    out.write(chunk)
                    out.flush()
        if ended:  # the lines written between the last read and the end were printed above
            return
        status = run_status(run_dir)
        ended = status["state"] not in ACTIVE_STATES and status["state"] != "UNKNOWN"
        if not ended:
            time.sleep(poll_s)


def queue_state(job_id: str) -> str:
    """The job's state in the queue right now (squeue), or "" once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def send_signal(job_id: str, name: str, timeout_s: float = 60.0) -> None:
    """``scancel --signal=NAME`` to the job's running tasks, ONCE (what a preemption does with USR2).

    scancel repeats a request that slurmctld answers with "Job can not be altered now" every 5 s
    and more, for over a minute. SLURM 22.05 answers so for a task of a job array that still has
    pending tasks although it HAS signalled the task; repeated, the signal would reach the task
    again once it has requeued itself and restarted. So scancel is stopped at its first retry:
    the signal reaches what runs now or nothing, as a preemption's does.
    """
    process = subprocess.Popen(
        ["scancel", "--verbose", f"--signal={name}", job_id],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.start()
    try:
        assert process.stderr is not None
        messages = []
        for line in process.stderr:
            if "retrying" in line:  # "Job is in transitional state, retrying": the request was made
                process.terminate()
                process.wait()
                return
            messages.append(line.strip())
        code = process.wait()
    finally:
        watchdog.cancel()
    if code < 0:
        raise SlurmError(f"scancel --signal={name} {job_id} did not answer in {timeout_s:.0f} s: is the controller up?")
    if code != 0:
        errors = [m for m in messages if "error" in m.lower()] or messages[-1:]
        raise SlurmError(f"scancel --signal={name} {job_id} failed (exit {code}): {' '.join(errors)}")


def cancel_jobs(job_ids: list[str], wait_s: float = 0.0) -> None:
    """``scancel`` the jobs, then wait up to ``wait_s`` until they have left the queue."""
    if not job_ids:
        return
    subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)
    deadline = time.monotonic() + wait_s
    while (
        time.monotonic() < deadline
        and subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    ):
        time.sleep(0.5)
