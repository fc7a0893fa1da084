"""The training loop: exact resume, divergence, learning-rate schedule, optimizers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher import checkpoint
from launcher.data.shards import write_shards
from launcher.errors import RunDirError
from launcher.experiment import experiment_from_dict
from launcher.local import prepare_data
from launcher.methods import build_method
from launcher.methods.classifier import ClassifierConfig
from launcher.optim import OptimConfig, build_optimizer, learning_rate
from launcher.runs import read_metrics
from launcher.trainer import DivergedError, Trainer
from tests.helpers import finetune_experiment, make_image_folder, tiny_experiment, write_stl10

TINY = {"size": "micro", "img_size": 32, "patch_size": 8}


def test_layer_decay_scales_follow_mae() -> None:
    model = build_method(ClassifierConfig(**TINY, num_classes=3))
    optimizer = build_optimizer(model, OptimConfig(layer_decay=0.5))
    scale = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    # MAE: ld^(L + 1 - layer_id), patch embedding and cls = layer 0, block i = i + 1, L = 3
    assert scale["encoder.cls_token"] == scale["encoder.patch_embed.proj.weight"] == 0.5**4
    for i in range(3):
        assert scale[f"encoder.blocks.{i}.attn.qkv.weight"] == 0.5 ** (3 - i)
    assert scale["fc_norm.weight"] == scale["head.weight"] == 1.0


def test_lars_adapts_matrices_only_as_maes_does() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    optimizer = build_optimizer(head, OptimConfig(name="lars", weight_decay=0.0))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    head(torch.randn(8, 4)).square().sum().backward()
    gw, gb = head.weight.grad.clone(), head.bias.grad.clone()
    optimizer.step()
    trust = 0.001 * w0.norm() / gw.norm()
    torch.testing.assert_close(head.weight.detach(), w0 - 0.1 * trust * gw)
    torch.testing.assert_close(head.bias.detach(), b0 - 0.1 * gb)


def test_finetuning_with_mixup_and_randaugment_resumes_exactly(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images")
    cfg = experiment_from_dict(finetune_experiment(images, keep_ratio=0.75))
    whole = Trainer(cfg, tmp_path / "whole")
    whole.fit()
    parts = Trainer(cfg, tmp_path / "parts")
    parts.fit(until_step=3)
    resumed = Trainer(cfg, tmp_path / "parts")
    assert resumed.resume()
    resumed.fit()
    assert losses(tmp_path / "whole") == losses(tmp_path / "parts")
    first, second = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("whole", "parts"))
    assert first["step"] == whole.total_steps and first["samples"] == 36
    assert first["acc1"] == second["acc1"] and first["loss"] == second["loss"]


def test_regression_on_lunarlander_reports_r2(tmp_path: Path) -> None:
    frames = {
        "name": "lunarlander",
        "root": str(tmp_path / "ll"),
        "generate_frames": 96,
        "augment": "none",
        "num_workers": 0,
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
    }
    raw = tiny_experiment("linprobe", tmp_path)
    raw["method"].update({"img_size": 64, "task": "regression", "targets": [0, 1], "pool": "grid"})
    raw["data"] = frames
    raw["eval"] = {"data": {"root": str(tmp_path / "ll-test"), "generate_frames": 48, "generate_seed": 1}}
    raw["optim"].update({"name": "lars", "weight_decay": 0.0})
    raw["train"].update({"global_batch_size": 32, "micro_batch_size": 16})
    cfg = experiment_from_dict(raw)
    prepare_data(cfg)  # generates both sets: opening a data set never does
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["samples"] == 48 and {"mse", "r2", "r2_0", "r2_1"} <= set(result)
    assert result["r2"] == pytest.approx((result["r2_0"] + result["r2_1"]) / 2)


def test_linear_probe_on_stl10_files_trains_on_train_and_evaluates_on_test(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 10)):
        write_stl10(
            tmp_path / "stl10_binary",
            split,
            rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
            rng.integers(0, 10, n),
        )
    raw = tiny_experiment("linprobe", tmp_path)
    raw["method"].update({"img_size": 32, "num_classes": 10})
    raw["data"] = {"name": "stl10", "root": str(tmp_path), "split": "train", "augment": "mae", "num_workers": 0}
    raw["eval"] = {"data": {"split": "test"}}
    raw["optim"].update({"name": "lars", "weight_decay": 0.0})
    Trainer(experiment_from_dict(raw), tmp_path / "run").fit()
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["samples"] == 10 and 0 <= result["acc1"] <= result["acc5"] <= 100


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir)]


@pytest.mark.parametrize(
    "method, data",
    [
        ("pcae", {}),
        ("mae", {}),
        ("mae", {"decode": "reduced"}),
        ("pcae", {"decode": "device"}),
        ("mae", {"name": "shards"}),
        ("pcae", {"name": "shards", "decode": "device"}),
        ("mae", {"name": "shards", "decode": "reduced"}),
    ],
    ids=["pcae", "mae", "mae-reduced", "pcae-device", "mae-shards", "pcae-shards-device", "mae-shards-reduced"],
)
def test_interrupted_and_resumed_run_gives_identical_losses(method: str, data: dict, tmp_path: Path) -> None:
    # 36 images, global batch 8 = 2 micro-batches of 4: 4 steps per epoch, 3 epochs; workers and
    # random-resized-crop augmentation on. Interrupt at step 6, mid-epoch 2. Images of 136 px
    # (JPEGs and PNGs), so that data.decode=reduced decodes many crops at 1/2 or 1/4 of their size.
    images = make_image_folder(tmp_path / "images", size=136)
    if data.get("name") == "shards":
        write_shards(images, tmp_path / "shards", shard_size_mb=0.5)
        images = tmp_path / "shards"
    raw = tiny_experiment(
        method,
        images,
        data={"num_workers": 2, "augment": "mae", **data},
        train={"num_epochs": 3, "checkpoint_every": 4},
    )
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
    cfg = experiment_from_dict(
        tiny_experiment("mae", image_folder, optim={"blr": 1e30, "warmup_epochs": 0}, train={"checkpoint_every": 1})
    )
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(DivergedError, match=r"at step \d+.*last good checkpoint is .*step_"):
        trainer.fit()
    assert checkpoint.latest_valid(tmp_path / "run") is not None


def test_the_advice_after_a_diverged_run_resumes_it_and_records_the_change(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    import yaml

    from tests.helpers import launch, write_yaml

    # The warmup's first step has lr 0, so a checkpoint of step 1 holds good weights; then the lr is huge.
    cfg = tiny_experiment("mae", image_folder, optim={"warmup_epochs": 1, "blr": 1e30})
    Trainer(experiment_from_dict(cfg), tmp_path / "run").fit(until_step=1)
    experiment = write_yaml(tmp_path / "mae.yaml", cfg)
    command = f"pretrain mae --experiment {experiment} --run-dir {tmp_path / 'run'}"
    assert launch(command) == 2
    err = capsys.readouterr().err
    assert "the loss became non-finite" in err and "run the same command with that change to resume" in err
    last_good = checkpoint.latest_valid(tmp_path / "run")
    assert last_good is not None and last_good.name == "step_0000001" and str(last_good) in err
    # What the advice says: the same command with the optimiser's settings changed.
    assert launch(f"{command} optim.blr=1e-3 optim.clip_grad=1.0") == 0, capsys.readouterr().err
    assert "(resuming)" in capsys.readouterr().out
    history = yaml.safe_load((tmp_path / "run" / "config_history.yaml").read_text())
    assert [entry["step"] for entry in history] == [checkpoint.read_trainer_state(last_good)["step"]]
    assert history[0]["changes"] == {
        "optim.blr": {"from": 1e30, "to": 1e-3},
        "optim.clip_grad": {"from": None, "to": 1.0},
    }
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["blr"] == 1e-3
    # Anything else still belongs to another config.
    assert launch(f"{command} optim.blr=1e-3 optim.clip_grad=1.0 train.seed=1") == 2
    changeable = "optim.blr, optim.min_lr, optim.clip_grad, train.mixed_precision, train.allow_inexact_resume"
    assert f"only {changeable} may change" in capsys.readouterr().err


def _damage_random_states(path: Path) -> None:
    """Overwrite rank 0's RNG file with garbage and update the manifest to match, as a bad disk block would not."""
    from launcher.checkpoint import MANIFEST, _sha256

    rng = path / "random_states_0.pkl"
    rng.write_bytes(b"not a pickle" + bytes(range(64)))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][rng.name] = {"size": rng.stat().st_size, "sha256": _sha256(rng)}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.validate(path) is None


def test_a_resume_whose_random_states_do_not_load_stops_naming_the_file(image_folder: Path, tmp_path: Path) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder, train={"checkpoint_every": 2}))
    run = tmp_path / "run"
    Trainer(cfg, run).fit(until_step=4)
    newest, older = checkpoint.list_checkpoints(run)[:2]
    _damage_random_states(newest)
    with pytest.raises(RunDirError, match="cannot restore the random states of .*random_states_0.pkl") as caught:
        Trainer(cfg, run).resume()
    assert f"move {newest} aside to resume exactly from {older}" in str(caught.value)
    # Moved aside as told, the run resumes exactly from the older checkpoint.
    newest.rename(tmp_path / "aside")
    assert Trainer(cfg, run).resume()


def test_an_inexact_resume_is_what_the_user_asks_for_and_is_logged_loudly(
    image_folder: Path, tmp_path: Path, capsys
) -> None:
    import yaml

    from tests.helpers import launch, write_yaml

    cfg = tiny_experiment("mae", image_folder, train={"checkpoint_every": 2})
    run = tmp_path / "run"
    Trainer(experiment_from_dict(cfg), run).fit(until_step=4)
    newest = checkpoint.list_checkpoints(run)[0]
    _damage_random_states(newest)
    command = f"pretrain mae --experiment {write_yaml(tmp_path / 'mae.yaml', cfg)} --run-dir {run}"
    assert launch(command) == 2
    err = capsys.readouterr().err
    assert "cannot restore the random states" in err and "train.allow_inexact_resume=true" in err
    assert launch(f"{command} train.allow_inexact_resume=true") == 0
    err = capsys.readouterr().err
    assert f"WARNING launcher.trainer: INEXACT RESUME from {newest}" in err
    assert "the losses from step 4 on will not repeat an uninterrupted run's" in err
    assert read_metrics(run)[-1]["step"] == 8  # trained to its end
    history = yaml.safe_load((run / "config_history.yaml").read_text())
    assert history[0]["step"] == 4
    assert history[0]["changes"] == {"train.allow_inexact_resume": {"from": False, "to": True}}
    assert "INEXACT RESUME" in (run / "logs" / "rank_0.log").read_text()  # kept with the run


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
    original = trainer.model.forward

    def forward_then_signal(batch):  # a signal arrives during step 2, before its all-reduce
        if trainer.state.step == 1:
            trainer.request_stop()
        return original(batch)

    trainer.model.forward = forward_then_signal
    result = trainer.fit()
    assert (result.step, result.finished) == (2, False)
    assert checkpoint.latest_valid(tmp_path / "run") == checkpoint.checkpoint_path(tmp_path / "run", 2)


def test_a_stop_requested_before_the_first_step_returns_at_once_with_nothing_to_save(
    image_folder: Path, tmp_path: Path
) -> None:
    cfg = experiment_from_dict(tiny_experiment("mae", image_folder))
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.request_stop()  # a signal during start-up (a SLURM job then requeues without a checkpoint)
    result = trainer.fit()
    assert (result.step, result.finished) == (0, False)
    assert checkpoint.latest_valid(tmp_path / "run") is None


def test_a_frozen_encoder_is_encoded_once_and_trains_the_same_head(tmp_path: Path, monkeypatch) -> None:
    """linprobe without augmentation trains its head on features computed once: the same losses."""
    from launcher.methods.classifier import ViTClassifier

    images = make_image_folder(tmp_path / "images")
    raw = finetune_experiment(images, "linprobe", keep_ratio=0.75, num_drop_stages=2)
    raw["data"]["augment"] = "none"
    cfg = experiment_from_dict(raw)
    cached = Trainer(cfg, tmp_path / "cached")
    cached.fit()
    assert "features" in next(iter(cached.loader))  # the head trained on the cached features
    monkeypatch.setattr(ViTClassifier, "features_frozen", property(lambda self: False))
    per_step = Trainer(cfg, tmp_path / "per-step")
    per_step.fit()
    assert "image" in next(iter(per_step.loader))
    for (step_a, a), (step_b, b) in zip(losses(tmp_path / "cached"), losses(tmp_path / "per-step"), strict=True):
        assert step_a == step_b and abs(a - b) <= 1e-5 * abs(b)
    first, second = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("cached", "per-step"))
    assert first["acc1"] == second["acc1"] and abs(first["loss"] - second["loss"]) <= 1e-5


def test_log_lines_never_share_a_terminal_line_with_the_progress_bar(
    image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """On a terminal the bar is redrawn in place with carriage returns; a log line written in the middle
    of it must start a line of its own, not continue the bar's."""
    import io
    import re

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    raw = tiny_experiment("mae", image_folder, train={"num_epochs": 3, "checkpoint_every": 1, "log_every": 1})
    Trainer(experiment_from_dict(raw), tmp_path / "run").fit()  # logs a line per checkpoint, mid-bar
    screen = [line.rsplit("\r", 1)[-1] for line in terminal.getvalue().split("\n")]  # what each line shows
    logged = [line for line in screen if "[rank 0] INFO" in line]
    assert any("checkpoint" in line for line in logged), terminal.getvalue()
    stamp = re.compile(r"^\d\d:\d\d:\d\d \[rank 0\] ")
    assert all(stamp.match(line) for line in logged), [line for line in logged if not stamp.match(line)]
    raw_lines = terminal.getvalue().split("\n")
    assert all(not re.search(r"\d+/\d+ \[[^\n\r]*\d\d:\d\d:\d\d \[rank 0\]", line) for line in raw_lines)
