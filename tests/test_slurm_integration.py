"""`launch` against the real local SLURM cluster (`bash slurm/local-cluster.sh up`).

Without the cluster these tests skip, except under CI=true, where they fail: CI starts
the cluster first (see .ci/run), so a missing cluster there is a broken CI, not a reason
to skip. Every job is a tiny PCAE on a small image folder, 2 nodes x 1 CPU task.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher import slurm
from launcher.cli import main
from launcher.config import experiment_from_dict
from launcher.runs import read_metrics
from tests.helpers import make_image_folder, tiny_experiment

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE")
NUM_EPOCHS = 8  # 4 steps per epoch: 32 steps, a few seconds of training


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no sinfo/sbatch on PATH"
    out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return f"sinfo failed: {out.stderr.strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = cluster_problem()
    if problem:
        message = f"the local SLURM cluster is not up ({problem}); start it: bash slurm/local-cluster.sh up"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def shared(cluster) -> Iterator[Path]:
    """A folder every node sees (not /tmp), with the image folder and the experiment file."""
    path = Path(tempfile.mkdtemp(prefix="launch-slurm-test-", dir="/var/tmp"))
    images = make_image_folder(path / "images")
    cfg = tiny_experiment("pcae", images, train={"num_epochs": NUM_EPOCHS})
    cfg["method"].update(drop_path=0.0, decoder_drop_path=0.0)  # no per-rank randomness
    (path / "pcae.yaml").write_text(yaml.safe_dump(cfg))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def reference_losses(shared: Path) -> list[float]:
    """The same experiment as one process in this process: same global batch, 2 accumulation steps."""
    from launcher.trainer import Trainer

    cfg = experiment_from_dict(yaml.safe_load((shared / "pcae.yaml").read_text()))
    result = Trainer(cfg, shared / "reference").fit()
    assert result.finished
    return losses(shared / "reference")


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run)]


def submit(shared: Path, name: str, *extra: str) -> Path:
    run = shared / name
    assert main(["pretrain", "pcae", "--cluster", "local-test", "--nodes", "2", "--time", "10",
                 "--experiment", str(shared / "pcae.yaml"), "--run-dir", str(run), *extra]) == 0
    return run


def wait_for(run: Path, states: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = slurm.run_status(run)
        if status["state"] in states:
            return status
        time.sleep(1.0)
    log = slurm.log_path(run, 0)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"run {run} not in {states} after {timeout_s} s: {slurm.run_status(run)}\n{tail}")


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: {g} vs {w}"


def test_two_node_job_gives_the_losses_of_one_process(shared: Path, reference_losses: list[float],
                                                      capsys) -> None:
    run = submit(shared, "ddp")
    status = wait_for(run, TERMINAL, 120)
    assert status["state"] == "COMPLETED", status
    assert_same_losses(losses(run), reference_losses)
    record = json.loads((run / "launch.json").read_text())
    assert record["attempts"][-1]["outcome"] == "finished"
    assert main(["status", str(run)]) == 0
    assert f"COMPLETED, step {len(reference_losses)}" in capsys.readouterr().out
    assert main(["logs", str(run), "--rank", "1"]) == 0
    assert "global_rank=1(2)" in capsys.readouterr().out


def test_preempted_job_requeues_resumes_and_gives_the_same_losses(shared: Path,
                                                                   reference_losses: list[float]) -> None:
    run = submit(shared, "preempted")
    deadline = time.monotonic() + 90
    while not (read_metrics(run) and read_metrics(run)[-1]["step"] >= 3):
        assert time.monotonic() < deadline, slurm.run_status(run)
        time.sleep(0.2)
    job_id = slurm.read_launch(run)["jobs"][-1]["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what preemption sends first
    status = wait_for(run, TERMINAL, 150)
    assert status["state"] == "COMPLETED", status
    attempts = slurm.read_launch(run)["attempts"]
    assert [a["outcome"] for a in attempts] == ["requeued", "finished"]
    assert 3 <= attempts[0]["step"] < len(reference_losses)
    assert status["restarts"] == 1
    assert_same_losses(losses(run), reference_losses)


def test_cancel_is_reported_as_cancelled(shared: Path, capsys) -> None:
    run = submit(shared, "cancelled", "train.num_epochs=500")
    wait_for(run, ("RUNNING",), 60)
    assert main(["cancel", str(run)]) == 0
    assert "cancelled job(s)" in capsys.readouterr().out
    status = wait_for(run, TERMINAL, 30)
    assert status["state"] == "CANCELLED"
    assert main(["status", str(run)]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    assert main(["resume", str(run)]) == 0  # resubmits the same config from its newest checkpoint
    assert len(slurm.read_launch(run)["jobs"]) == 2
    assert main(["cancel", str(run)]) == 0
    assert wait_for(run, TERMINAL, 30)["state"] == "CANCELLED"


def test_requeues_are_bounded_and_the_reason_recorded(shared: Path, capsys) -> None:
    run = submit(shared, "bounded", "train.num_epochs=500", "--max-requeues", "0")
    deadline = time.monotonic() + 90
    while not read_metrics(run):
        assert time.monotonic() < deadline, slurm.run_status(run)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", slurm.read_launch(run)["jobs"][-1]["job_id"]], check=True)
    status = wait_for(run, TERMINAL, 60)
    assert status["state"] == "FAILED"
    assert "after 0 requeues; the limit is 0 (--max-requeues)" in status["last_error"]
    assert slurm.read_launch(run)["attempts"][-1]["outcome"] == "stopped"
    assert main(["status", str(run)]) == 0
    assert "last error: stopped at step" in capsys.readouterr().out

