"""Pretraining, then fine-tuning and probing from the command line, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from launcher.cli import main
from tests.helpers import finetune_experiment, make_image_folder, tiny_experiment, write_yaml


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny PCAE pretraining run (and its image folder), made from the CLI."""
    tmp = tmp_path_factory.mktemp("pcae")
    images = make_image_folder(tmp / "images")
    experiment = write_yaml(tmp / "pcae.yaml", tiny_experiment("pcae", images))
    assert main(["pretrain", "pcae", "--experiment", str(experiment), "--run-dir", str(tmp / "pcae")]) == 0
    return tmp / "pcae", images


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_pretrain_then_downstream_then_evaluate_from_the_cli(
    pretrained_run, tmp_path: Path, command: str, capsys
) -> None:
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
    recorded = (out / "eval.json").read_text()
    assert main([command, str(out), "--eval-only", "--keep-ratio", "0.5"]) == 2  # not silently ignored
    assert "keep ratio and encoder included" in capsys.readouterr().err
    assert (out / "eval.json").read_text() == recorded
    if command == "linprobe":  # the frozen encoder is the pretraining run's EMA teacher
        from safetensors.torch import load_file

        step = sorted((run / "checkpoints").iterdir())[-1]
        teacher = load_file(str(step / "model.safetensors"))["teacher.blocks.0.attn.qkv.weight"]
        probe = sorted((out / "checkpoints").iterdir())[-1]
        assert torch.equal(load_file(str(probe / "model.safetensors"))["encoder.blocks.0.attn.qkv.weight"], teacher)


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "no-such-run"], "neither a run directory"),
        (["finetune", "{run}", "--encoder", "teacher", "method.size=small"], "set method.size and method.patch_size"),
        (["finetune", "{run}", "method.mixup=0.5"], "set them to 0 for regression"),  # local.yaml regresses
        (["finetune", "{run}", "--keep-ratio", "0"], "keep_ratio must be in (0, 1]"),
        (["linprobe", "{run}", "--eval-only", "--cluster", "local-test"], "--eval-only runs on this machine"),
    ],
)
def test_bad_downstream_input_fails_clearly_and_writes_nothing(
    pretrained_run, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    run, images = pretrained_run
    args = [a.replace("{run}", str(run)) for a in args]
    # No data set to generate: every mistake here is found before any data is read.
    no_data = [f"data.root={images}", "data.generate_frames=0", "eval.data.generate_frames=0"]
    code = main([*args, *no_data, "--run-dir", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_demo_ends_with_a_linear_probe_of_the_pretrained_encoder(pretrained_run, tmp_path: Path) -> None:
    import io

    from launcher.demo import linear_probe

    run, images = pretrained_run
    probe = finetune_experiment(images, "linprobe")
    for key in ("size", "img_size", "patch_size", "in_chans", "mlp_ratio"):  # the source decides these
        probe["method"].pop(key)
    out = io.StringIO()
    linear_probe(run, write_yaml(tmp_path / "probe.yaml", probe), out)
    assert "Linear probe of the frozen encoder (cls pooling, BatchNorm + linear head, lars)" in out.getvalue()
    result = json.loads((run / "linprobe" / "eval.json").read_text())
    assert result["samples"] == 36
