"""Operating a SLURM run from the login node: state from sacct, cancel, logs, follow.

Nothing here imports torch or submitit: ``launch status|logs|cancel`` answer in a moment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.errors import RunDirError, UserError
from launcher.runs import read_metrics
from launcher.slurm.profiles import SlurmError, load_profile, profile_names
from launcher.slurm.records import LAUNCH_JSON, now, read_launch, write_launch

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


def run_status(run_dir: Path) -> dict[str, Any]:
    """The state of a SLURM run: last job's state, step and loss reached, restarts, last error."""
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


def queue_state(job_id: str) -> str:
    """The job's state in the queue right now (squeue), or "" once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def send_signal(job_id: str, name: str) -> None:
    """``scancel --signal=NAME`` to every task of the job (what preemption does with USR2)."""
    subprocess.run(["scancel", f"--signal={name}", job_id], check=True, timeout=60)


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
