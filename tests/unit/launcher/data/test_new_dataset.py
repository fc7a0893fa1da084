"""A new labelled data set is its own module and its experiment: the registry entry tells the probe the rest.

This module plays both parts for a toy data set (a grey square whose brightness is its label
"brightness", and a "speed" no single image shows): it registers the set with its label names, a
subset (the samples whose square is visible) and groups (episodes of ten samples), and the probe
of ``launcher/probe.py``, the one the demo and the studies use, reads all three from the entry.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from launcher.data import DataConfig, register_dataset
from launcher.probe import ProbeConfig, ProbeSet, describe

NUM_SAMPLES = 60
EPISODE = 10  # samples per episode


class ToySquares(Dataset):
    """Grey 8 x 8 images; every seventh is blank (its square out of view), so the probe leaves it out."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.brightness = rng.uniform(0.1, 1.0, NUM_SAMPLES)
        self.speed = rng.normal(size=NUM_SAMPLES)
        self.visible = np.arange(NUM_SAMPLES) % 7 != 3

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        level = int(255 * self.brightness[index]) if self.visible[index] else 0
        image = Image.fromarray(np.full((8, 8, 3), level, np.uint8))
        return image, torch.tensor([self.brightness[index], self.speed[index]], dtype=torch.float32)


def visible_samples(dataset: ToySquares) -> np.ndarray:
    return np.flatnonzero(dataset.visible)


def episodes(dataset: ToySquares) -> np.ndarray:
    return np.arange(len(dataset)) // EPISODE


@register_dataset(
    "toy-squares",
    label_names=("brightness", "speed"),
    motion_labels=("speed",),
    subset=visible_samples,
    subset_of="toy squares",
    groups=episodes,
)
def open_toy_squares(cfg: DataConfig, img_size: int) -> ToySquares:
    return ToySquares()


# The experiment: the probe's section, as a YAML file would give it.
EXPERIMENT = ProbeConfig(
    data=DataConfig(name="toy-squares", root="unused", augment="none", num_workers=0, mean=(0, 0, 0), std=(1, 1, 1)),
    targets=(0, 1),
    headline=(0,),
    readout="embed",
    num_folds=3,
)


def test_the_probe_reads_label_names_subset_and_groups_from_the_registry_entry() -> None:
    probe = ProbeSet(EXPERIMENT, 8)
    assert probe.names == {0: "brightness", 1: "speed"}
    np.testing.assert_array_equal(probe.indices, np.flatnonzero(np.arange(NUM_SAMPLES) % 7 != 3))
    np.testing.assert_array_equal(probe.groups, probe.indices // EPISODE)
    for k, fold in enumerate(probe.folds):
        others = np.concatenate([f for j, f in enumerate(probe.folds) if j != k])
        assert not set(probe.groups[fold]) & set(probe.groups[others])  # no episode on both sides

    score = probe.score(lambda images: images.mean((1, 2, 3))[:, None])
    assert score.r2[0] > 0.99 and score.mean == score.r2[0]  # the image's mean is its brightness
    head = describe({"mean pixel": score}, probe.names, EXPERIMENT.headline, "toy-squares").splitlines()[0]
    assert head.split() == ["brightness", "|", "speed", "mean", "of", "brightness"]  # speed: motion
