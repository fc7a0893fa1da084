"""`launch` against the real local SLURM cluster (`bash slurm/local-cluster.sh up`).

Every job is a tiny PCAE on a small image folder, 2 nodes x 1 CPU task. A requeued job waits
about 15 s before it restarts (cred_expire=10 plus the scheduler's pass).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.experiment import experiment_from_dict
from launcher.runs import read_metrics
from launcher.slurm import control
from launcher.slurm.records import LAUNCH_JSON, read_launch
from tests.helpers import finetune_experiment, launch, make_image_folder, tiny_experiment
from tests.integration.slurm_helpers import TERMINAL, wait_for

pytestmark = pytest.mark.slurm


NUM_EPOCHS = 8  # 4 steps per epoch: 32 steps, a few seconds of training


@pytest.fixture(scope="module")
def shared(cluster) -> Iterator[Path]:
    """A folder every node sees (not /tmp), with the image folder and the experiment file."""
    path = Path(tempfile.mkdtemp(prefix="launch-slurm-test-", dir="/var/tmp"))
    images = make_image_folder(path / "images")
    cfg = tiny_experiment("pcae", images, train={"num_epochs": NUM_EPOCHS})
    cfg["method"].update(drop_path=0.0, decoder_drop_path=0.0)  # no per-rank randomness
    (path / "pcae.yaml").write_text(yaml.safe_dump(cfg))
    yield path
    # A cancelled job still checkpoints for a few seconds: wait until every job has left.
    jobs = [
        j["job_id"] for record in path.glob(f"*/{LAUNCH_JSON}") for j in json.loads(record.read_text()).get("jobs", [])
    ]
    deadline = time.monotonic() + 60
    while (
        jobs
        and time.monotonic() < deadline
        and subprocess.run(
            ["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"], capture_output=True, text=True
        ).stdout.strip()
    ):
        time.sleep(0.5)
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


def submit(shared: Path, name: str, *extra: str, time: str = "10") -> Path:
    run = shared / name
    experiment = shared / "pcae.yaml"
    assert (
        launch(
            f"pretrain pcae --cluster local-test --nodes 2 --time {time} --experiment {experiment}",
            *extra,
            "--run-dir",
            run,
        )
        == 0
    )
    return run


def job_id(run: Path) -> str:
    return read_launch(run)["jobs"][-1]["job_id"]


def wait_for_step(run: Path, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (read_metrics(run) and read_metrics(run)[-1]["step"] >= step):
        assert time.monotonic() < deadline, f"no step {step} after {timeout_s} s: {control.run_status(run)}"
        time.sleep(0.2)


def wait_for_attempts(run: Path, outcomes: list[str], timeout_s: float) -> list[dict]:
    """Wait until RUN/launch.json's attempts have these outcomes; return them."""
    deadline = time.monotonic() + timeout_s
    while True:
        attempts = read_launch(run).get("attempts", [])
        if [a["outcome"] for a in attempts] == outcomes:
            return attempts
        assert time.monotonic() < deadline, f"attempts {attempts}, not {outcomes}, after {timeout_s} s"
        time.sleep(0.2)


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 1e-5 * abs(w), f"step {step}: {g} vs {w}"


def test_two_node_job_gives_the_losses_of_one_process(shared: Path, reference_losses: list[float], capsys) -> None:
    submit(shared, "ddp", "--dry-run")
    dry_run_script = capsys.readouterr().out.split("# sbatch script\n", 1)[1]
    run = submit(shared, "ddp")
    # The dry run rendered the very script submitit wrote and SLURM ran.
    assert (run / "slurm" / "sub1" / f"{job_id(run)}_submission.sh").read_text() == dry_run_script
    status = wait_for(run, TERMINAL, 120)
    assert status["state"] == "COMPLETED", status
    assert_same_losses(losses(run), reference_losses)
    record = json.loads((run / "launch.json").read_text())
    assert record["attempts"][-1]["outcome"] == "finished"
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"COMPLETED, step {len(reference_losses)}" in out
    # Its cost, from sacct: elapsed seconds x the allocation's nodes, as `launch status` and launch.json say.
    elapsed, nodes = sacct_allocation(job_id(run))
    assert len(elapsed) == 1 and nodes == [2]
    assert f"{elapsed[0] * 2 / 3600:.3f} node-hours" in out
    assert abs(json.loads((run / "launch.json").read_text())["cost"]["node_hours"] - elapsed[0] * 2 / 3600) < 1e-9
    assert main(["logs", str(run), "--rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "global_rank=1(2)" in out  # submitit's lines...
    assert "(the trainer's log of rank 1)" in out and "[rank 1] INFO launcher.trainer" in out  # ...then the trainer's


def sacct_allocation(job: str) -> tuple[list[int], list[int]]:
    """Elapsed seconds and node counts of every attempt of a job, straight from sacct."""
    rows = subprocess.run(
        ["sacct", "-D", "-X", "-n", "-P", "-o", "ElapsedRaw,NNodes", "-j", job],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [int(r.split("|")[0]) for r in rows], [int(r.split("|")[1]) for r in rows]


def test_preempted_job_requeues_resumes_and_gives_the_same_losses(shared: Path, reference_losses: list[float]) -> None:
    # A real preemption: a job of partition `high` needs the nodes of this `debug` job.
    run = submit(shared, "preempted")
    wait_for_step(run, 3, 90)
    victim = job_id(run)
    nodes = subprocess.run(
        ["squeue", "-h", "-j", victim, "-o", "%N"], capture_output=True, text=True, check=True
    ).stdout.strip()
    # The high job must need the victim's nodes: with 2 of the 4 nodes free, a plain `-N2` job
    # starts on the free ones and preempts nothing (the run then finishes with 0 restarts).
    high = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "high",
            "-N2",
            "-w",
            nodes,
            "--exclusive",
            "-J",
            "launch-test-preemptor",
            "-o",
            "/dev/null",
            "--wrap",
            "sleep 5",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        status = wait_for(run, TERMINAL, 150)
    finally:
        subprocess.run(["scancel", high], capture_output=True, check=False)
    assert status["state"] == "COMPLETED", status
    # SLURM sent the --signal (USR2) at once, with preempt_send_user_signal; the job
    # checkpointed and requeued itself within the partition's GraceTime.
    assert "received SIGUSR2" in control.log_path(run, 0).read_text()
    attempts = read_launch(run)["attempts"]
    assert [a["outcome"] for a in attempts] == ["requeued", "finished"]
    assert 3 <= attempts[0]["step"] < len(reference_losses)
    assert status["restarts"] == 1
    assert_same_losses(losses(run), reference_losses)
    elapsed, _ = sacct_allocation(victim)  # a requeued run sums its attempts
    assert len(elapsed) == 2 and status["cost"]["attempts"] == 2
    assert abs(status["cost"]["node_hours"] - sum(elapsed) * 2 / 3600) < 1e-9
    rows = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "NodeList,State", "-j", high], capture_output=True, text=True
    ).stdout.split()
    assert rows == [f"{nodes}|COMPLETED"], rows  # it ran on the victim's nodes


def test_job_requeued_by_slurm_itself_checkpoints_on_sigterm_and_resumes(
    shared: Path, reference_losses: list[float]
) -> None:
    # What SLURM does at the end of a preemption's grace time (or at once, on a cluster without
    # one): SIGTERM to every task, SIGKILL after KillWait (5 s here), then the job is pending
    # again. The job checkpoints on SIGTERM but leaves the requeue to SLURM.
    run = submit(shared, "requeued-by-slurm")
    wait_for_step(run, 3, 90)
    subprocess.run(["scontrol", "requeue", job_id(run)], check=True)
    status = wait_for(run, TERMINAL, 150)
    assert status["state"] == "COMPLETED", status
    assert "received SIGTERM without SIGUSR2 first" in control.log_path(run, 0).read_text()
    attempts = read_launch(run)["attempts"]
    assert [(a["attempt"], a["outcome"], a.get("by")) for a in attempts] == [
        (0, "requeued", "slurm"),
        (1, "finished", None),
    ]
    assert 3 <= attempts[0]["step"] < len(reference_losses)  # it checkpointed before SIGKILL
    assert status["restarts"] == 1
    assert_same_losses(losses(run), reference_losses)


def test_time_limit_signal_requeues_and_the_job_resumes_with_the_same_losses(shared: Path) -> None:
    # --time 2 with the profile's signal_delay_s 60: slurmctld checks time limits every 30 s
    # and sends USR2@60 up to 30 s early, so 30-60 s after the job started. The run is far
    # longer than 2 min, so the signal always comes while it trains, however fast the machine.
    # Once the requeued job has logged steps past its checkpoint, the job is cancelled and every
    # logged loss is compared with the first steps of the same run, uninterrupted.
    from launcher.trainer import Trainer

    run = submit(shared, "time-limit", "train.num_epochs=500", time="2")
    attempts = wait_for_attempts(run, ["requeued"], 120)
    stopped_at = attempts[0].get("step", 0)  # none if the signal came before training started
    assert "received SIGUSR2" in control.log_path(run, 0).read_text() or not stopped_at
    compare = stopped_at + 3
    # The reference, in this process, while the requeued job waits to restart.
    cfg = yaml.safe_load((shared / "pcae.yaml").read_text())
    cfg["train"]["num_epochs"] = 500
    reference = Trainer(experiment_from_dict(cfg), shared / "time-limit-reference").fit(until_step=compare)
    assert reference.step == compare
    wait_for_step(run, compare, 120)
    assert main(["cancel", str(run)]) == 0
    wait_for(run, TERMINAL, 60)
    attempts = read_launch(run)["attempts"]
    assert (attempts[0]["outcome"], attempts[0].get("by"), attempts[1]["attempt"]) == ("requeued", None, 1)
    assert_same_losses(losses(run)[:compare], losses(shared / "time-limit-reference"))


def wait_until_unlocked(run: Path, timeout_s: float) -> None:
    """Until no process holds the run directory's lock (the job's last process has exited)."""
    from launcher.errors import RunDirError
    from launcher.runs import check_unlocked

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check_unlocked(run)
        except RunDirError:
            assert time.monotonic() < deadline, f"{run} still locked after {timeout_s} s"
            time.sleep(0.5)


def test_cancel_is_reported_as_cancelled(shared: Path, capsys) -> None:
    run = submit(shared, "cancelled", "train.num_epochs=500")
    wait_for(run, ("RUNNING",), 60)
    assert main(["cancel", str(run)]) == 0
    assert "cancelled job(s)" in capsys.readouterr().out
    status = wait_for(run, TERMINAL, 30)
    assert status["state"] == "CANCELLED"
    assert main(["status", str(run)]) == 0
    assert "CANCELLED" in capsys.readouterr().out
    # SLURM says CANCELLED as soon as it has signalled the job; its process may still be writing
    # its checkpoint and holding the run directory's lock, which a resume rightly refuses.
    wait_until_unlocked(run, 60)
    assert main(["resume", str(run)]) == 0  # resubmits the same config from its newest checkpoint
    assert len(read_launch(run)["jobs"]) == 2
    assert main(["cancel", str(run)]) == 0
    assert wait_for(run, TERMINAL, 30)["state"] == "CANCELLED"


def test_requeues_are_bounded_and_the_reason_recorded(shared: Path, capsys) -> None:
    run = submit(shared, "bounded", "train.num_epochs=500", "--max-requeues", "0")
    deadline = time.monotonic() + 90
    while not read_metrics(run):
        assert time.monotonic() < deadline, control.run_status(run)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", read_launch(run)["jobs"][-1]["job_id"]], check=True)
    status = wait_for(run, TERMINAL, 60)
    assert status["state"] == "FAILED"
    assert "after 0 requeues; the limit is 0 (--max-requeues)" in status["last_error"]
    assert read_launch(run)["attempts"][-1]["outcome"] == "stopped"
    assert main(["status", str(run)]) == 0
    assert "last error: stopped at step" in capsys.readouterr().out


def test_two_node_finetuning_gives_the_losses_of_one_process_and_evaluates(shared: Path) -> None:
    """`launch finetune` goes through the same SLURM path: Mixup, RandAugment, layer decay, eval."""
    from launcher.trainer import Trainer

    source = shared / "finetune-source"
    assert launch(f"pretrain pcae --experiment {shared / 'pcae.yaml'} --run-dir {source} train.num_epochs=1") == 0
    experiment = finetune_experiment(shared / "images", keep_ratio=0.75)
    for key in ("size", "img_size", "patch_size", "in_chans", "mlp_ratio"):
        experiment["method"].pop(key)
    experiment["method"]["drop_path"] = 0.0  # no per-rank randomness
    (shared / "finetune.yaml").write_text(yaml.safe_dump(experiment))
    run = shared / "finetune-ddp"
    command = f"finetune {source} --cluster local-test --nodes 2 --time 10 --experiment {shared / 'finetune.yaml'}"
    assert launch(command, "--run-dir", run) == 0
    # The same config in this process: one rank, two accumulation steps.
    cfg = experiment_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert Trainer(cfg, shared / "finetune-reference").fit().finished
    status = wait_for(run, TERMINAL, 120)
    assert status["state"] == "COMPLETED", status
    assert_same_losses(losses(run), losses(shared / "finetune-reference"))
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["samples"] == 36 and evaluation["step"] == len(losses(run))


def test_a_preemption_signal_during_start_up_requeues_and_the_run_finishes(shared: Path) -> None:
    """USR2 while the tasks are still importing torch: no checkpoint to write, the job requeues itself."""
    run = submit(shared, "usr2-at-start")
    job = job_id(run)
    deadline = time.monotonic() + 60
    # Once both tasks have started Python (submitit's first log line), and before either has its
    # handlers: the job body is importing torch, or submitit is still loading it.
    logs = [None, None]
    while not all(log is not None and log.is_file() and log.read_text() for log in logs):
        assert time.monotonic() < deadline, control.run_status(run)
        if control.queue_state(job) == "RUNNING":
            logs = [control.log_path(run, rank) for rank in (0, 1)]
        time.sleep(0.02)
    control.send_signal(job, "USR2")
    status = wait_for(run, TERMINAL, 180)
    assert status["state"] == "COMPLETED", status
    attempts = read_launch(run)["attempts"]
    assert attempts[0]["outcome"] == "requeued" and attempts[-1]["outcome"] == "finished"
    assert attempts[0].get("step", 0) == 0  # nothing was trained, nothing checkpointed


def test_a_rank_that_fails_is_reported_not_the_peers_it_took_down(shared: Path) -> None:
    """The data set disappears between submission and start: rank 0's own error is the run's error."""
    images = shared / "vanishing-images"
    make_image_folder(images)
    experiment = shared / "vanishing.yaml"
    experiment.write_text(yaml.safe_dump(tiny_experiment("pcae", images)))
    run = shared / "vanishing"
    assert (
        launch(f"pretrain pcae --cluster local-test --nodes 2 --time 10 --experiment {experiment} --run-dir {run}") == 0
    )
    shutil.rmtree(images)  # the job starts seconds later and finds no data
    status = wait_for(run, TERMINAL, 120)
    assert status["state"] == "FAILED", status
    # Every rank finds the data gone; whichever failed first is named, with its own error, not a peer's
    # broken collective.
    assert re.match(r"rank [01]: DataError: data.root", status["last_error"]), status["last_error"]


def test_two_node_job_on_shards_decoded_on_the_device_gives_the_losses_of_one_process(shared: Path) -> None:
    # The shards of the shared image folder, read by offset from one index on every rank; the
    # device path's halves on the workers and the tasks (the CPU here).
    from launcher.data.shards import write_shards
    from launcher.trainer import Trainer

    write_shards(shared / "images", shared / "shards", shard_size_mb=0.05)
    raw = yaml.safe_load((shared / "pcae.yaml").read_text())
    raw["data"].update(name="shards", root=str(shared / "shards"), augment="mae", decode="device")
    (shared / "pcae-shards.yaml").write_text(yaml.safe_dump(raw))
    assert Trainer(experiment_from_dict(raw), shared / "shards-reference").fit().finished
    run = shared / "shards-ddp"
    command = f"pretrain pcae --cluster local-test --nodes 2 --time 10 --experiment {shared / 'pcae-shards.yaml'}"
    assert launch(command, "--run-dir", run) == 0
    status = wait_for(run, TERMINAL, 120)
    assert status["state"] == "COMPLETED", status
    assert_same_losses(losses(run), losses(shared / "shards-reference"))
