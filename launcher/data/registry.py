"""The data sets' config (``DataConfig``) and registry: what a data set module registers itself with.

The data set modules (``image_sets.py``, ``lunarlander.py``, ``shards.py``) import this module and
call ``register_dataset``; ``launcher/data/__init__.py`` imports them all, so importing
``launcher.data`` registers every data set, and no module imports the package it belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from launcher.errors import ConfigError, DataError

# Every data set is read as RGB: image files are converted (a greyscale one too), the others are stored so.
CHANNELS = 3

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
    # How `mae`'s crop is resampled: `tensor` (torchvision v2 on the decoded image as a tensor) or
    # `pillow` (crop, bicubic resize and flip in one Pillow pass, uint8 until the last step):
    # the same draws, faster per loader worker (`launch bench data` measures both).
    resample: Literal["tensor", "pillow"] = "tensor"
    # Where `mae`'s training images are decoded (data sets of image files: imagefolder, shards):
    # `full` (the whole image on the loader worker, then `resample`), `reduced` (on the worker at
    # the smallest DCT scale the crop allows, cropped and resized there, handed on as uint8 and
    # normalised on the training device in batches) or `device` (the
    # workers send the bytes; decode, crop, resize, flip and normalise run batched on the training
    # device: nvJPEG on CUDA). The same crop boxes and flips on every path; evaluation decodes whole.
    decode: Literal["full", "reduced", "device"] = "full"
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    # Evaluation: resize to img_size / eval_crop_pct, then centre-crop img_size (ImageNet: 0.875).
    eval_crop_pct: float = 1.0
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    num_workers: int = 8
    # LunarLander only: when > 0 and `root` holds no data set, `prepare` generates this many
    # frames there, flown by this agent, with this seed (give the sets of one study different seeds),
    # each episode cut after generate_max_episode_steps (0: gymnasium's 1000; a pilot that hovers
    # for 1000 steps would otherwise fill a small test set with one episode).
    generate_frames: int = 0
    generate_seed: int = 0
    generate_agent: Literal["random", "heuristic", "mixed"] = "random"
    generate_max_episode_steps: int = 0
    # Keep every generate_frame_stride-th step of each episode (only those are rendered): a probe
    # set of many episodes, a few glimpses each, for the price of few long ones.
    generate_frame_stride: int = 1
    # Unreadable samples (a truncated or mislabelled image file) are replaced by another sample
    # drawn from (seed, epoch, index) and counted; more than this many in a run stop it.
    max_bad_samples: int = 100

    def __post_init__(self) -> None:
        if self.name not in _DATASETS:
            raise ValueError(f"data.name {self.name!r} is not a data set; known: {', '.join(dataset_names())}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"data.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("data.mean and data.std need one value per channel, std > 0")
        if not 0.0 < self.eval_crop_pct <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError("data.eval_crop_pct must be in (0, 1] and data.reprob in [0, 1]")
        if self.decode != "full" and not _DATASETS[self.name].encoded:
            raise ValueError(
                f"data.decode={self.decode} reads image files; data set {self.name!r} holds decoded pixels. "
                f"Use data.decode=full, or a data set of image files ({', '.join(encoded_dataset_names())})"
            )
        if self.decode != "full" and self.augment in ("randaug", "flip"):
            raise ValueError(
                f"data.decode={self.decode} makes MAE's pretraining crop (data.augment=mae); "
                f"data.augment={self.augment} needs data.decode=full"
            )
        counts = (self.num_workers, self.generate_frames, self.generate_seed, self.generate_max_episode_steps)
        if self.generate_frame_stride < 1:
            raise ValueError(
                f"data.generate_frame_stride must be >= 1 (1: every step), got {self.generate_frame_stride}"
            )
        if min(*counts, self.max_bad_samples) < 0:
            raise ValueError(
                "data.num_workers, data.generate_frames, data.generate_seed, data.generate_max_episode_steps and "
                "data.max_bad_samples must be >= 0"
            )


class BadSample(Exception):
    """A sample whose file cannot be read (``path``), raised by a data set for the pipeline to replace."""

    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(f"{path}: {type(error).__name__}: {error}")
        self.path = path


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, undecoded, and a name for it in messages (its path, or its place in a shard)."""

    data: bytes
    name: str


@dataclass(frozen=True)
class DatasetEntry:
    """What the registry knows of a data set: how to open, make and count it, and how probes read its labels."""

    open: Callable[[DataConfig, int], BaseDataset]  # (config, image size) -> data set
    prepare: Callable[[DataConfig, int], None] | None = None  # makes it, for sets this project makes
    encoded: bool = False  # it has ``encoded(index) -> (EncodedImage, label)``: image files, not pixels
    # The number of samples without listing or converting anything (for a dry run); None: unknown.
    count: Callable[[DataConfig], int | None] | None = None
    # One name per label column, for labels that are measured values; (): classes, or unnamed columns.
    label_names: tuple[str, ...] = ()
    # The label names that are rates of change: one image cannot show them (they need two frames).
    motion_labels: tuple[str, ...] = ()
    # Indices of the samples a probe or an evaluation reads (LunarLander: the frames whose lander is
    # on screen); None: every sample. ``subset_of`` says what has this subset, for the error on a
    # data set that has none ("LunarLander frames").
    subset: Callable[[BaseDataset], np.ndarray] | None = None
    subset_of: str = ""
    # A group id per sample: cross-validation folds never split a group, so near copies (LunarLander:
    # neighbouring frames of one episode) never straddle a split; None: each sample its own group.
    groups: Callable[[BaseDataset], np.ndarray] | None = None


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    prepare: Callable[[DataConfig, int], None] | None = None,
    encoded: bool = False,
    count: Callable[[DataConfig], int | None] | None = None,
    *,
    label_names: tuple[str, ...] = (),
    motion_labels: tuple[str, ...] = (),
    subset: Callable[[BaseDataset], np.ndarray] | None = None,
    subset_of: str = "",
    groups: Callable[[BaseDataset], np.ndarray] | None = None,
):
    """Decorator for a function ``(DataConfig, img_size) -> BaseDataset`` that opens data set ``name``;
    ``encoded``: its data sets also hand out each image's file bytes (``data.decode`` reduced or device);
    ``count``: the number of samples without listing or converting anything (for a dry run); the rest
    say how probes and evaluations read it (``DatasetEntry``)."""
    if subset is not None and not subset_of:
        raise ValueError(f"data set {name!r}: a subset needs subset_of, what it is for, for messages")
    if not set(motion_labels) <= set(label_names):
        raise ValueError(f"data set {name!r}: motion_labels must be among label_names")

    def decorator(fn: Callable[[DataConfig, int], BaseDataset]) -> Callable[[DataConfig, int], BaseDataset]:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        _DATASETS[name] = DatasetEntry(
            fn, prepare, encoded, count, label_names, motion_labels, subset, subset_of, groups
        )
        return fn

    return decorator


def count_samples(cfg: DataConfig) -> int | None:
    """How many samples ``cfg`` names, where that is known at a glance (no listing of an image folder,
    no conversion); None otherwise."""
    entry = _DATASETS[cfg.name]
    return None if entry.count is None or not cfg.root else entry.count(cfg)


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def label_names(name: str) -> tuple[str, ...]:
    """The names of data set ``name``'s label columns, in order; () where they have none (classes)."""
    return _DATASETS[name].label_names


def motion_labels(name: str) -> tuple[str, ...]:
    """The labels of data set ``name`` that are rates of change, which no single image shows."""
    return _DATASETS[name].motion_labels


def probe_subset(name: str, dataset: BaseDataset, setting: str, *, required: bool = True) -> np.ndarray:
    """Indices of the samples of ``dataset`` (data set ``name``) that a probe or an evaluation reads.

    A data set without such a subset gives every sample when not ``required``; when ``required``
    it is a ConfigError naming ``setting``, the option that asked for the subset.
    """
    subset = _DATASETS[name].subset
    if subset is not None:
        return subset(dataset)
    if not required:
        return np.arange(len(dataset))
    kinds = " or ".join(entry.subset_of for entry in _DATASETS.values() if entry.subset is not None)
    raise ConfigError(f"{setting} is for {kinds}, and this data set is not; remove {setting}")


def sample_groups(name: str, dataset: BaseDataset) -> np.ndarray:
    """A group id per sample of ``dataset`` (data set ``name``), for folds that never split a group;
    the sample's index where the data set has no groups."""
    groups = _DATASETS[name].groups
    return np.arange(len(dataset)) if groups is None else np.asarray(groups(dataset))


def encoded_dataset_names() -> list[str]:
    return sorted(name for name, entry in _DATASETS.items() if entry.encoded)


def open_dataset(cfg: DataConfig, img_size: int) -> BaseDataset:
    """Open the data set ``cfg`` names; reads only, so every rank may call it."""
    if not cfg.root:
        raise DataError(f"data.root is not set: point it at the {cfg.name} data set, e.g. `data.root=/path/to/data`")
    return _DATASETS[cfg.name].open(cfg, img_size)


def check_readable(cfg: DataConfig) -> None:
    """Fail now if a job would fail on every rank for want of its data: no root, or one this host cannot read.

    A set that ``prepare`` generates passes: it is made before the job is submitted. The files
    inside are read by the job itself (a full ImageNet listing would take the login node minutes).
    """
    if not cfg.root:
        raise DataError(f"data.root is not set: point it at the {cfg.name} data set, e.g. `data.root=/path/to/data`")
    if _DATASETS[cfg.name].prepare is not None and cfg.generate_frames > 0:
        return
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(
            f"data.root {root} does not exist on this host; the job's nodes would not find it either. "
            f"Point data.root at the {cfg.name} data set on the shared filesystem."
        )
    if not os.access(root, os.R_OK | (os.X_OK if root.is_dir() else 0)):
        raise DataError(
            f"data.root {root} is not readable by this user; fix its permissions or point data.root elsewhere."
        )


def data_problems(sets: Iterable[DataConfig]) -> list[DataError]:
    """What ``check_readable`` finds wrong with each of ``sets``, in order; raises nothing."""
    problems = []
    for cfg in sets:
        try:
            check_readable(cfg)
        except DataError as e:
            problems.append(e)
    return problems


def prepare(cfg: DataConfig, img_size: int) -> None:
    """Make the data set where this project can and the config asks it to (LunarLander); else nothing."""
    entry = _DATASETS[cfg.name]
    if entry.prepare is not None and cfg.root:
        entry.prepare(cfg, img_size)
