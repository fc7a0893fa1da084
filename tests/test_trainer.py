"""The training loop: exact resume, divergence, learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launcher import checkpoint
from launcher.config import experiment_from_dict
from launcher.runs import read_metrics
from launcher.trainer import DivergedError, Trainer, learning_rate
from tests.helpers import tiny_experiment


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


@pytest.mark.parametrize("method", ["pcae", "mae"])
def test_interrupted_and_resumed_run_gives_identical_losses(method: str, image_folder: Path, tmp_path: Path) -> None:
    # 36 images, global batch 8 = 2 micro-batches of 4: 4 steps per epoch, 3 epochs; workers and
    # random-resized-crop augmentation on. Interrupt at step 6, mid-epoch 2.
    raw = tiny_experiment(method, image_folder, data={"num_workers": 2, "augment": "mae"},
                          train={"num_epochs": 3, "checkpoint_every": 4})
    cfg = experiment_from_dict(raw)
    straight = Trainer(cfg, tmp_path / "straight")
    assert straight.fit().finished

    interrupted = Trainer(cfg, tmp_path / "resumed")
    result = interrupted.fit(until_step=6)
    assert (result.step, result.finished) == (6, False)
    del interrupted
    resumed = Trainer(cfg, tmp_path / "resumed")
    assert resumed.resume() and resumed.state.step == 6 and resumed.state.step_in_epoch == 2
    assert resumed.fit().finished

    expected = losses(tmp_path / "straight")
    assert [s for s, _ in expected] == list(range(1, 13))
    assert losses(tmp_path / "resumed") == expected  # bitwise on CPU


def test_resume_after_a_hard_kill_truncates_the_metrics(image_folder: Path, tmp_path: Path) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, train={"checkpoint_every": 3}))
    run = tmp_path / "run"
    Trainer(cfg, run).fit(until_step=5)  # checkpoints at steps 3 and 5
    # As if the process had died after logging step 5 but before its checkpoint was sealed:
    # the newest checkpoint is damaged, so the run resumes from step 3 and re-logs steps 4-5.
    (checkpoint.checkpoint_path(run, 5) / checkpoint.MANIFEST).unlink()
    trainer = Trainer(cfg, run)
    assert trainer.resume() and trainer.state.step == 3
    trainer.fit()
    straight = tmp_path / "straight"
    Trainer(cfg, straight).fit()
    assert losses(run) == losses(straight)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, optim={"blr": 1e30, "warmup_epochs": 0},
                                               train={"checkpoint_every": 1}))
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(DivergedError, match=r"at step \d+.*last good checkpoint is .*step_"):
        trainer.fit()
    assert checkpoint.latest_valid(tmp_path / "run") is not None


def test_learning_rate_schedule() -> None:
    assert learning_rate(0, 100, 10, 1.0, 0.0) == 0.0
    assert learning_rate(5, 100, 10, 1.0, 0.0) == 0.5
    assert learning_rate(10, 100, 10, 1.0, 0.0) == 1.0
    assert math.isclose(learning_rate(55, 100, 10, 1.0, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(learning_rate(100, 100, 10, 1.0, 0.1), 0.1)


def test_the_optimizer_skips_frozen_parameters_and_decays_only_matrices(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(experiment_from_dict(tiny_experiment("pcae", image_folder)), tmp_path / "run")
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, p in model.named_parameters():
        assert (id(p) in in_optimizer) == p.requires_grad, name
    for group in trainer.optimizer.param_groups:
        if group["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in group["params"])


def test_a_stop_request_checkpoints_at_the_next_step_boundary(image_folder: Path, tmp_path: Path) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.request_stop()  # as a signal handler would, before the step's all-reduce
    result = trainer.fit()
    assert (result.step, result.finished) == (1, False)
    assert checkpoint.latest_valid(tmp_path / "run") == checkpoint.checkpoint_path(tmp_path / "run", 1)
