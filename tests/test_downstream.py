"""Fine-tuning and linear probing: the model, token reduction, weights, optimizers, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from launcher.cli import main
from launcher.config import OptimConfig, experiment_from_dict
from launcher.trainer import Trainer, build_optimizer
from methods import build_method
from methods.classifier import ClassifierConfig, LinearProbeConfig, ViTClassifier
from methods.pretrained import load_pretrained
from tests.helpers import make_image_folder, tiny_experiment

TINY = {"size": "micro", "img_size": 32, "patch_size": 8}


def block_input_lengths(model: ViTClassifier, images: torch.Tensor) -> list[int]:
    lengths: list[int] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
             for block in model.encoder.blocks]
    model.eval()
    with torch.no_grad():
        model.predict(images)
    for hook in hooks:
        hook.remove()
    return lengths


# ----------------------------------------------------------------------------- token reduction


def test_token_counts_per_stage_vit_b16() -> None:
    cfg = ClassifierConfig(keep_ratio=0.7, num_classes=10)
    assert cfg.resolved_drop_positions == (0, 4, 8)
    assert cfg.token_counts == (196, 137, 95, 66)
    torch.manual_seed(0)
    lengths = block_input_lengths(build_method(cfg), torch.randn(1, 3, 224, 224))
    # cls + patches: block 0 sees all, then three stages of reduced sequences
    assert lengths == [197] + [138] * 4 + [96] * 4 + [67] * 3


def test_no_reduction_at_keep_ratio_one_and_explicit_positions() -> None:
    lengths = block_input_lengths(build_method(ClassifierConfig(**TINY, num_classes=3)), torch.randn(2, 3, 32, 32))
    assert lengths == [17, 17, 17]
    cfg = ClassifierConfig(**TINY, num_classes=3, keep_ratio=0.5, num_drop_stages=1, drop_positions=[1])
    assert block_input_lengths(build_method(cfg), torch.randn(2, 3, 32, 32)) == [17, 17, 9]


def test_reduction_keeps_the_cls_token_and_the_least_mean_like_tokens() -> None:
    torch.manual_seed(0)
    model = build_method(ClassifierConfig(**TINY, num_classes=3, keep_ratio=0.5, num_drop_stages=1))
    x = torch.randn(2, 17, 32)
    ids = torch.arange(16).expand(2, -1)
    kept, kept_ids = model.reducer(x, ids)
    assert torch.equal(kept[:, 0], x[:, 0])
    tokens = nn.functional.normalize(x[:, 1:], dim=-1)
    score = (tokens * tokens.mean(1, keepdim=True)).sum(-1)
    expected = score.argsort(dim=1)[:, :8]
    assert torch.equal(kept_ids.sort(1).values, expected.sort(1).values)


# ----------------------------------------------------------------------------- official MAE weights


def timm_vit(global_pool: str, num_classes: int = 5) -> VisionTransformer:
    """The architecture of MAE's models_vit (timm's VisionTransformer) at the tiny size."""
    torch.manual_seed(1)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=num_classes,
                              global_pool=global_pool, fc_norm=global_pool == "avg", qkv_bias=True)
    for p in model.parameters():  # non-trivial values everywhere, positions included
        nn.init.normal_(p, std=0.2)
    return model


def test_an_official_mae_finetuned_checkpoint_gives_the_same_predictions(tmp_path: Path) -> None:
    reference = timm_vit("avg").eval()
    path = tmp_path / "mae_finetuned_vit_micro.pth"
    # The MAE scripts save the argparse namespace with the weights.
    torch.save({"model": reference.state_dict(), "epoch": 99, "args": argparse.Namespace(model="vit")}, path)
    pretrained = load_pretrained(path)
    assert pretrained.source == "official MAE" and pretrained.head is not None
    model = ViTClassifier(ClassifierConfig(**TINY, num_classes=5, pretrained=str(path), drop_path=0.0)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(images), reference(images), rtol=1e-5, atol=1e-5)


def test_an_official_mae_pretrained_checkpoint_with_cls_pooling(tmp_path: Path) -> None:
    reference = timm_vit("token").eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32)})  # ignored
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    torch.save({"model": state}, path)
    cfg = LinearProbeConfig(**TINY, num_classes=5, pretrained=str(path), head_batchnorm=False)
    model = ViTClassifier(cfg).eval()
    with torch.no_grad():
        images = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(model.features(images), reference.forward_head(reference.forward_features(images),
                                                                                  pre_logits=True))
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_pretrained_weights_of_another_size_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"model": timm_vit("avg").state_dict()}, path)
    with pytest.raises(ValueError, match="width 32, depth 3.*set method.size"):
        ViTClassifier(ClassifierConfig(size="tiny", img_size=32, patch_size=8, num_classes=5, pretrained=str(path)))
    with pytest.raises(ValueError, match="no EMA teacher"):
        load_pretrained(path, "teacher")


# ----------------------------------------------------------------------------- optimizers


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


# ----------------------------------------------------------------------------- training, resume, CLI


def finetune_experiment(images: Path, method: str = "finetune", **method_fields) -> dict:
    cfg = tiny_experiment(method, images, eval={"data": {"augment": "none"}})
    cfg["method"] = {**dataclasses.asdict(get_config(method).tiny()), "num_classes": 3, **method_fields}
    cfg["data"].update({"augment": "randaug", "min_crop_scale": 0.5})
    cfg["optim"].update({"layer_decay": 0.75} if method == "finetune" else {"name": "lars", "weight_decay": 0.0})
    return cfg


def get_config(method: str):
    from methods import get_method

    return get_method(method).config


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny PCAE pretraining run (and its image folder), made from the CLI."""
    tmp = tmp_path_factory.mktemp("pcae")
    images = make_image_folder(tmp / "images")
    experiment = write_yaml(tmp / "pcae.yaml", tiny_experiment("pcae", images))
    assert main(["pretrain", "pcae", "--experiment", str(experiment), "--run-dir", str(tmp / "pcae")]) == 0
    return tmp / "pcae", images


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_pretrain_then_downstream_then_evaluate_from_the_cli(pretrained_run, tmp_path: Path, command: str,
                                                             capsys) -> None:
    run, images = pretrained_run
    experiment = finetune_experiment(images, command)
    for key in ("size", "img_size", "patch_size", "in_chans", "mlp_ratio"):  # the source decides these
        experiment["method"].pop(key)
    experiment = write_yaml(tmp_path / "downstream.yaml", experiment)
    out = tmp_path / command
    args = [command, str(run), "--experiment", str(experiment), "--run-dir", str(out), "--encoder", "teacher"]
    assert main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["pretrained"].startswith(str(run.resolve() / "checkpoints" / "step_"))
    assert config["method"]["size"] == "micro" and config["method"]["pretrained_encoder"] == "teacher"
    trained = json.loads((out / "eval.json").read_text())
    assert trained["samples"] == 36 and 0 <= trained["acc1"] <= 100
    assert main(args) == 0  # finished: resuming does nothing more
    assert len((out / "eval.jsonl").read_text().splitlines()) == 1

    capsys.readouterr()
    assert main([command, str(out), "--eval-only"]) == 0
    assert f"acc1 {trained['acc1']:.4g}" in capsys.readouterr().out
    if command == "linprobe":  # the frozen encoder is the pretraining run's EMA teacher
        from safetensors.torch import load_file

        step = sorted((run / "checkpoints").iterdir())[-1]
        teacher = load_file(str(step / "model.safetensors"))["teacher.blocks.0.attn.qkv.weight"]
        probe = sorted((out / "checkpoints").iterdir())[-1]
        assert torch.equal(load_file(str(probe / "model.safetensors"))["encoder.blocks.0.attn.qkv.weight"], teacher)


@pytest.mark.parametrize("args, message", [
    (["finetune", "no-such-run"], "neither a run directory"),
    (["finetune", "{run}", "--encoder", "teacher", "method.size=small"], "set method.size and method.patch_size"),
    (["finetune", "{run}", "method.mixup=0.5"], "set them to 0 for regression"),  # local.yaml regresses
    (["finetune", "{run}", "--keep-ratio", "0"], "keep_ratio must be in (0, 1]"),
    (["linprobe", "{run}", "--eval-only", "--cluster", "local-test"], "--eval-only runs on this machine"),
])
def test_bad_downstream_input_fails_clearly_and_writes_nothing(pretrained_run, tmp_path: Path, capsys,
                                                              args: list[str], message: str) -> None:
    run, images = pretrained_run
    args = [a.replace("{run}", str(run)) for a in args]
    code = main([*args, f"data.root={images}", "--run-dir", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_regression_on_lunarlander_reports_r2(tmp_path: Path) -> None:
    frames = {"name": "lunarlander", "root": str(tmp_path / "ll"), "generate_frames": 96, "augment": "none",
              "num_workers": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    raw = tiny_experiment("linprobe", tmp_path)
    raw["method"].update({"img_size": 64, "task": "regression", "targets": [0, 1], "pool": "grid"})
    raw["data"] = frames
    raw["eval"] = {"data": {"root": str(tmp_path / "ll-test"), "generate_frames": 48, "generate_seed": 1}}
    raw["optim"].update({"name": "lars", "weight_decay": 0.0})
    raw["train"].update({"global_batch_size": 32, "micro_batch_size": 16})
    trainer = Trainer(experiment_from_dict(raw), tmp_path / "run")
    trainer.fit()
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["samples"] == 48 and {"mse", "r2", "r2_0", "r2_1"} <= set(result)
    assert result["r2"] == pytest.approx((result["r2_0"] + result["r2_1"]) / 2)


def test_linear_probe_on_stl10_files_trains_on_train_and_evaluates_on_test(tmp_path: Path) -> None:
    import numpy as np

    from tests.test_image_sets import write_stl10

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 10)):
        write_stl10(tmp_path / "stl10_binary", split, rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
                    rng.integers(0, 10, n))
    raw = tiny_experiment("linprobe", tmp_path)
    raw["method"].update({"img_size": 32, "num_classes": 10})
    raw["data"] = {"name": "stl10", "root": str(tmp_path), "split": "train", "augment": "mae", "num_workers": 0}
    raw["eval"] = {"data": {"split": "test"}}
    raw["optim"].update({"name": "lars", "weight_decay": 0.0})
    Trainer(experiment_from_dict(raw), tmp_path / "run").fit()
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["samples"] == 10 and 0 <= result["acc1"] <= result["acc5"] <= 100


def test_regression_head_learns_standardised_targets_and_predicts_in_label_units() -> None:
    cfg = LinearProbeConfig(**TINY, task="regression", targets=(0, 1), target_mean=(0.5, -1.0),
                            target_std=(2.0, 0.5), pool="grid")
    model = build_method(cfg).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.randn(4, 8)
    with torch.no_grad():
        raw = model.head_outputs(images)
        torch.testing.assert_close(model.predict(images), raw * torch.tensor([2.0, 0.5]) + torch.tensor([0.5, -1.0]))
        loss = model({"image": images, "label": labels})["loss"]
        standardised = (labels[:, :2] - torch.tensor([0.5, -1.0])) / torch.tensor([2.0, 0.5])
        torch.testing.assert_close(loss, ((raw - standardised) ** 2).mean())
    with pytest.raises(ValueError, match="target_std needs one value per target column"):
        LinearProbeConfig(**TINY, task="regression", targets=(0, 1), target_std=(1.0,))


def test_pretraining_can_end_with_a_linear_probe_as_the_local_demo_does(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "images")
    probe = finetune_experiment(images, "linprobe")
    for key in ("size", "img_size", "patch_size", "in_chans", "mlp_ratio"):
        probe["method"].pop(key)
    probe_file = write_yaml(tmp_path / "probe.yaml", probe)
    experiment = write_yaml(tmp_path / "pcae.yaml", tiny_experiment("pcae", images, probe={"linprobe": str(probe_file)}))
    assert main(["pretrain", "pcae", "--experiment", str(experiment), "--run-dir", str(tmp_path / "run")]) == 0
    assert "Linear probe of the frozen encoder (cls pooling, BatchNorm + linear head, lars)" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "linprobe" / "eval.json").read_text())
    assert result["samples"] == 36
