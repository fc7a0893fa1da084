"""The command line: clear errors with exit code 2 and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from tests.helpers import REPO, make_image_folder, tiny_experiment


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "nope"], "unknown method 'nope'; known methods: "),
        (["pretrain", "mae", "optim.lr_typo=3"], "unknown key(s) optim.lr_typo"),
        (["pretrain", "mae", "train.num_epochs=many"], "train.num_epochs must be a int"),
        (["pretrain", "mae", "noequals"], "section.key=value"),
        (["pretrain", "mae", "--experiment", "missing.yaml"], "is neither a file (relative to"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path: Path, args, message: str) -> None:
    result = run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "pretrain",
            "mae",
            "--experiment",
            str(REPO / "experiments/pretrain/mae_vit_base.yaml"),
            "data.root=" + str(tmp_path / "no-imagenet"),
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_dir_of_another_config_is_refused_untouched(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "images")
    base = [
        "pretrain",
        "mae",
        "--experiment",
        str(REPO / "experiments/pretrain/mae_vit_base.yaml"),
        "method.size=micro",
        "method.img_size=32",
        "method.patch_size=8",
        "method.decoder_dim=32",
        "method.decoder_depth=1",
        "method.decoder_num_heads=2",
        f"data.root={images}",
        "data.num_workers=0",
        "train.num_epochs=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert main(base) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert main(base + ["optim.weight_decay=0.5"]) == 2
    assert "belongs to a different config (optim.weight_decay: 0.05 -> 0.5)" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert main(base) == 0  # the same config: resumes (already finished)


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "pcae", "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "name: pcae" in out and f"# run directory: {tmp_path / 'run'}" in out
    # The local experiment: 12,000 generated frames, batches of 128, blr 1.5e-4, 2 epochs, 1 of warmup.
    assert (
        "# 1 processes x 128 micro-batch x 1 accumulation = global batch 128; lr 7.5e-05 (blr 0.00015 x 128/256); "
        "12000 samples, 93 steps/epoch, 186 steps (warmup 93)\n"
    ) in out
    assert not (tmp_path / "run").exists()


def test_the_dry_run_schedule_is_the_one_the_run_follows(tmp_path: Path, capsys, caplog) -> None:
    """Batch split, absolute lr and steps: the dry run's line is the trainer's own."""
    import logging

    from tests.helpers import write_yaml

    frames = tmp_path / "ll"
    assert main(["data", "lunarlander", "--frames", "40", "--out", str(frames), "--workers", "1"]) == 0
    raw = tiny_experiment("mae", frames, train={"num_epochs": 1, "global_batch_size": 16})
    raw["data"].update(name="lunarlander", augment="none")
    experiment = write_yaml(tmp_path / "ll.yaml", raw)
    command = ["pretrain", "mae", "--experiment", str(experiment), "--run-dir", str(tmp_path / "run")]
    capsys.readouterr()
    assert main([*command, "--dry-run"]) == 0
    planned = capsys.readouterr().out.splitlines()[2]
    assert planned == (
        "# 1 processes x 4 micro-batch x 4 accumulation = global batch 16; lr 6.25e-05 (blr 0.001 x 16/256); "
        "40 samples, 2 steps/epoch, 2 steps (warmup 2)"
    )
    with caplog.at_level(logging.INFO, logger="launcher.trainer"):
        assert main(command) == 0
    assert any(r.getMessage().endswith(planned[2:]) for r in caplog.records), caplog.text


OPERATIONS = {"status": "status {run}", "logs": "logs {run} --rank 1", "cancel": "cancel {run}", "help": "--help"}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operating_a_run_imports_neither_torch_nor_timm(tmp_path: Path, operation: str) -> None:
    """`launch status|logs|cancel|--help` answer at once on a login node: no torch, no timm."""
    run = tmp_path / "run"
    (run / "slurm" / "sub1").mkdir(parents=True)
    (run / "launch.json").write_text('{"cluster": "c", "jobs": [{"job_id": "7", "folder": "slurm/sub1"}]}')
    (run / "slurm" / "sub1" / "7_1_log.out").write_text("the log of rank 1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '7|COMPLETED'\n")  # the job has ended
    (bin_dir / "sacct").chmod(0o755)
    command = OPERATIONS[operation].format(run=run).split()
    script = (
        "import sys\nfrom launcher.cli import main\n"
        f"try:\n    code = main({command!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'submitit', 'ray') if m in sys.modules)\n"
        "print('imported:', heavy, 'exit:', code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    assert "imported: [] exit: 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("run_dir", ["afile", "afile/sub"])
def test_a_run_dir_that_is_a_file_is_refused_clearly(tmp_path: Path, capsys, run_dir: str) -> None:
    (tmp_path / "afile").write_text("not a directory")
    assert main(["pretrain", "pcae", "--dry-run", "--run-dir", str(tmp_path / run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_a_sweep_name_may_not_climb_out_of_its_storage(tmp_path: Path, capsys) -> None:
    from tests.helpers import TINY_SWEEP

    (tmp_path / "sweep.yaml").write_text(TINY_SWEEP.replace("name: tiny", "name: ../../x"))
    assert main(["tune", "ae-losses", "--experiment", str(tmp_path / "sweep.yaml"), "--dry-run"]) == 2
    assert "sweep name '../../x' must be letters" in capsys.readouterr().err
