"""A run of this machine while it trains: listed as running, its log followed, cancelled (SIGTERM: it
checkpoints and stops), resumed, then killed outright (SIGKILL: it ends without a record)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from launcher import checkpoint
from launcher.runs import read_metrics
from tests.helpers import REPO, make_image_folder, tiny_experiment


def launch_process(*args: str, cwd: Path, out: Path) -> subprocess.Popen:
    with open(out, "w") as f:  # a file, not a pipe: nobody reads while the test waits
        return subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )


def launch_output(*args: str, cwd: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def wait_for_metrics(run: Path, process: subprocess.Popen, after_step: int, log: Path) -> None:
    """Until the run has logged a step past ``after_step`` (its process must still be training)."""
    deadline = time.monotonic() + 180  # a generous bound on start-up, not a measure of speed
    while not [m for m in read_metrics(run) if m["step"] > after_step]:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def test_a_running_local_run_is_listed_followed_cancelled_and_a_killed_one_is_told_apart(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=4)
    experiment = tmp_path / "mae.yaml"
    cfg = tiny_experiment("mae", images, train={"num_epochs": 100000, "log_every": 1})  # never ends by itself
    experiment.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "long"
    command = ("pretrain", "mae", "--experiment", str(experiment), "--run-dir", "runs/long")

    training = launch_process(*command, cwd=tmp_path, out=tmp_path / "train.out")
    try:
        wait_for_metrics(run, training, 0, tmp_path / "train.out")
        code, out = launch_output("status", cwd=tmp_path)
        assert code == 0 and f"runs/long: local run, pid {training.pid} on " in out and " RUNNING, step " in out, out

        follower = launch_process("logs", "runs/long", "--follow", cwd=tmp_path, out=tmp_path / "follow.out")
        code, out = launch_output("cancel", "runs/long", cwd=tmp_path)
        assert code == 0 and f"sent SIGTERM to pid {training.pid}" in out, out
        assert training.wait(timeout=120) == 0, (tmp_path / "train.out").read_text()
        # The follower returns by itself once the run has ended, with the log's last lines.
        assert follower.wait(timeout=120) == 0
        followed = (tmp_path / "follow.out").read_text()
        assert "checkpointing at the next step boundary" in followed and "stopping at step" in followed, followed
    finally:
        if training.poll() is None:
            training.kill()

    stopped = [m["step"] for m in read_metrics(run)][-1]
    assert checkpoint.latest_valid(run) == checkpoint.checkpoint_path(run, stopped)
    code, out = launch_output("status", "runs/long", cwd=tmp_path)
    assert code == 0 and f" STOPPED, step {stopped}/" in out and "CPU-hours" in out, out
    code, out = launch_output("cancel", "runs/long", cwd=tmp_path)
    assert code == 0 and "has already ended (STOPPED at step" in out and "nothing to cancel" in out, out

    # The same command resumes it; a SIGKILL leaves no end on record, and status and cancel say so.
    resumed = launch_process(*command, cwd=tmp_path, out=tmp_path / "resume.out")
    try:
        wait_for_metrics(run, resumed, stopped, tmp_path / "resume.out")
    finally:
        resumed.send_signal(signal.SIGKILL)
        resumed.wait(timeout=60)
    code, out = launch_output("status", "runs/long", cwd=tmp_path)
    assert code == 0 and f"pid {resumed.pid} on " in out and "ENDED WITHOUT A RECORD" in out and "restarts 1" in out
    code, out = launch_output("cancel", "runs/long", cwd=tmp_path)
    assert code == 0 and f"its process {resumed.pid} is gone" in out, out
