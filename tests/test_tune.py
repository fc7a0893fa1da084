"""The Ray Tune sweep: sweep files, and a real 2-trial sweep interrupted and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.tune import TUNE_DIR, load_sweep, trial_experiment

REPO = Path(__file__).resolve().parents[1]

TINY_SWEEP = """
name: tiny
procedures: [ae_iipw, ae_iffp]
z: [8]
gamma: [0.0]
seeds: [0]
cpus_per_trial: 2          # one trial at a time, so the sweep can be stopped between them
max_failures: 0
train: {num_epochs: 1, global_batch_size: 32, micro_batch_size: 32, log_every: 1, checkpoint_every: 100}
predictors: {hidden_sizes: [[], [8]], max_epochs: 5, patience: 2}
datasets:
  lunarlander:
    task: regression
    targets: [0, 1]
    on_screen_only: true
    autoencoder: {name: lunarlander, root: ll-ae, generate_frames: 96, generate_seed: 1, augment: none,
                  mean: [0, 0, 0], std: [1, 1, 1], num_workers: 0}
    predictor: {name: lunarlander, root: ll-pred, generate_frames: 200, generate_seed: 2, augment: none,
                mean: [0, 0, 0], std: [1, 1, 1], num_workers: 0}
    test: {name: lunarlander, root: ll-test, generate_frames: 100, generate_seed: 3, augment: none,
           mean: [0, 0, 0], std: [1, 1, 1], num_workers: 0}
"""


@pytest.mark.parametrize("path", sorted(TUNE_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path: Path) -> None:
    sweep = load_sweep(path)
    assert len(sweep.procedures) == 6 and len(sweep.seeds) >= 3
    first = sweep.datasets[next(iter(sweep.datasets))]
    cfg = trial_experiment(sweep, {"procedure": "ae_iffp", "z": sweep.z[0], "gamma": sweep.gamma[0],
                                   "seed": 1, "dataset": next(iter(sweep.datasets))})
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


def _terminated_in_state(sweep_dir: Path) -> int:
    """Trials the driver's own experiment state records as finished (what a restore trusts)."""
    return sum(p.read_text().count("TERMINATED") for p in sweep_dir.glob("experiment_state-*.json"))


def _results(sweep_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sweep_dir.glob("*/result.json") if p.read_text().strip()}


@pytest.mark.slow
def test_a_killed_sweep_reruns_only_its_missing_trials(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    command = [sys.executable, "-m", "launcher.cli", "tune", "ae-losses", "--experiment", "tiny.yaml",
               "--storage", "runs"]
    # Its own Ray temp dir (short: Ray's socket paths are length-limited), so nothing here
    # touches another Ray instance on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    sweep_dir = tmp_path / "runs" / "tiny"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # A trial's result.json is written before the driver saves its experiment state; a
        # restore trusts only the latter, so wait for it to record the first trial as finished.
        while not _terminated_in_state(sweep_dir) and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert len(_results(sweep_dir)) == 1, "the first trial never finished"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray daemons it started (its group)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    time.sleep(3)  # Ray's workers exit once their raylet is gone
    done_before = _results(sweep_dir)

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restoring the sweep" in second.stderr
    results = _results(sweep_dir)
    assert len(results) == 2 and len(list(sweep_dir.glob("_trainable_*"))) == 2
    for name, text in done_before.items():
        assert results[name] == text  # the finished trial was not run again
    procedures = {json.loads(t.splitlines()[-1])["config"]["procedure"] for t in results.values()}
    assert procedures == {"ae_iipw", "ae_iffp"}

    report = subprocess.run([sys.executable, "-m", "launcher.cli", "report", str(sweep_dir)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| I-I-PW |" in report.stdout and "| I-F-FP |" in report.stdout
    assert (sweep_dir / "report" / "lunarlander_z8_gamma0.0.png").is_file()


# ----------------------------------------------------------------------------- on SLURM, without a cluster


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "--nodes need a cluster profile: pass --cluster NAME (known profiles: local-test"),
    (["--cluster", "nope"], "unknown cluster profile 'nope'; known profiles: local-test"),
    (["--cluster", "local-test", "--nodes", "9"], "max_nodes: 4"),
    (["--cluster", "local-test", "--partition", "high", "--nodes", "4"], "more than partition 'high' has (2"),
    (["--cluster", "local-test", "--partition", "gpu"], "partition 'gpu' does not exist on this cluster"),
    (["--cluster", "local-test", "--nodes", "2", "--address", "10.0.0.1:6379"], "--address runs the sweep on an "
                                                                               "existing Ray cluster, --nodes"),
    (["--nodes", "2", "--address", "10.0.0.1:6379"], "pass one or the other"),
    (["--cluster", "local-test", "--storage", "/tmp/launch-sweeps"], "local to each machine"),
    (["--cluster", "local-test", "--resume"], "--resume: there is no sweep at"),
])
def test_bad_slurm_sweep_input_exits_2_and_submits_nothing(shared_tmp: Path, monkeypatch, capsys,
                                                            args: list[str], message: str) -> None:
    from launcher.cli import main
    from tests.test_slurm import fake_slurm

    fake_slurm(shared_tmp / "bin", {"debug": 4, "high": 2})  # its sbatch fails the test if called
    monkeypatch.setenv("PATH", f"{shared_tmp / 'bin'}:/usr/bin:/bin")
    (shared_tmp / "tiny.yaml").write_text(TINY_SWEEP)
    if "--storage" not in args:
        args += ["--storage", str(shared_tmp / "runs")]
    assert main(["tune", "ae-losses", "--experiment", str(shared_tmp / "tiny.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one paragraph
    assert not (shared_tmp / "runs").exists()


def test_a_slurm_sweep_dry_run_prints_the_sbatch_script_and_submits_nothing(shared_tmp: Path, monkeypatch,
                                                                            capsys) -> None:
    from launcher.cli import main

    monkeypatch.setenv("PATH", str(shared_tmp))  # no SLURM at all: a dry run still renders the script
    (shared_tmp / "tiny.yaml").write_text(TINY_SWEEP)
    storage = shared_tmp / "runs"
    assert main(["tune", "ae-losses", "--experiment", str(shared_tmp / "tiny.yaml"), "--cluster", "local-test",
                 "--nodes", "2", "--time", "10", "--storage", str(storage), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# sweep tiny: 2 trials from {shared_tmp / 'tiny.yaml'}\n# sweep directory: {storage / 'tiny'}\n" in out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=1\n" in out and "#SBATCH --time=10\n" in out
    assert f"-m submitit.core._submit {storage / 'tiny'}/slurm/sub1\n" in out
    assert not storage.exists()


def test_the_sweep_sbatch_script_matches_the_golden_file() -> None:
    import shlex

    from launcher import slurm

    profile = slurm.load_profile("local-test")
    res = slurm.resolve_resources("local-test", profile, nodes=2)
    script = slurm.render_sweep_sbatch(profile, res, Path("/shared/runs/tiny"), "launch-tune-tiny")
    script = script.replace(shlex.quote(sys.executable), "PYTHON")
    assert script == (REPO / "tests" / "golden" / "tune_local-test_2nodes.sbatch").read_text()
