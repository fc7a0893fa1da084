"""``launch sweep pretrain``: a grid checked whole, trained point by point here, one job array on SLURM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launcher import checkpoint
from launcher.slurm.records import LOCAL_JSON
from tests.helpers import fake_slurm, launch, make_image_folder, tiny_experiment, write_yaml


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    images = make_image_folder(tmp_path / "images", per_class=4)
    return write_yaml(tmp_path / "tiny.yaml", tiny_experiment("mae", images, train={"num_epochs": 1}))


def test_a_local_sweep_trains_every_point_and_a_rerun_trains_none(tmp_path: Path, experiment: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    command = f"sweep pretrain mae --local --experiment {experiment} --sweep-dir {sweep}"
    grid = ["--grid", "optim.blr=1e-3,2e-3", "--grid", "method.mask_ratio=0.5"]
    assert launch(command, *grid) == 0
    points = sorted((sweep / "points").iterdir())
    assert [p.name for p in points] == ["00_blr=1e-3_mask_ratio=0.5", "01_blr=2e-3_mask_ratio=0.5"]
    for point, blr in zip(points, (1e-3, 2e-3)):
        config = (point / "config.yaml").read_text()
        assert f"blr: {blr}" in config and "mask_ratio: 0.5" in config
        assert checkpoint.latest_valid(point) is not None
    attempts = {p: json.loads((p / LOCAL_JSON).read_text())["attempts"] for p in points}
    assert all(a[-1]["finished"] for a in attempts.values())
    capsys.readouterr()

    assert launch(command, *grid) == 0  # the same command again: nothing left to train
    assert "nothing to train" in capsys.readouterr().out
    assert {p: json.loads((p / LOCAL_JSON).read_text())["attempts"] for p in points} == attempts

    assert launch("status", sweep) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0")]
    assert len(rows) == 2 and all("| FINISHED |" in row for row in rows), rows
    assert launch("report", sweep) == 0
    report = (sweep / "report.md").read_text()
    assert "00_blr=1e-3_mask_ratio=0.5" in report and "01_blr=2e-3_mask_ratio=0.5" in report
    assert (sweep / "report.md").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "grid, message",
    [
        (["--grid", "optim.blr_typo=1,2"], "unknown key(s) optim.blr_typo"),
        (["--grid", "optim.blr="], "empty value list"),
        (["--grid", "optim.blr=1e-3,"], "empty value list"),
        (["--grid", "optim.blr=1,2,3,4,5", "--grid", "train.seed=1,2,3", "--max-points", "10"], "--max-points 10"),
        ([], "at least one --grid"),
    ],
    ids=["unknown-key", "no-values", "empty-value", "too-many-points", "no-grid"],
)
def test_bad_grids_exit_2_and_write_nothing(tmp_path: Path, experiment: Path, capsys, grid, message) -> None:
    sweep = tmp_path / "sweep"
    code = launch(f"sweep pretrain mae --local --experiment {experiment} --sweep-dir {sweep}", *grid)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not sweep.exists()


def test_a_sweep_directory_of_another_grid_is_refused_untouched(tmp_path: Path, experiment: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "grid.yaml").write_text(json.dumps({"method": "mae", "experiment": "x", "overrides": [], "grid": {}}))
    before = sorted(p.name for p in sweep.rglob("*"))
    code = launch(f"sweep pretrain mae --local --experiment {experiment} --sweep-dir {sweep} --grid optim.blr=1e-3")
    err = capsys.readouterr().err
    assert code == 2 and "belongs to another sweep" in err, err
    assert sorted(p.name for p in sweep.rglob("*")) == before


def test_the_slurm_dry_run_is_one_job_array(
    tmp_path: Path, experiment: Path, shared_tmp: Path, monkeypatch, capsys
) -> None:
    fake_slurm(tmp_path / "bin", {"debug": 4})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    sweep = shared_tmp / "sweep"
    code = launch(
        f"sweep pretrain mae --cluster local-test --nodes 2 --time 10 --dry-run --experiment {experiment} "
        f"--sweep-dir {sweep} --grid optim.blr=1e-3,2e-3 --grid method.mask_ratio=0.5,0.75 --max-parallel 3"
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "#SBATCH --array=0-3%3" in out and "#SBATCH --nodes=2" in out
    assert "4 to train" in out and not sweep.exists()
