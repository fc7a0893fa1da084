"""The command line: clear errors with exit code 2 and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from tests.helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("args, message", [
    (["pretrain", "nope"], "unknown method 'nope'; known methods: "),
    (["pretrain", "mae", "optim.lr_typo=3"], "unknown key(s) optim.lr_typo"),
    (["pretrain", "mae", "train.num_epochs=many"], "train.num_epochs must be a int"),
    (["pretrain", "mae", "noequals"], "section.key=value"),
    (["pretrain", "mae", "--experiment", "missing.yaml"], "does not exist"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path: Path, args, message: str) -> None:
    result = run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    code = main(["pretrain", "mae", "--experiment", str(REPO / "experiments/pretrain/mae_vit_base.yaml"),
                 "data.root=" + str(tmp_path / "no-imagenet"), "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_dir_of_another_config_is_refused_untouched(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "images")
    base = ["pretrain", "mae", "--experiment", str(REPO / "experiments/pretrain/mae_vit_base.yaml"),
            "method.size=micro", "method.img_size=32", "method.patch_size=8", "method.decoder_dim=32",
            "method.decoder_depth=1", "method.decoder_num_heads=2", f"data.root={images}", "data.num_workers=0",
            "train.num_epochs=1", "train.global_batch_size=8", "train.micro_batch_size=8",
            "--run-dir", str(tmp_path / "run")]
    assert main(base) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert main(base + ["optim.blr=0.5"]) == 2
    assert "belongs to a different config (optim.blr: 0.00015 -> 0.5)" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert main(base) == 0  # the same config: resumes (already finished)


def test_dry_run_prints_the_config_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "pcae", "--dry-run", "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "name: pcae" in out and f"# run directory: {tmp_path / 'run'}" in out
    assert not (tmp_path / "run").exists()


def test_bench_pretrain_prints_speeds_flops_and_ratios(capsys) -> None:
    assert main(["bench", "pretrain", "--sizes", "micro", "--batch-size", "4", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "fp32 matmul peak" in out or "bf16 matmul peak" in out
    assert "micro      4  mae" in out and "micro      4  pcae" in out
    assert "PCAE/MAE speed: measured" in out and "FLOP ratio" in out


def test_bench_finetune_prints_gains_for_each_drop_ratio(capsys) -> None:
    assert main(["bench", "finetune", "--size", "micro", "--batch-size", "2", "--drop-ratios", "0,0.4",
                 "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "196 -> 117 -> 70 -> 42" in out  # the patch tokens of each stage at drop ratio 0.4
    assert "throughput gain / FLOP gain, worst drop ratio" in out
