"""A pretraining method and a labelled data set defined here, and nowhere else, pretrain, probe, export and
enter a study: a new method is its module and its experiment, and so is a new data set.

The method keeps ``methods/protocol.py``'s contract; the data set registers its label names, the
samples a probe reads and the episodes its folds keep whole. Nothing outside this module changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from launcher.data import DataConfig
from launcher.data import registry as data_registry
from launcher.experiment import experiment_from_dict
from launcher.export import export
from launcher.local import prepare_data
from launcher.methods import registry
from launcher.methods.protocol import EncoderChoice, PretrainingMethod, StepHook
from launcher.methods.vit import ViTConfig, strip_prefix
from launcher.probe import ProbeConfig, ProbeSet
from launcher.studies.compare import PLAN, Study, load_study
from launcher.trainer import Trainer

SQUARES = {
    "name": "squares",
    "root": "unused",
    "augment": "none",
    "num_workers": 0,
    "mean": [0, 0, 0],
    "std": [1, 1, 1],
}
NUM_SAMPLES, EPISODE = 96, 8


class Squares(Dataset):
    """32 x 32 black images with a white 8 x 8 square at a random place; labels: its column and row.

    Every sixth image is blank (the square out of view): a probe must leave those out.
    """

    def __init__(self) -> None:
        self.corner = np.random.default_rng(0).integers(0, 25, size=(NUM_SAMPLES, 2))
        self.visible = np.arange(NUM_SAMPLES) % 6 != 5

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> tuple[Image.Image, Tensor]:
        pixels = np.zeros((32, 32, 3), np.uint8)
        x, y = self.corner[index]
        if self.visible[index]:
            pixels[y : y + 8, x : x + 8] = 255
        return Image.fromarray(pixels), torch.tensor([x, y], dtype=torch.float32)


@pytest.fixture
def squares(monkeypatch) -> str:
    """``squares`` registered for this test only, with its labels, visible subset and episodes."""
    monkeypatch.setattr(data_registry, "_DATASETS", dict(data_registry._DATASETS))
    data_registry.register_dataset(
        "squares",
        label_names=("x", "y"),
        subset=lambda squares: np.flatnonzero(squares.visible),
        subset_of="toy squares",
        groups=lambda squares: np.arange(len(squares)) // EPISODE,
    )(lambda cfg, img_size: Squares())
    return "squares"


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

    def patch_tokens(self, images: Tensor, depth: int | None = None) -> Tensor:
        return self.net(images, depth=depth)[:, self.net.num_prefix_tokens :]

    def embed(self, images: Tensor) -> Tensor:
        return self.patch_tokens(images).mean(dim=1)


@pytest.fixture
def toy(monkeypatch) -> str:
    """``toy`` registered for this test only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("toy", config=ToyConfig)(Toy)
    return "toy"


def experiment() -> dict:
    return {
        "method": {"size": "micro", "img_size": 32, "patch_size": 8},
        "data": SQUARES,
        "optim": {"warmup_epochs": 0.5},
        "train": {"num_epochs": 1, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 1},
    }


def test_a_method_and_a_data_set_registered_from_outside_pretrain_probe_export_and_enter_a_study(
    toy: str, squares: str, tmp_path: Path
) -> None:
    assert toy in registry.pretraining_methods() and "finetune" not in registry.pretraining_methods()
    assert issubclass(Toy, PretrainingMethod) and not issubclass(Toy, StepHook)

    raw = experiment()
    raw["method"] = dataclasses.asdict(registry.get_method(toy).tiny())
    cfg = experiment_from_dict(raw)
    prepare_data(cfg)  # nothing to make: the set has no prepare step
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.fit().finished
    model = trainer.accelerator.unwrap_model(trainer.model).eval()

    # The probe reads the set's label names, its visible samples and its episodes from the registry entry.
    probe = ProbeSet(ProbeConfig(data=DataConfig(**SQUARES), targets=(0, 1), headline=(0, 1), num_folds=3), 32)
    assert probe.names == {0: "x", 1: "y"} and len(probe.indices) == NUM_SAMPLES - NUM_SAMPLES // 6
    np.testing.assert_array_equal(probe.groups, probe.indices // EPISODE)
    assert probe.score(probe.encoder(model)).mean > 0.5  # where the square is, from the moments of the tokens

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
                "experiment": experiment(),
                "contenders": contenders,
                "probe": {"data": SQUARES, "targets": [0, 1], "headline": [0, 1], "pixels": 8},
            }
        )
    )
    study = load_study(study_file)
    assert [study.init_label(c) for c in contenders] == ["random init", "random init"]
    plan = Study(dataclasses.replace(study, contenders={"toy": "toy"}), tmp_path / "study").plan()
    assert plan["methods"]["toy"]["steps"] == 2
    assert (tmp_path / "study" / PLAN).is_file()
