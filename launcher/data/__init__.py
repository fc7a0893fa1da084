"""Data sets: their config, the registry of names, and the explicit prepare step.

``DataConfig.name`` is any registered data set (``dataset_names()``): ``imagefolder``,
``stl10``, ``svhn`` (``image_sets.py``) and ``lunarlander`` (``lunarlander.py``). A data set
is opened with ``open_dataset``, which never writes anything; one that this project can make
itself (LunarLander) is made by ``prepare``, which the command line or a study calls before a
run starts. Augmentations are in ``transforms.py``; the sampler and the per-sample seeds that
make resume exact are in ``sampling.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from launcher.errors import DataError

# A base data set returns (PIL image, label tensor) for an index; one with a natural split
# (LunarLander's episodes) has ``split(fraction) -> (first indices, second indices)``.
BaseDataset = Dataset


@dataclass
class DataConfig:
    """Which data set to read and how to augment it."""

    name: str = "imagefolder"  # a registered data set: see dataset_names()
    root: str = ""  # checked when the data set is opened, so experiments can leave it to the CLI
    split: str = "train"  # stl10: train/test/unlabeled; svhn: train/test/extra; others: unused
    # mae: random resized crop + flip (pretraining); randaug: MAE's fine-tuning augmentation
    # (timm's random resized crop, flip, RandAugment `rand_augment`, random erasing `reprob`).
    augment: Literal["mae", "randaug", "flip", "none"] = "mae"
    min_crop_scale: float = 0.2
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    # Evaluation: resize to img_size / eval_crop_pct, then centre-crop img_size (ImageNet: 0.875).
    eval_crop_pct: float = 1.0
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    num_workers: int = 8
    # LunarLander only: when > 0 and `root` holds no data set, `prepare` generates this many
    # frames there (with this seed: give the sets of one study different seeds).
    generate_frames: int = 0
    generate_seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in _DATASETS:
            raise ValueError(f"data.name {self.name!r} is not a data set; known: {', '.join(dataset_names())}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"data.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("data.mean and data.std need one value per channel, std > 0")
        if not 0.0 < self.eval_crop_pct <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError("data.eval_crop_pct must be in (0, 1] and data.reprob in [0, 1]")
        if self.num_workers < 0 or self.generate_frames < 0 or self.generate_seed < 0:
            raise ValueError("data.num_workers, data.generate_frames and data.generate_seed must be >= 0")


@dataclass(frozen=True)
class DatasetEntry:
    open: Callable[[DataConfig, int], BaseDataset]  # (config, image size) -> data set
    prepare: Callable[[DataConfig, int], None] | None = None  # makes it, for sets this project makes


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, prepare: Callable[[DataConfig, int], None] | None = None):
    """Decorator for a function ``(DataConfig, img_size) -> BaseDataset`` that opens data set ``name``."""

    def decorator(fn: Callable[[DataConfig, int], BaseDataset]) -> Callable[[DataConfig, int], BaseDataset]:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        _DATASETS[name] = DatasetEntry(fn, prepare)
        return fn

    return decorator


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def open_dataset(cfg: DataConfig, img_size: int) -> BaseDataset:
    """Open the data set ``cfg`` names; reads only, so every rank may call it."""
    if not cfg.root:
        raise DataError(f"data.root is not set: point it at the {cfg.name} data set, e.g. `data.root=/path/to/data`")
    return _DATASETS[cfg.name].open(cfg, img_size)


def prepare(cfg: DataConfig, img_size: int) -> None:
    """Make the data set where this project can and the config asks it to (LunarLander); else nothing."""
    entry = _DATASETS[cfg.name]
    if entry.prepare is not None and cfg.root:
        entry.prepare(cfg, img_size)


from launcher.data import image_sets, lunarlander  # noqa: E402,F401  (registers the data sets)
