"""LunarLander frame data sets: lazy memory-mapped reading, and the registered data set.

The format (the arrays and ``meta.json``) and its generation with gymnasium are in
``lunarlander_generate.py``; this module reads a generated set without loading it, and registers
``lunarlander`` with its label names, its probe subset (frames whose lander is on screen) and its
groups (episodes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from launcher.data.lunarlander_generate import (
    ARRAYS,
    FORMAT_VERSION,
    STATE_FIELDS,
    array_shape,
    frame_size_for,
    generate_lunarlander,
)
from launcher.data.registry import BaseDataset, DataConfig, register_dataset
from launcher.errors import DataError

logger = logging.getLogger(__name__)

# What no single frame shows: rates of change, which need two frames.
MOTION_FIELDS: tuple[str, ...] = ("vx", "vy", "angular_velocity")
# Where the screen's edges are in the state's units. gymnasium's x is the lander's offset from the
# centre over half the width; y is its height above the pad's legs-down level over half the height.
_SCREEN_HEIGHT = 400 / 30  # VIEWPORT_H / SCALE, in metres
_PAD_LEVEL = _SCREEN_HEIGHT / 4 + 18 / 30  # helipad_y + LEG_DOWN / SCALE
SCREEN_X = (-1.0, 1.0)
SCREEN_Y = (-_PAD_LEVEL / (_SCREEN_HEIGHT / 2), (_SCREEN_HEIGHT - _PAD_LEVEL) / (_SCREEN_HEIGHT / 2))  # -0.59, 1.41
_META_KEYS = ("format_version", "num_frames", "size", "state_fields")
_GENERATE_HINT = (
    "run `launch data lunarlander --frames 20000 --out {root}` (or set data.generate_frames to have runs generate it)"
)


class LunarLanderFrames:
    """A generated LunarLander data set, read lazily through memory maps."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        hint = _GENERATE_HINT.format(root=self.root)
        if not self.root.is_dir():
            raise DataError(
                f"no LunarLander data set at {self.root}: the directory does not exist. To create it, {hint}."
            )
        self._meta = self._read_meta(hint)
        self._arrays = {name: self._open_array(name, hint) for name in ARRAYS}

    def _read_meta(self, hint: str) -> dict[str, Any]:
        """Load meta.json and check the fields the reader relies on."""
        path = self.root / "meta.json"
        if not path.is_file():
            raise DataError(
                f"{self.root} is not a complete LunarLander data set: {path.name} is missing "
                f"(generation may have been interrupted, or this is another directory). "
                f"Delete {self.root} and {hint}."
            )
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(
                f"{path} cannot be read as JSON ({err}); the data set is corrupt. Delete {self.root} and {hint}."
            ) from err
        missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
        if missing:
            raise DataError(
                f"{path} lacks {', '.join(missing)}; the data set is corrupt or not a LunarLander "
                f"data set. Delete {self.root} and {hint}."
            )
        if meta["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{self.root} has LunarLander data format version {meta['format_version']!r}, but "
                f"this code reads version {FORMAT_VERSION}. Regenerate it: delete {self.root} "
                f"and {hint}."
            )
        if list(meta["state_fields"]) != list(STATE_FIELDS):
            raise DataError(
                f"{path} lists state fields {meta['state_fields']}, expected "
                f"{list(STATE_FIELDS)}; the data set is corrupt. Delete {self.root} and {hint}."
            )
        return meta

    def _open_array(self, name: str, hint: str) -> np.ndarray:
        """Memory-map one array and check its dtype and shape against meta.json."""
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise DataError(
                f"{self.root} is not a complete LunarLander data set: {path.name} is missing. "
                f"Delete {self.root} and {hint}."
            )
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(
                f"{path} cannot be read as a .npy array ({err}); the data set is corrupt. "
                f"Delete {self.root} and {hint}."
            ) from err
        dtype = ARRAYS[name][0]
        shape = array_shape(name, self._meta["num_frames"], self._meta["size"])
        if array.dtype != dtype or array.shape != shape:
            raise DataError(
                f"{path} holds {array.dtype} {array.shape} but meta.json implies {dtype} {shape}; "
                f"the data set is corrupt or was modified. Delete {self.root} and {hint}."
            )
        return array

    @property
    def meta(self) -> dict[str, Any]:
        """The contents of meta.json (a copy)."""
        return dict(self._meta)

    @property
    def size(self) -> int:
        """Frame height and width in pixels."""
        return int(self._meta["size"])

    @property
    def frames(self) -> np.ndarray:
        """All frames, a read-only memmap uint8 [N, size, size, 3]."""
        return self._arrays["frames"]

    @property
    def states(self) -> np.ndarray:
        """All observations, a read-only memmap float32 [N, 8], columns as in STATE_FIELDS."""
        return self._arrays["states"]

    @property
    def episodes(self) -> np.ndarray:
        """Episode id of every frame, int64 [N], non-decreasing."""
        return self._arrays["episodes"]

    @property
    def steps(self) -> np.ndarray:
        """Step within its episode of every frame, int32 [N]; 0 is the frame right after reset."""
        return self._arrays["steps"]

    def __len__(self) -> int:
        return len(self._arrays["frames"])

    def frame(self, i: int) -> np.ndarray:
        """Frame i, uint8 [size, size, 3] RGB (a writable copy)."""
        return np.array(self._arrays["frames"][i])

    def state(self, i: int) -> np.ndarray:
        """The observation at the instant of frame i, float32 [8]."""
        return np.array(self._arrays["states"][i])

    def episode(self, i: int) -> int:
        """The episode frame i belongs to."""
        return int(self._arrays["episodes"][i])

    def on_screen_mask(self) -> np.ndarray:
        """True for frames whose lander's centre is on screen (``SCREEN_X``, ``SCREEN_Y``, inclusive)."""
        x = self.states[:, 0]
        y = self.states[:, 1]
        return (x >= SCREEN_X[0]) & (x <= SCREEN_X[1]) & (y >= SCREEN_Y[0]) & (y <= SCREEN_Y[1])

    def split_by_episode(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Frame indices of (first episodes, last `fraction` of episodes); no episode is in both.

        The number of held-out episodes is round(fraction * episodes), kept between 1 and
        episodes - 1 so neither side is empty.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}.")
        episodes = np.asarray(self.episodes)
        ids = np.unique(episodes)
        if len(ids) < 2:
            raise DataError(
                f"{self.root} holds a single episode, which cannot be split by episode. "
                f"Generate more frames (--frames) or shorter episodes."
            )
        num_second = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
        second = np.isin(episodes, ids[len(ids) - num_second :])
        return np.flatnonzero(~second), np.flatnonzero(second)


# ----------------------------------------------------------------------------- as a registered data set


def on_screen_indices(dataset: LunarLanderImages) -> np.ndarray:
    """The frames whose lander's centre is on screen: a frame of a lander that has flown off shows
    nothing of where it is (the probe's and the evaluation's subset)."""
    return np.flatnonzero(dataset.frames.on_screen_mask())


def episode_ids(dataset: LunarLanderImages) -> np.ndarray:
    """The episode of every frame: the probe's folds keep episodes whole (neighbouring frames are near copies)."""
    return np.asarray(dataset.frames.episodes)


def prepare_lunarlander(cfg: DataConfig, img_size: int) -> None:
    """Generate ``cfg.generate_frames`` frames at ``cfg.root`` unless a data set is there already."""
    root = Path(cfg.root)
    if cfg.generate_frames > 0 and not (root / "meta.json").exists():
        size = frame_size_for(img_size)
        logger.info("no LunarLander data at %s: generating %d frames of %d px", root, cfg.generate_frames, size)
        generate_lunarlander(
            root,
            cfg.generate_frames,
            size=size,
            agent=cfg.generate_agent,
            num_workers=max(1, cfg.num_workers),
            seed=cfg.generate_seed,
            max_episode_steps=cfg.generate_max_episode_steps or None,
            frame_stride=cfg.generate_frame_stride,
        )


def count_lunarlander(cfg: DataConfig) -> int | None:
    """The frames at ``cfg.root`` (read from its arrays' headers), or those it will generate."""
    if not (Path(cfg.root) / "meta.json").exists():
        return cfg.generate_frames or None
    try:
        return len(LunarLanderFrames(Path(cfg.root)))
    except DataError:
        return None


@register_dataset(
    "lunarlander",
    prepare=prepare_lunarlander,
    count=count_lunarlander,
    label_names=STATE_FIELDS,
    motion_labels=MOTION_FIELDS,
    subset=on_screen_indices,
    subset_of="LunarLander frames",
    groups=episode_ids,
)
def open_lunarlander(cfg: DataConfig, img_size: int) -> BaseDataset:
    return LunarLanderImages(LunarLanderFrames(Path(cfg.root)))


class LunarLanderImages(Dataset):
    """LunarLander frames as PIL images, labelled with the lander's 8-value state."""

    def __init__(self, frames: LunarLanderFrames) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        image = Image.fromarray(np.asarray(self.frames.frame(index)))
        return image, torch.from_numpy(np.array(self.frames.state(index), dtype=np.float32))

    def split(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays with the last ``fraction`` of episodes second: no episode on both sides."""
        return self.frames.split_by_episode(fraction)
