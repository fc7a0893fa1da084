"""The one submission plan without a cluster: bad input, dry runs, the exact sbatch script."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from launcher.experiment import load_experiment
from launcher.slurm.submit import Request, submit
from launcher.work import TrainingWork
from tests.helpers import GOLDEN, fake_slurm, launch


def test_the_sbatch_script_matches_the_golden_file(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM: the dry run renders without asking it
    cfg = load_experiment(None, ["data.root=/"], method="pcae")
    work = TrainingWork(cfg, Path("pcae.yaml"), Path("/shared/runs/pretrain-x"), Path("unused"))
    text = submit(work, Request("local-test", nodes=2), dry_run=True).text
    script = text.split("# sbatch script\n", 1)[1].replace(shlex.quote(sys.executable), "PYTHON")
    assert script == (GOLDEN / "pretrain_local-test_2nodes.sbatch").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--cluster nope", "unknown cluster profile 'nope'; looked in "),
        ("--cluster nope.yaml", "cluster profile file nope.yaml does not exist"),
        ("--cluster local-test --nodes 9", "max_nodes: 4"),
        ("--cluster local-test --local", "--local runs on this machine"),
        (
            "--cluster local-test --partition gpu",
            "partition 'gpu' does not exist on this cluster; partitions: debug, high",
        ),
        ("--cluster local-test --partition high --nodes 4", "more than partition 'high' has (2"),
        ("--cluster local-test --nodes 3", "train.global_batch_size (4096) is not a multiple"),
        ("--cluster local-test --run-dir /tmp/launch-run", "local to each machine"),
        ("--cluster local-test --run-dir FILE/run", "FILE is a file, not a directory"),
        ("--cluster local-test --max-requeues -1", "--max-requeues must be >= 0"),
        ("--cluster local-test --time 1", "--time 1 min leaves no time to train"),
        ("--cluster local-test NO_DATA", "data.root is not set"),
        ("--cluster local-test data.root=/no/such/folder", "data.root /no/such/folder does not exist on this host"),
    ],
)
def test_bad_slurm_input_exits_2_before_anything_is_written(
    shared_tmp: Path, monkeypatch, capsys, flags: str, message: str
) -> None:
    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})  # its sbatch fails the test if called
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    (shared_tmp / "FILE").write_text("")
    flags = flags.replace("FILE", str(shared_tmp / "FILE"))
    if "data.root" not in flags:  # an existing data folder, so that the later checks are reached
        flags = flags.replace(" NO_DATA", "") if "NO_DATA" in flags else f"{flags} data.root={shared_tmp}"
    if "--run-dir" not in flags:
        flags += f" --run-dir {shared_tmp / 'runs' / 'x'}"
    assert launch(f"pretrain pcae {flags}") == 2
    assert message.replace("FILE", str(shared_tmp / "FILE")) in capsys.readouterr().err
    assert not (shared_tmp / "runs").exists()


def test_no_sbatch_on_path_is_a_clear_error(shared_tmp: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))
    assert (
        launch(f"pretrain pcae --cluster local-test --nodes 2 data.root={shared_tmp} --run-dir", shared_tmp / "run")
        == 2
    )
    assert "no `sbatch` on PATH" in capsys.readouterr().err
    assert not (shared_tmp / "run").exists()


def test_dry_run_prints_config_run_dir_and_sbatch_script_and_submits_nothing(
    shared_tmp: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))  # no SLURM at all: a dry run still renders the script
    run = shared_tmp / "shared" / "run"
    assert (
        launch(
            f"pretrain pcae --cluster local-test --nodes 2 --time 10 --dry-run data.root={shared_tmp} --run-dir", run
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"# run directory: {run}\n" in out and "method:\n  name: pcae" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --time=10\n" in out
    assert "\n# 2 processes x 64 micro-batch x 32 accumulation = global batch 4096; lr 0.0024 (blr 0.00015 x " in out
    assert f"-m submitit.core._submit {run}/slurm/sub1\n" in out
    assert not run.exists()


def test_a_dry_run_without_the_data_renders_the_job_and_lists_what_a_submission_needs(
    shared_tmp: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))  # a laptop: no SLURM, no data, the ViT-B experiment
    run = shared_tmp / "runs" / "x"
    assert launch("pretrain pcae --cluster local-test --nodes 4 --dry-run --run-dir", run) == 0
    out, err = capsys.readouterr()
    assert "# experiment: " in out and "pcae_vit_base.yaml" in out and "  size: base\n" in out
    assert "#SBATCH --nodes=4\n" in out and f"-m submitit.core._submit {run}/slurm/sub1\n" in out
    assert err.startswith("dry run only: a real submission from this machine would refuse until these are fixed:\n")
    assert "  - data.root is not set: point it at the imagefolder data set" in err
    assert "  - no `sbatch` on PATH" in err
    assert not (shared_tmp / "runs").exists()
    # The real submission still refuses, on the first of them, and leaves nothing behind.
    assert launch("pretrain pcae --cluster local-test --nodes 4 --run-dir", run) == 2
    out, err = capsys.readouterr()
    assert out == "" and "data.root is not set" in err and "sbatch" not in err
    assert not (shared_tmp / "runs").exists()


def test_a_dry_run_lists_a_missing_data_folder_and_partition_and_renders_the_rest(
    shared_tmp: Path, monkeypatch, capsys
) -> None:
    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})  # its sbatch fails the test if called
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    flags = f"--cluster local-test --partition gpu --run-dir {shared_tmp / 'runs' / 'x'} data.root=/no/such/folder"
    assert launch(f"pretrain pcae --dry-run {flags}") == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --partition=gpu\n" in out and "  root: /no/such/folder\n" in out
    problems = err.splitlines()[1:]
    assert len(problems) == 2, err
    assert problems[0].startswith("  - data.root /no/such/folder does not exist on this host")
    assert problems[1].startswith("  - partition 'gpu' does not exist on this cluster; partitions: debug, high")
    assert launch(f"pretrain pcae {flags}") == 2
    assert "data.root /no/such/folder does not exist" in capsys.readouterr().err
    assert not (shared_tmp / "runs").exists()


def test_a_dry_run_with_everything_in_place_lists_nothing(shared_tmp: Path, monkeypatch, capsys) -> None:
    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    assert launch(f"pretrain pcae --cluster local-test --dry-run data.root={shared_tmp} --run-dir {shared_tmp}/r") == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --nodes=1\n" in out and err == ""


def test_a_local_dry_run_lists_the_data_a_real_run_needs(tmp_path: Path, capsys) -> None:
    assert launch("pretrain pcae --experiment pretrain/pcae_vit_base --dry-run --run-dir", tmp_path / "run") == 0
    out, err = capsys.readouterr()
    assert "  size: base\n" in out
    assert err == (
        "dry run only: a real run on this machine would refuse until these are fixed:\n"
        "  - data.root is not set: point it at the imagefolder data set, e.g. `data.root=/path/to/data`\n"
    )
    assert not (tmp_path / "run").exists()
