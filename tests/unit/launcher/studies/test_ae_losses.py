"""The autoencoder loss study: sweep files, the grid, bad input, the SLURM dry run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.shipped import experiments_dir
from launcher.slurm.submit import Request, submit
from launcher.studies.ae_losses import load_sweep, trial_experiment
from launcher.work import SweepWork
from tests.helpers import GOLDEN, TINY_SWEEP, fake_slurm, launch

TUNE_DIR = experiments_dir() / "tune"


@pytest.mark.parametrize("path", sorted(TUNE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path: Path) -> None:
    sweep = load_sweep(path)
    assert len(sweep.procedures) == 6 and len(sweep.seeds) >= 3
    first = sweep.datasets[next(iter(sweep.datasets))]
    cfg = trial_experiment(
        sweep,
        {
            "procedure": "ae_iffp",
            "z": sweep.z[0],
            "gamma": sweep.gamma[0],
            "seed": 1,
            "dataset": next(iter(sweep.datasets)),
        },
    )
    assert cfg.method.name == "ae_iffp" and cfg.train.seed == 1 and cfg.data == first.autoencoder
    assert cfg.optim.blr * cfg.train.global_batch_size / 256 == pytest.approx(1e-3)  # Adam's lr, as the paper


def test_the_full_sweep_is_the_papers_grid() -> None:
    sweep = load_sweep(TUNE_DIR / "ae_losses.yaml")
    assert sweep.z == (64, 128) and sweep.gamma == (0.0, 0.01) and sweep.seeds == (0, 1, 2)
    assert set(sweep.datasets) == {"lunarlander", "stl10", "svhn"}


def test_bad_sweeps_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_SWEEP.replace("[ae_iipw, ae_iffp]", "[ae_iipw, ae_nope]"))
    with pytest.raises(ConfigError, match=r"unknown procedure\(s\) \['ae_nope'\]; known: ae_iipw"):
        load_sweep(bad)
    good = tmp_path / "good.yaml"
    good.write_text(TINY_SWEEP)
    with pytest.raises(ConfigError, match="has no data set 'svhn'; it has lunarlander"):
        load_sweep(good, only_dataset="svhn")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cluster", "nope"], "unknown cluster profile 'nope'; looked in"),
        (["--cluster", "local-test", "--nodes", "9"], "max_nodes: 4"),
        (["--cluster", "local-test", "--partition", "high", "--nodes", "4"], "more than partition 'high' has (2"),
        (["--cluster", "local-test", "--partition", "gpu"], "partition 'gpu' does not exist on this cluster"),
        (
            ["--cluster", "local-test", "--nodes", "2", "--address", "10.0.0.1:6379"],
            "--address runs the sweep on an existing Ray cluster, --nodes",
        ),
        (["--nodes", "2", "--address", "10.0.0.1:6379"], "pass one or the other"),
        (["--cluster", "local-test", "--storage", "/tmp/launch-sweeps"], "local to each machine"),
        (["--cluster", "local-test", "--resume"], "--resume: there is no sweep at"),
    ],
)
def test_bad_slurm_sweep_input_exits_2_and_submits_nothing(
    shared_tmp: Path, monkeypatch, capsys, args: list[str], message: str
) -> None:
    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})  # its sbatch fails the test if called
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    (shared_tmp / "tiny.yaml").write_text(TINY_SWEEP)
    if "--storage" not in args:
        args += ["--storage", str(shared_tmp / "runs")]
    assert launch("tune ae-losses --experiment", shared_tmp / "tiny.yaml", *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one paragraph
    assert not (shared_tmp / "runs").exists()


def test_a_slurm_sweep_dry_run_prints_the_sbatch_script_and_submits_nothing(
    shared_tmp: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PATH", str(shared_tmp))  # no SLURM at all: a dry run still renders the script
    (shared_tmp / "tiny.yaml").write_text(TINY_SWEEP)
    storage = shared_tmp / "runs"
    experiment = shared_tmp / "tiny.yaml"
    command = f"tune ae-losses --experiment {experiment} --cluster local-test --nodes 2 --time 10 --dry-run --storage"
    assert launch(command, storage) == 0
    out = capsys.readouterr().out
    assert f"# sweep tiny: 2 trials from {experiment}\n# sweep directory: {storage / 'tiny'}\n" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=1\n" in out and "#SBATCH --time=10\n" in out
    assert f"-m submitit.core._submit {storage / 'tiny'}/slurm/sub1\n" in out
    assert not storage.exists()


def test_the_sweep_sbatch_script_matches_the_golden_file(tmp_path: Path, monkeypatch) -> None:
    import shlex

    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM: the dry run renders without asking it
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    work = SweepWork(
        "ae-losses", load_sweep(tmp_path / "tiny.yaml"), tmp_path / "tiny.yaml", Path("/shared/runs"), resume=False
    )
    text = submit(work, Request("local-test", nodes=2), dry_run=True).text
    script = text.split("# sbatch script\n", 1)[1].replace(shlex.quote(sys.executable), "PYTHON")
    assert script == (GOLDEN / "tune_local-test_2nodes.sbatch").read_text()
