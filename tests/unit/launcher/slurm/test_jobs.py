"""Job bodies: rendezvous ports, the requeue hook before training starts."""

from __future__ import annotations

from pathlib import Path

from launcher.slurm.jobs import TrainingJob, master_port
from launcher.slurm.records import read_launch, write_launch


def test_master_port_differs_per_job_and_attempt() -> None:
    ports = {master_port(str(j), a) for j in range(1, 50) for a in range(3)}
    assert len(ports) == 49 * 3 and all(20000 <= p < 60000 for p in ports)


def test_a_signal_before_training_requeues_through_submitit_within_the_limit(shared_tmp: Path, monkeypatch) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_launch(shared_tmp, {"jobs": [{"job_id": "7"}]})
    job = TrainingJob(str(shared_tmp), use_gpu=False, max_requeues=2)
    again = job.checkpoint()
    assert isinstance(again.function, TrainingJob) and again.function.max_requeues == 2
    assert read_launch(shared_tmp)["attempts"][-1]["outcome"] == "requeued"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None  # submitit then ends the job: the limit is reached
    record = read_launch(shared_tmp)
    assert record["attempts"][-1]["outcome"] == "stopped"
    assert "after 2 requeues; the limit is 2" in record["last_error"]
