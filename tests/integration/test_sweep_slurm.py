"""`launch sweep pretrain` against the real local SLURM cluster: a 2 x 2 grid as one job array.

Each point is a tiny PCAE of 1 node x 1 CPU task; at most two run at once (``--max-parallel 2``).
One task is sent USR2 (what a preemption sends): it checkpoints, requeues itself and finishes;
all four points finish, and the same command again submits nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher.runs import read_metrics
from launcher.slurm import control
from launcher.slurm.records import read_launch
from launcher.sweeps import finished, point_dir
from tests.helpers import launch, make_image_folder, tiny_experiment

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def shared(cluster) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="launch-sweep-test-", dir="/var/tmp"))
    images = make_image_folder(path / "images")
    cfg = tiny_experiment("pcae", images, train={"num_epochs": 8})
    (path / "pcae.yaml").write_text(yaml.safe_dump(cfg))
    yield path
    for record in path.glob("sweep/launch.json"):
        control.cancel_jobs([j["job_id"] for j in read_launch(record.parent).get("jobs", [])], wait_s=60)
    shutil.rmtree(path, ignore_errors=True)


def queued(job_id: str) -> bool:
    """Whether any task of the job is still pending or running."""
    squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True, timeout=30)
    return bool(squeue.stdout.strip())


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.5)


def sweep_command(shared: Path, sweep: Path) -> str:
    return (
        f"sweep pretrain pcae --cluster local-test --nodes 1 --time 10 --max-parallel 2 "
        f"--experiment {shared / 'pcae.yaml'} --sweep-dir {sweep} "
        f"--grid optim.blr=1e-3,2e-3 --grid method.mask_ratio=0.5,0.75"
    )


def submit_array(command: str, sweep: Path, capsys) -> dict:
    assert launch(command) == 0
    assert "submitted job array" in capsys.readouterr().out
    (array,) = read_launch(sweep)["jobs"]
    tasks = array["tasks"]
    assert len(tasks) == 4 and all(job.startswith(f"{array['job_id']}_") for job in tasks.values())
    return array


def wait_for_the_array(sweep: Path, array: dict) -> None:
    """Every point finished and every task of the array out of the queue (its processes have exited)."""
    tasks = array["tasks"]
    wait_until(lambda: all(finished(point_dir(sweep, name)) for name in tasks), 600, "all four points finished")
    wait_until(lambda: not queued(array["job_id"].split("_")[0]), 120, "the array out of the queue")


def test_a_two_by_two_grid_is_one_array_and_is_not_retrained(shared: Path, capsys) -> None:
    sweep = shared / "sweep"
    command = sweep_command(shared, sweep)
    array = submit_array(command, sweep, capsys)
    wait_for_the_array(sweep, array)
    for name in array["tasks"]:
        steps = [m["step"] for m in read_metrics(point_dir(sweep, name))]
        assert steps == list(range(1, 33)), (name, steps)
        assert [a["outcome"] for a in read_launch(point_dir(sweep, name))["attempts"]] == ["finished"]

    assert launch("status", sweep) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")]
    assert len(rows) == 4 and all("FINISHED" in row or "COMPLETED" in row for row in rows), rows

    assert launch(command) == 0  # the same command again: every point has finished
    assert "nothing submitted" in capsys.readouterr().out
    assert read_launch(sweep)["jobs"] == [array]


def test_a_preempted_array_task_requeues_once_and_finishes(shared: Path, capsys) -> None:
    sweep = shared / "sweep-preempted"
    array = submit_array(sweep_command(shared, sweep), sweep, capsys)
    tasks = array["tasks"]
    victim = sorted(tasks)[0]
    run = point_dir(sweep, victim)
    wait_until(lambda: read_metrics(run) and read_metrics(run)[-1]["step"] >= 2, 180, f"training {victim}")
    control.send_signal(tasks[victim], "USR2")
    wait_for_the_array(sweep, array)
    assert "received SIGUSR2" in control.log_path(run, 0).read_text()
    for name in tasks:
        steps = [m["step"] for m in read_metrics(point_dir(sweep, name))]
        assert steps == list(range(1, steps[-1] + 1)), (name, steps)  # exact resume: no step twice
    assert [a["outcome"] for a in read_launch(run)["attempts"]] == ["requeued", "finished"]
    assert launch("status", sweep) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")]
    assert len(rows) == 4 and all("FINISHED" in row or "COMPLETED" in row for row in rows), rows
