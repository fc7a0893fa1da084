"""SLURM dispatch without a cluster: profiles, flags, bad input, and the exact sbatch script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher import slurm
from launcher.cli import main
from launcher.errors import ConfigError, RunDirError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"


def test_every_shipped_profile_loads() -> None:
    assert "local-test" in slurm.profile_names()
    for name in slurm.profile_names():
        slurm.load_profile(name)
    profile = slurm.load_profile("local-test")
    assert (profile.partition, profile.max_nodes, profile.preempt_partition) == ("debug", 4, "high")


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown cluster profile 'nope'; known profiles: .*local-test"):
        slurm.load_profile("nope")


@pytest.mark.parametrize("text, message", [
    ("partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\nnodes: 3\n", "unknown key"),
    ("partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: many\n", "time_min must be a int"),
    ("partition: a\nruns_dir: /tmp/runs\nmax_nodes: 2\ntime_min: 5\n", "local to each machine"),
    ("partition: a\nruns_dir: runs\nmax_nodes: 2\ntime_min: 5\n", "absolute path"),
    ("runs_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\n", "partition"),
])
def test_bad_profiles_are_rejected(tmp_path: Path, monkeypatch, text: str, message: str) -> None:
    monkeypatch.setattr(slurm, "CLUSTERS_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        slurm.load_profile("bad")


def test_flags_override_the_profile() -> None:
    profile = slurm.load_profile("local-test")
    res = slurm.resolve_resources("local-test", profile, nodes=3, gpus_per_node=2, partition="high",
                                  time_min=slurm.parse_time("1:30:00"))
    assert (res.nodes, res.tasks_per_node, res.partition, res.time_min) == (3, 2, "high", 90)
    assert slurm.resolve_resources("local-test", profile).tasks_per_node == 1  # CPU: one task per node
    with pytest.raises(ConfigError, match="max_nodes: 4"):
        slurm.resolve_resources("local-test", profile, nodes=5)
    assert slurm.parse_time("2-00:00:00") == 2880 and slurm.parse_time("45") == 45


def test_master_port_differs_per_job_and_attempt() -> None:
    ports = {slurm.master_port(str(j), a) for j in range(1, 50) for a in range(3)}
    assert len(ports) == 49 * 3 and all(20000 <= p < 60000 for p in ports)


def test_the_sbatch_script_matches_the_golden_file() -> None:
    profile = slurm.load_profile("local-test")
    res = slurm.resolve_resources("local-test", profile, nodes=2)
    script = slurm.render_sbatch(profile, res, Path("/shared/runs/pretrain-x"), "launch-pcae", max_requeues=10)
    script = script.replace(slurm_python(), "PYTHON")
    golden = GOLDEN / "pretrain_local-test_2nodes.sbatch"
    assert script == golden.read_text()


def slurm_python() -> str:
    import shlex

    return shlex.quote(sys.executable)


# ----------------------------------------------------------------------------- the CLI


def fake_slurm(bin_dir: Path, partitions: dict[str, int]) -> None:
    """`sbatch` and `sinfo` stand-ins: sinfo -p P -o %D prints P's node count, nothing if unknown."""
    bin_dir.mkdir()
    lines = "\n".join(f'  {p}) echo {n} ;;' for p, n in partitions.items())
    (bin_dir / "sinfo").write_text(
        f'#!/bin/sh\nif [ "$2" = "-p" ]; then\n case "$3" in\n{lines}\n esac\n'
        f'else echo {" ".join(partitions)}; fi\n')
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho should not be called >&2; exit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "--nodes need a cluster profile: pass --cluster NAME (known profiles: local-test"),
    (["--cluster", "nope"], "unknown cluster profile 'nope'; known profiles: local-test"),
    (["--cluster", "local-test", "--nodes", "9"], "max_nodes: 4"),
    (["--cluster", "local-test", "--local"], "--local runs on this machine"),
    (["--cluster", "local-test", "--partition", "gpu"], "partition 'gpu' does not exist on this cluster; "
                                                        "partitions: debug, high"),
    (["--cluster", "local-test", "--partition", "high", "--nodes", "4"], "more than partition 'high' has (2"),
    (["--cluster", "local-test", "--nodes", "3"], "train.global_batch_size (4096) is not a multiple"),
    (["--cluster", "local-test", "--run-dir", "/tmp/launch-run"], "local to each machine"),
    (["--cluster", "local-test", "--run-dir", "FILE/run"], "is not writable"),
])
def test_bad_slurm_input_exits_2_before_anything_is_written(shared_tmp: Path, monkeypatch, capsys,
                                                             args: list[str], message: str) -> None:
    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    (shared_tmp / "FILE").write_text("")
    args = [a.replace("FILE", str(shared_tmp / "FILE")) for a in args]
    if "--run-dir" not in args:
        args += ["--run-dir", str(shared_tmp / "runs" / "x")]
    assert main(["pretrain", "pcae", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (shared_tmp / "runs").exists()


def test_no_sbatch_on_path_is_a_clear_error(shared_tmp: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))
    assert main(["pretrain", "pcae", "--cluster", "local-test", "--nodes", "2",
                 "--run-dir", str(shared_tmp / "run")]) == 2
    assert "no `sbatch` on PATH" in capsys.readouterr().err
    assert not (shared_tmp / "run").exists()


def test_dry_run_prints_config_run_dir_and_sbatch_script_and_submits_nothing(shared_tmp: Path, monkeypatch,
                                                                            capsys) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))  # no SLURM at all: a dry run still renders the script
    run = shared_tmp / "shared" / "run"
    assert main(["pretrain", "pcae", "--cluster", "local-test", "--nodes", "2", "--time", "10",
                 "--run-dir", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# run directory: {run}\n" in out and "method:\n  name: pcae" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --time=10\n" in out
    assert f"-m submitit.core._submit {run}/slurm/sub1\n" in out
    assert not run.exists()


# ----------------------------------------------------------------------------- attempts in launch.json


def test_a_new_attempt_records_the_one_slurm_requeued_itself(shared_tmp: Path) -> None:
    slurm.write_launch(shared_tmp, {"jobs": [{"job_id": "7"}]})
    slurm.record_attempt(shared_tmp, "7", 0, outcome="running")
    slurm.record_attempt(shared_tmp, "7", 1, outcome="running")  # attempt 0 was killed, not reporting
    slurm.record_attempt(shared_tmp, "7", 1, outcome="terminated", step=12)  # checkpointed on SIGTERM
    slurm.record_attempt(shared_tmp, "7", 2, outcome="running")
    slurm.record_attempt(shared_tmp, "7", 2, outcome="requeued", step=20)  # its own requeue after USR2
    slurm.record_attempt(shared_tmp, "7", 3, outcome="finished", step=32)
    slurm.record_attempt(shared_tmp, "8", 0, outcome="running")  # another job (`launch resume`)
    attempts = slurm.read_launch(shared_tmp)["attempts"]
    assert [(a["job_id"], a["attempt"], a["outcome"], a.get("by"), a.get("step")) for a in attempts] == [
        ("7", 0, "requeued", "slurm", None), ("7", 1, "requeued", "slurm", 12),
        ("7", 2, "requeued", None, 20), ("7", 3, "finished", None, 32), ("8", 0, "running", None, None)]


def test_a_signal_before_training_requeues_through_submitit_within_the_limit(shared_tmp: Path,
                                                                            monkeypatch) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    slurm.write_launch(shared_tmp, {"jobs": [{"job_id": "7"}]})
    job = slurm.TrainingJob({"method": {"name": "pcae"}}, str(shared_tmp), use_gpu=False, max_requeues=2)
    again = job.checkpoint()
    assert isinstance(again.function, slurm.TrainingJob) and again.function.max_requeues == 2
    assert slurm.read_launch(shared_tmp)["attempts"][-1]["outcome"] == "requeued"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None  # submitit then ends the job: the limit is reached
    record = slurm.read_launch(shared_tmp)
    assert record["attempts"][-1]["outcome"] == "stopped"
    assert "after 2 requeues; the limit is 2" in record["last_error"]
