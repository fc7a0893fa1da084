"""Augmentations: MAE's pretraining crop, MAE's fine-tuning RandAugment, and evaluation resizing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from launcher.data.registry import DataConfig


def build_transform(cfg: DataConfig, img_size: int, train: bool = True) -> Callable:
    """The augmentation ``cfg.augment`` names for training; resize + centre crop for evaluation.

    ``mae``: random resized crop (``min_crop_scale`` to 1, bicubic) + flip, MAE's pretraining (from the
    file's bytes with ``data.decode`` reduced or device: ``decode.py``);
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
    if augment == "mae" and cfg.decode == "reduced":
        from launcher.data.decode import ReducedDecodeCrop

        return ReducedDecodeCrop(img_size, (cfg.min_crop_scale, 1.0))
    if augment == "mae" and cfg.decode == "device":
        from launcher.data.decode import DeviceDecodeCrop

        return DeviceDecodeCrop((cfg.min_crop_scale, 1.0))
    if augment == "mae" and cfg.resample == "pillow":
        return PillowResizedCrop(img_size, (cfg.min_crop_scale, 1.0), cfg.mean, cfg.std)
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


def build_device_stage(cfg: DataConfig, img_size: int, train: bool = True):
    """What the training process does to a batch on its device before the model sees it
    (``DeviceDecoder`` for ``data.decode: device``, ``DeviceNormalize`` for ``reduced``), or ``None``."""
    if train and cfg.augment == "mae" and cfg.decode == "device":
        from launcher.data.decode import DeviceDecoder

        return DeviceDecoder(img_size, cfg.mean, cfg.std)
    if train and cfg.augment == "mae" and cfg.decode == "reduced":
        from launcher.data.decode import DeviceNormalize

        return DeviceNormalize(cfg.mean, cfg.std)
    return None


class PillowResizedCrop:
    """MAE's random resized crop + flip + normalise, resampled by Pillow in one pass.

    The crop box is drawn exactly as torchvision's ``RandomResizedCrop`` draws it (its own
    ``get_params``, from the torch RNG the sample's seed has set), then the flip; Pillow crops and
    resizes in one bicubic pass (its filters widen when they shrink: antialiased) on the 8-bit
    image, and only the final ``img_size`` square becomes floats. The torchvision path instead
    converts the whole decoded image to a tensor and resamples that.
    """

    host_rngs = False  # draws only from torch's RNG

    def __init__(self, img_size: int, scale: tuple[float, float], mean: Sequence[float], std: Sequence[float]) -> None:
        self.img_size, self.scale, self.ratio = img_size, scale, (3 / 4, 4 / 3)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = v2.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        box = (left, top, left + width, top + height)
        out = image.resize((self.img_size, self.img_size), Image.Resampling.BICUBIC, box=box)
        if torch.rand(1) < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(2, 0, 1)
        return (pixels - self.mean) / self.std
