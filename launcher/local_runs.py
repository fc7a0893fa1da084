"""Runs on this machine, operated like SLURM runs: ``launch status``, ``logs`` and ``cancel``.

``RUN/local.json`` records every attempt of a run trained here: the process that trains it (pid,
host, the process's start time, so a recycled pid is not taken for it), when it started, and,
once it ends, how: finished, stopped by a signal (resumable), or failed with the error. An
attempt still marked running whose process is gone ended without a word (SIGKILL, a power cut).
The cost of an attempt is its wall time and the CPU time (user + system) of its process and the
loader workers it waited for, from the start of training, not of data preparation.

Nothing here imports torch: these commands answer at once.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

from launcher.errors import RunDirError
from launcher.runs import read_metrics
from launcher.slurm.records import LOCAL_JSON

RUNNING, FINISHED, STOPPED, FAILED, VANISHED = "RUNNING", "FINISHED", "STOPPED", "FAILED", "ENDED WITHOUT A RECORD"


def is_local_run(run_dir: Path) -> bool:
    from launcher.slurm.records import LAUNCH_JSON

    return (Path(run_dir) / LOCAL_JSON).is_file() and not (Path(run_dir) / LAUNCH_JSON).is_file()


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LOCAL_JSON
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("attempts", []))
    except (ValueError, AttributeError) as e:
        raise RunDirError(
            f"{path} is not a record of this tool ({e}); move it away to reset the run's history"
        ) from None


def _write_attempts(run_dir: Path, attempts: list[dict[str, Any]]) -> None:
    path = Path(run_dir) / LOCAL_JSON
    tmp = path.with_name(f".{LOCAL_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"attempts": attempts}, indent=2) + "\n")
    os.replace(tmp, path)


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc``); None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of a process and of the children it has waited for; None where unknown."""
    if pid is None:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def start_attempt(run_dir: Path, step: int, total_steps: int) -> None:
    """Record that this process trains ``run_dir`` from ``step`` on (rank 0 of a run on this machine)."""
    pid = os.getpid()
    attempts = read_attempts(run_dir)
    attempts.append(
        {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "started_at": time.time(),
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": process_start(pid),
            "cpu_at_start": process_cpu_seconds(),
            "outcome": "running",
            "from_step": step,
            "step": step,
            "total_steps": total_steps,
            "finished": False,
        }
    )
    _write_attempts(run_dir, attempts)


def end_attempt(run_dir: Path, step: int, outcome: str, gpus: int = 0, error: str | None = None) -> None:
    """Close this process's attempt: ``outcome`` is finished, stopped (by a signal; resumable) or failed."""
    attempts = read_attempts(run_dir)
    mine = [a for a in attempts if a.get("pid") == os.getpid() and a.get("outcome") == "running"]
    if not mine:
        return
    entry = mine[-1]
    cpu = process_cpu_seconds()
    entry.update(
        outcome=outcome,
        ended=datetime.datetime.now().isoformat(timespec="seconds"),
        seconds=round(time.time() - entry["started_at"], 3),
        cpu_seconds=round(cpu - entry.get("cpu_at_start", 0.0), 3),
        step=step,
        gpus=gpus,
        finished=outcome == "finished",
    )
    if error is not None:
        entry["error"] = error
    _write_attempts(run_dir, attempts)


def process_alive(attempt: dict[str, Any]) -> bool | None:
    """Whether the attempt's process still runs; None when it ran on another host (not visible from here)."""
    if attempt.get("host") != socket.gethostname():
        return None
    pid = attempt.get("pid")
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process has that pid now, or ours under another user: decided below
    started = process_start(pid)
    return started is None or attempt.get("pid_start") is None or started == attempt["pid_start"]


def attempt_state(attempt: dict[str, Any]) -> str:
    """RUNNING, FINISHED, STOPPED, FAILED, or ENDED WITHOUT A RECORD (its process is gone)."""
    outcome = attempt.get("outcome")
    if outcome is None:  # recorded before attempts had an outcome: only ended ones were written
        return FINISHED if attempt.get("finished") else STOPPED
    if outcome == "running":
        alive = process_alive(attempt)
        if alive is None:
            return f"RUNNING on {attempt.get('host')} (not checked from here)"
        return RUNNING if alive else VANISHED
    return {"finished": FINISHED, "stopped": STOPPED, "failed": FAILED}.get(outcome, outcome.upper())


def attempt_costs(attempt: dict[str, Any], running: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one attempt; a running one counts its time so far."""
    if not running or "started_at" not in attempt:
        return float(attempt.get("seconds", 0.0)), float(attempt.get("cpu_seconds", 0.0))
    cpu = process_cpu_seconds(attempt["pid"])
    used = 0.0 if cpu is None else cpu - attempt.get("cpu_at_start", 0.0)
    return time.time() - attempt["started_at"], used


def status(run_dir: Path) -> dict[str, Any]:
    """A run of this machine, in the shape of a SLURM run's status: state, step, loss, restarts, cost."""
    attempts = read_attempts(run_dir)
    metrics = read_metrics(run_dir)
    last = attempts[-1] if attempts else {}
    state = attempt_state(last) if attempts else "NOT STARTED"
    wall = cpu = gpu = 0.0
    for attempt in attempts:
        seconds, cpu_seconds = attempt_costs(attempt, attempt is last and state == RUNNING)
        wall, cpu, gpu = wall + seconds, cpu + cpu_seconds, gpu + seconds * attempt.get("gpus", 0)
    step = metrics[-1].get("step") if metrics else None
    if state != RUNNING and last.get("step") is not None:
        step = last["step"]  # the final step is checkpointed, though not always logged
    errors = [a["error"] for a in attempts if a.get("error")]
    return {
        "run_dir": str(run_dir),
        "cluster": "this machine",
        "host": last.get("host"),
        "pid": last.get("pid"),
        "job_id": None,
        "state": state,
        "jobs": {},
        "step": step,
        "total_steps": last.get("total_steps"),
        "loss": metrics[-1].get("loss") if metrics else None,
        "restarts": max(0, len(attempts) - 1),
        "last_error": errors[-1] if errors and state == FAILED else None,
        "cost": {
            "wall_seconds": wall,
            "node_hours": wall / 3600,
            "cpu_hours": cpu / 3600,
            "gpu_hours": gpu / 3600,
            "attempts": len(attempts),
        },
    }


def cancel(run_dir: Path) -> str:
    """Stop a run training on this machine (SIGTERM: it checkpoints at its next step and stops), or say
    that it has ended already. Returns what happened, for the user."""
    attempts = read_attempts(run_dir)
    if not attempts:
        raise RunDirError(f"{run_dir} has no {LOCAL_JSON}: it has not trained on this machine; nothing to cancel")
    last = attempts[-1]
    state = attempt_state(last)
    if state.startswith("RUNNING on "):
        raise RunDirError(
            f"run {run_dir} is training on {last['host']} (pid {last['pid']}), not on this machine: run "
            f"`launch cancel {run_dir}` on {last['host']}, or `kill -TERM {last['pid']}` there"
        )
    if state == RUNNING:
        os.kill(last["pid"], signal.SIGTERM)
        return (
            f"sent SIGTERM to pid {last['pid']}, which trains {run_dir}: it checkpoints at its next step and "
            f"stops; `launch status {run_dir}` says STOPPED once it has, and the same command resumes it"
        )
    step = f" at step {last.get('step')}" + (f" of {last['total_steps']}" if last.get("total_steps") else "")
    if state == VANISHED:
        return (
            f"run {run_dir} has already ended: its process {last.get('pid')} is gone without recording an end "
            f"(killed?); nothing to cancel. Its newest checkpoint is where the same command resumes"
        )
    return f"run {run_dir} has already ended ({state}{step}); nothing to cancel"


def log_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank_{rank}.log"
