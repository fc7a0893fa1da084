"""``RUN/launch.json``: the record of a SLURM run's profile, submissions, attempts and last error.

Written by the submitting process (profile, resources, one entry per submitted job) and by
rank 0 of each job (one entry per attempt: running, requeued, finished, failed, ...).
Replaced atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher.errors import RunDirError

LAUNCH_JSON = "launch.json"
LOCAL_JSON = "local.json"  # a run of this machine: the wall time of each attempt
GRID_FILE = "grid.yaml"  # a sweep directory: its grid (launcher/sweeps.py)


def read_launch(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / LAUNCH_JSON
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {LAUNCH_JSON}: it is not a SLURM run of this tool")
    return json.loads(path.read_text())


def write_launch(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = Path(run_dir) / f".{LAUNCH_JSON}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, Path(run_dir) / LAUNCH_JSON)


def update_launch(run_dir: Path, **fields: Any) -> None:
    """Set top-level ``fields`` of RUN/launch.json under its lock, so that a job's ranks recording
    their attempts at the same moment lose nothing (``launch status`` and ``cancel`` write here)."""
    with updating(run_dir):
        record = read_launch(run_dir)
        record.update(fields)
        write_launch(run_dir, record)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@contextlib.contextmanager
def updating(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.launch.lock: every rank of a job may update launch.json at once (when all fail)."""
    import fcntl

    fd = os.open(Path(run_dir) / ".launch.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_attempt(
    run_dir: Path,
    job_id: str,
    attempt: int,
    outcome: str,
    step: int | None = None,
    error: str | None = None,
    rank: int = 0,
    failed_at: float | None = None,
) -> None:
    """Add or update the entry of (job, attempt) in RUN/launch.json.

    A new attempt of a job means SLURM requeued it: an earlier attempt still marked running
    (killed before it could report, e.g. at the end of a preemption's grace time) or
    terminated (it checkpointed on SIGTERM) is recorded as requeued by SLURM. When ranks fail,
    each records its error with the time it failed, and the attempt's error is the first one:
    the others are mostly its consequence (a peer's connection closing).
    """
    failed_at = time.time() if failed_at is None else failed_at
    with updating(run_dir):
        _record_attempt(run_dir, job_id, attempt, outcome, step, error, rank, failed_at)


def _record_attempt(
    run_dir: Path,
    job_id: str,
    attempt: int,
    outcome: str,
    step: int | None,
    error: str | None,
    rank: int,
    failed_at: float,
) -> None:
    try:
        record = read_launch(run_dir)
    except (RunDirError, json.JSONDecodeError):
        record = {"jobs": []}
    attempts = record.setdefault("attempts", [])
    entry = next((a for a in attempts if a["job_id"] == job_id and a["attempt"] == attempt), None)
    if entry is None:
        for earlier in attempts:
            if (
                earlier["job_id"] == job_id
                and earlier["attempt"] < attempt
                and earlier["outcome"] in ("running", "terminated")
            ):
                earlier.update(outcome="requeued", by="slurm")
        entry = {"job_id": job_id, "attempt": attempt, "started": now()}
        attempts.append(entry)
    entry["outcome"] = outcome
    if outcome != "running":
        entry["ended"] = now()
    if step is not None:
        entry["step"] = step
    if error is not None:
        errors = entry.setdefault("errors", [])
        errors.append({"rank": rank, "time": failed_at, "error": error})
        errors.sort(key=lambda e: e["time"])
        entry["error"] = record["last_error"] = errors[0]["error"]
    write_launch(run_dir, record)
