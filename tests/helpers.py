"""Helpers for tests: small data sets in real formats and tiny experiments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from methods import get_method


def make_image_folder(root: Path, num_classes: int = 3, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """An ImageNet-layout folder of random PNG/JPEG images: root/class_k/img_i.ext."""
    rng = np.random.default_rng(seed)
    for k in range(num_classes):
        folder = root / f"n{k:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(pixels).save(folder / f"img_{i}.{ext}")
    return root


def tiny_experiment(method: str, data_root: Path, **sections: dict) -> dict:
    """An experiment dict for the method's tiny flavour on an image folder."""
    cfg = {
        "method": dataclasses.asdict(get_method(method).config.tiny()),
        "data": {"name": "imagefolder", "root": str(data_root), "num_workers": 0},
        "optim": {"warmup_epochs": 1, "blr": 1e-3},
        "train": {"num_epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1,
                  "checkpoint_every": 1000},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
