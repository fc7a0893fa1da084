"""Augmentations: MAE's pretraining crop, MAE's fine-tuning RandAugment, and evaluation resizing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from launcher.data import DataConfig


def build_transform(cfg: DataConfig, img_size: int, train: bool = True) -> Callable:
    """The augmentation ``cfg.augment`` names for training; resize + centre crop for evaluation.

    ``mae``: random resized crop (``min_crop_scale`` to 1, bicubic) + flip, MAE's pretraining;
    ``randaug``: timm's fine-tuning pipeline as MAE calls it (random resized crop, flip,
    RandAugment, random erasing); ``flip``/``none``: resize and centre crop, with or without flip.
    """
    augment = cfg.augment if train else "none"
    if augment == "randaug":
        from timm.data import create_transform

        return create_transform(
            img_size,
            is_training=True,
            scale=(cfg.min_crop_scale, 1.0),
            color_jitter=None,
            auto_augment=cfg.rand_augment,
            interpolation="bicubic",
            re_prob=cfg.reprob,
            re_mode="pixel",
            re_count=1,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
    if augment == "mae":
        geometry = [
            v2.RandomResizedCrop(
                img_size, scale=(cfg.min_crop_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
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
    return v2.Compose(
        [
            v2.PILToTensor(),
            *geometry,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
