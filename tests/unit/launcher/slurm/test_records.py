"""launch.json: attempts recorded as SLURM requeues them."""

from __future__ import annotations

from pathlib import Path

from launcher.slurm.records import read_launch, record_attempt, write_launch


def test_a_new_attempt_records_the_one_slurm_requeued_itself(shared_tmp: Path) -> None:
    write_launch(shared_tmp, {"jobs": [{"job_id": "7"}]})
    record_attempt(shared_tmp, "7", 0, outcome="running")
    record_attempt(shared_tmp, "7", 1, outcome="running")  # attempt 0 was killed, not reporting
    record_attempt(shared_tmp, "7", 1, outcome="terminated", step=12)  # checkpointed on SIGTERM
    record_attempt(shared_tmp, "7", 2, outcome="running")
    record_attempt(shared_tmp, "7", 2, outcome="requeued", step=20)  # its own requeue after USR2
    record_attempt(shared_tmp, "7", 3, outcome="finished", step=32)
    record_attempt(shared_tmp, "8", 0, outcome="running")  # another job (`launch resume`)
    attempts = read_launch(shared_tmp)["attempts"]
    assert [(a["job_id"], a["attempt"], a["outcome"], a.get("by"), a.get("step")) for a in attempts] == [
        ("7", 0, "requeued", "slurm", None),
        ("7", 1, "requeued", "slurm", 12),
        ("7", 2, "requeued", None, 20),
        ("7", 3, "finished", None, 32),
        ("8", 0, "running", None, None),
    ]
