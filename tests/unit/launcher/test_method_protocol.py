"""A pretraining method defined here, and nowhere else, trains, exports and enters a study: the protocol suffices."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import Tensor, nn

from launcher.experiment import experiment_from_dict
from launcher.export import export
from launcher.local import prepare_data
from launcher.methods import registry
from launcher.methods.protocol import EncoderChoice, PretrainingMethod, StepHook
from launcher.methods.vit import ViTConfig, strip_prefix
from launcher.studies.compare import PLAN, Study, load_study
from launcher.trainer import Trainer

FRAMES = {"name": "lunarlander", "augment": "none", "num_workers": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}


@dataclass(kw_only=True)
class ToyConfig(ViTConfig):
    name: str = "toy"

    @classmethod
    def tiny(cls, **fields) -> ToyConfig:
        return cls(**{"size": "micro", "img_size": 32, "patch_size": 8, **fields})


class Toy(nn.Module):
    """Regress each patch's mean pixel from the encoder's token: the smallest pretraining with a ViT."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = cfg.build_encoder()
        self.head = nn.Linear(self.net.embed_dim, 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        target = nn.functional.avg_pool2d(images.mean(1, keepdim=True), self.cfg.patch_size).flatten(1)
        return {"loss": (self.head(self.patch_tokens(images)).squeeze(-1) - target).square().mean()}

    @staticmethod
    def encoder_state(state: dict[str, Tensor], which: EncoderChoice = "student") -> dict[str, Tensor]:
        if which == "teacher":
            raise ValueError("the toy has no teacher")
        return strip_prefix(state, "net.")

    def patch_tokens(self, images: Tensor) -> Tensor:
        return self.net(images)[:, self.net.num_prefix_tokens :]

    def embed(self, images: Tensor) -> Tensor:
        return self.patch_tokens(images).mean(dim=1)


@pytest.fixture
def toy(monkeypatch) -> str:
    """``toy`` registered for this test only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("toy", config=ToyConfig)(Toy)
    return "toy"


def experiment(root: Path) -> dict:
    return {
        "method": {"size": "micro", "img_size": 32, "patch_size": 8},
        "data": {**FRAMES, "root": str(root), "generate_frames": 32},
        "optim": {"warmup_epochs": 0.5},
        "train": {"num_epochs": 1, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 1},
    }


def test_a_method_registered_from_outside_pretrains_exports_and_is_a_contender(toy: str, tmp_path: Path) -> None:
    assert toy in registry.pretraining_methods() and "finetune" not in registry.pretraining_methods()
    assert issubclass(Toy, PretrainingMethod) and not issubclass(Toy, StepHook)

    raw = experiment(tmp_path / "frames")
    raw["method"] = dataclasses.asdict(registry.get_method(toy).tiny())
    cfg = experiment_from_dict(raw)
    prepare_data(cfg)
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.fit().finished
    model = trainer.accelerator.unwrap_model(trainer.model).eval()

    # `launch export`: the run's recorded method name picks Toy.encoder_state.
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["name"] == toy
    out = export(tmp_path / "run", tmp_path / "toy-encoder")
    assert json.loads((out / "config.json").read_text())["launch"]["method"] == toy
    timm_model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(images)[:, 1:], model.patch_tokens(images))

    # The study takes it as a contender: its config loads, shares MAE's random init, and its plan times it.
    study_file = tmp_path / "study.yaml"
    contenders = {"toy": "toy", "mae": "mae"}
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "toy-study",
                "steps": 2,
                "calibration_steps": 1,
                "experiment": experiment(tmp_path / "frames"),
                "contenders": contenders,
                "probe": {"data": {**FRAMES, "root": str(tmp_path / "frames")}, "pixels": 8},
            }
        )
    )
    study = load_study(study_file)
    assert [study.init_label(c) for c in contenders] == ["random init", "random init"]
    plan = Study(dataclasses.replace(study, contenders={"toy": "toy"}), tmp_path / "study").plan()
    assert plan["methods"]["toy"]["steps"] == 2
    assert (tmp_path / "study" / PLAN).is_file()
