"""Runs of this machine are operated like SLURM runs: listed, their state and cost, their logs, cancel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import launch, make_image_folder, tiny_experiment, write_yaml


@pytest.fixture
def finished_run(tmp_path: Path, monkeypatch, capsys) -> Path:
    """A tiny MAE run trained to its end under ./runs of a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    images = make_image_folder(tmp_path / "images", per_class=4)
    experiment = write_yaml(tmp_path / "tiny.yaml", tiny_experiment("mae", images, train={"num_epochs": 2}))
    assert launch(f"pretrain mae --experiment {experiment} --run-dir runs/tiny") == 0
    capsys.readouterr()
    return Path("runs/tiny")


def test_status_of_a_local_run_shows_its_state_step_wall_time_and_cpu_hours(finished_run: Path, capsys) -> None:
    assert launch("status", finished_run) == 0
    out = capsys.readouterr().out
    assert f"{finished_run}: local run, pid " in out and " FINISHED, step 2/2, " in out, out
    cost = re.search(r"cost: 1 attempt\(s\), ([\d.]+) h wall time, .* ([\d.]+) CPU-hours", out)
    assert cost is not None, out
    # A tiny run takes seconds; the figures are there, and CPU time was counted (not left at zero).
    assert float(cost.group(1)) >= 0 and "last error" not in out
    from launcher.local_runs import status

    recorded = status(finished_run)["cost"]
    assert recorded["cpu_hours"] > 0 and recorded["wall_seconds"] > 0


def test_bare_status_lists_the_local_runs_under_runs(finished_run: Path, capsys) -> None:
    assert launch("status") == 0
    out = capsys.readouterr().out
    assert "No SLURM runs" not in out
    assert any(line.startswith(f"{finished_run}: local run") and "FINISHED" in line for line in out.splitlines()), out


def test_status_of_a_folder_lists_its_runs_and_a_folder_without_any_exits_2(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    assert launch("status runs") == 0
    assert f"{finished_run}: local run" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert launch("status empty") == 2
    err = capsys.readouterr().err
    assert "neither a run or sweep directory" in err and "Traceback" not in err


def test_logs_of_a_local_run_print_its_log(finished_run: Path, capsys) -> None:
    assert launch("logs", finished_run) == 0
    out = capsys.readouterr().out
    assert "[rank 0] INFO" in out and "checkpoint runs/tiny/checkpoints/step_0000002" in out
    assert launch("logs --follow", finished_run) == 0  # the run has ended: the whole log, then return
    assert "checkpoint runs/tiny/checkpoints/step_0000002" in capsys.readouterr().out


def test_cancel_of_a_local_run_that_has_ended_says_so_and_sends_nothing(finished_run: Path, capsys) -> None:
    assert launch("cancel", finished_run) == 0
    out = capsys.readouterr().out
    assert "has already ended (FINISHED at step 2 of 2); nothing to cancel" in out


def test_a_local_sweep_is_one_line_of_bare_status(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    images = make_image_folder(tmp_path / "images", per_class=4)
    experiment = write_yaml(tmp_path / "tiny.yaml", tiny_experiment("mae", images, train={"num_epochs": 1}))
    assert launch(f"sweep pretrain mae --local --experiment {experiment} --grid optim.blr=1e-3,2e-3") == 0
    capsys.readouterr()
    assert launch("status") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "sweep of" in line]
    assert len(lines) == 1 and "sweep of 2 point(s): 2 FINISHED" in lines[0], lines


@pytest.mark.parametrize("operation", ["status", "status runs/tiny", "logs runs/tiny", "cancel runs/tiny"])
def test_operating_a_local_run_imports_neither_torch_nor_timm(finished_run: Path, operation: str) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    script = (
        "import sys\nfrom launcher.cli import main\n"
        f"code = main({operation.split()!r})\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'submitit', 'ray') if m in sys.modules)\n"
        "print('imported:', heavy, 'exit:', code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "HOME": "."}
    )
    assert "imported: [] exit: 0" in result.stdout, result.stdout + result.stderr
