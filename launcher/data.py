"""Data sets, augmentations and the sampler that makes resume exact.

Every random draw of the data pipeline is a function of (seed, epoch, sample index):
the sampler shuffles with a generator seeded by (seed, epoch) and hands each sample
its own seeds, which drive its augmentation here and its mask in the method
(``batch["seed"]``). Nothing depends on a worker's leftover RNG state or on how a
global batch is split over processes, so a run resumed at any step sees the same
batches, crops and masks as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from launcher.config import DataConfig
from launcher.errors import DataError
from methods.seeding import seeded_host_rngs

log = logging.getLogger(__name__)

# A base data set returns (PIL image, label tensor) for an index.
BaseDataset = Dataset
DatasetBuilder = Callable[[DataConfig, int], BaseDataset]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def decorator(fn: DatasetBuilder) -> DatasetBuilder:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        _DATASETS[name] = fn
        return fn

    return decorator


def build_base_dataset(cfg: DataConfig, img_size: int) -> BaseDataset:
    """Open (or, where the config allows, first generate) the data set named by ``cfg.name``."""
    if not cfg.root:
        raise DataError(
            f"data.root is not set: point it at the {cfg.name} data set, e.g. `data.root=/path/to/data`"
        )
    try:
        builder = _DATASETS[cfg.name]
    except KeyError:
        raise DataError(f"unknown data set {cfg.name!r}; known: {', '.join(sorted(_DATASETS))}") from None
    return builder(cfg, img_size)


# ----------------------------------------------------------------------------- data sets


@register_dataset("imagefolder")
def _imagefolder(cfg: DataConfig, img_size: int) -> BaseDataset:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"data.root {root} is not a directory. For data.name=imagefolder it must hold one "
            f"sub-directory per class with the images inside (ImageNet layout: .../train/n01440764/*.JPEG)."
        )
    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(
            f"data.root {root} is not an image folder ({e}). It must hold one sub-directory per class "
            f"with .jpg/.png/... images inside (ImageNet layout)."
        ) from None
    return _LabelledImages(folder, lambda target: torch.tensor(target, dtype=torch.long))


@register_dataset("lunarlander")
def _lunarlander(cfg: DataConfig, img_size: int) -> BaseDataset:
    from launcher.lunarlander import LunarLanderFrames, generate_lunarlander

    root = Path(cfg.root)
    if cfg.generate_frames > 0 and not (root / "meta.json").exists():
        size = img_size if img_size >= 64 and (img_size - 64) % 16 == 0 else 64
        log.info("no LunarLander data at %s: generating %d frames of %d px", root, cfg.generate_frames, size)
        generate_lunarlander(root, cfg.generate_frames, size=size, num_workers=max(1, cfg.num_workers),
                             seed=cfg.generate_seed)
    return LunarLanderImages(LunarLanderFrames(root))


def sequential_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (first 1 - fraction, last fraction), in order: the paper's 80/20 split."""
    cut = n - int(n * fraction)
    return np.arange(cut), np.arange(cut, n)


@register_dataset("stl10")
def _stl10(cfg: DataConfig, img_size: int) -> BaseDataset:
    from launcher.image_sets import STL10

    return ArrayImages(STL10(Path(cfg.root), cfg.split))


@register_dataset("svhn")
def _svhn(cfg: DataConfig, img_size: int) -> BaseDataset:
    from launcher.image_sets import SVHN

    # Larger sizes are reached by wrap padding (the 32 px digit tiled), as the feature-prediction
    # paper does for its 64 px autoencoders, rather than by upsampling.
    return ArrayImages(SVHN(Path(cfg.root), cfg.split), wrap_to=max(img_size, SVHN.size))


class ArrayImages(Dataset):
    """(PIL image, class label) from a source with ``image(i)`` (uint8 HWC) and ``label(i)``."""

    def __init__(self, source, wrap_to: int | None = None) -> None:
        self.source, self.wrap_to = source, wrap_to

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        pixels = self.source.image(index)
        if self.wrap_to and self.wrap_to > pixels.shape[0]:
            extra = self.wrap_to - pixels.shape[0]
            pixels = np.pad(pixels, ((0, extra), (0, extra), (0, 0)), mode="wrap")
        return Image.fromarray(pixels), torch.tensor(self.source.label(index), dtype=torch.long)

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return sequential_split(len(self), fraction)


class _LabelledImages(Dataset):
    """(PIL image, label tensor) from a torchvision data set returning (PIL, target)."""

    def __init__(self, dataset: Dataset, label: Callable[[object], torch.Tensor]) -> None:
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        image, target = self.dataset[index]
        return image.convert("RGB"), self.label(target)

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        return sequential_split(len(self), fraction)


class LunarLanderImages(Dataset):
    """LunarLander frames as PIL images, labelled with the lander's 8-value state."""

    def __init__(self, frames: "LunarLanderFrames") -> None:  # noqa: F821
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        image = Image.fromarray(np.asarray(self.frames.frame(index)))
        return image, torch.from_numpy(np.array(self.frames.state(index), dtype=np.float32))

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays with the last ``fraction`` of episodes second: no episode on both sides."""
        return self.frames.split_by_episode(fraction)


# ----------------------------------------------------------------------------- transforms


def build_transform(cfg: DataConfig, img_size: int, train: bool = True) -> Callable:
    """The augmentation ``cfg.augment`` names for training; resize + centre crop for evaluation.

    ``mae``: random resized crop (``min_crop_scale`` to 1, bicubic) + flip, MAE's pretraining;
    ``randaug``: timm's fine-tuning pipeline as MAE calls it (random resized crop, flip,
    RandAugment, random erasing); ``flip``/``none``: resize and centre crop, with or without flip.
    """
    augment = cfg.augment if train else "none"
    if augment == "randaug":
        from timm.data import create_transform

        return create_transform(img_size, is_training=True, scale=(cfg.min_crop_scale, 1.0), color_jitter=None,
                                auto_augment=cfg.rand_augment, interpolation="bicubic", re_prob=cfg.reprob,
                                re_mode="pixel", re_count=1, mean=tuple(cfg.mean), std=tuple(cfg.std))
    if augment == "mae":
        geometry = [
            v2.RandomResizedCrop(img_size, scale=(cfg.min_crop_scale, 1.0),
                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        resize = img_size if train else int(img_size / cfg.eval_crop_pct)
        geometry = [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
        ]
        if augment == "flip":
            geometry.append(v2.RandomHorizontalFlip())
    return v2.Compose([
        v2.PILToTensor(),
        *geometry,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
    ])


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for one sample in one epoch: augmentation, model."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


class SeededDataset(Dataset):
    """Applies the transform under the sample's own seed; keys are (index, epoch) pairs."""

    def __init__(self, base: BaseDataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, epoch = key
        augment_seed, model_seed = sample_seeds(self.seed, epoch, index)
        image, label = self.base[index]
        # Seed every RNG an augmentation may draw from (timm's also use Python's and NumPy's),
        # and restore them after, so the caller's (or the worker's) streams stay untouched.
        with torch.random.fork_rng(devices=[]), seeded_host_rngs(augment_seed):
            torch.manual_seed(augment_seed)
            image = self.transform(image)
        return {"image": image, "label": label, "seed": model_seed, "index": index}


# ----------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded over processes, and able to start mid-epoch.

    Global step s of an epoch uses samples ``perm[s*G:(s+1)*G]`` with G the global
    batch; they are split into ``accumulation_steps x world_size`` micro-batches and
    this process takes column ``rank``. The split does not change which samples make
    up a step, so any number of processes gives the same optimizer steps.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, accumulation_steps: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.micro = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = micro_batch_size * accumulation_steps * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields ``epoch`` from optimizer step ``start_step`` on."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation_steps * self.micro

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        used = perm[: self.steps_per_epoch * self.global_batch].view(
            self.steps_per_epoch, self.accumulation_steps, self.world_size, self.micro
        )
        mine = used[self.start_step:, :, self.rank].reshape(-1)
        return iter([(int(i), self.epoch) for i in mine])


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.stack([s["label"] for s in samples]),
        "seed": torch.tensor([s["seed"] for s in samples], dtype=torch.long),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


def build_loader(dataset: SeededDataset, sampler: ResumableSampler, num_workers: int,
                 pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=sampler.micro,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator, so that starting an iterator (which draws the workers' base
        # seed) never advances the global RNG that the model's drop-path draws from.
        generator=torch.Generator().manual_seed(0),
    )
