"""The sampler and the per-sample seeds that make resume exact.

Every random draw of the data pipeline is a function of (seed, epoch, sample index):
the sampler shuffles with a generator seeded by (seed, epoch) and hands each sample
its own seeds, which drive its augmentation here and its mask in the method
(``batch["seed"]``). Nothing depends on a worker's leftover RNG state or on how a
global batch is split over processes, so a run resumed at any step sees the same
batches, crops and masks as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from launcher.data.registry import BadSample, BaseDataset
from launcher.errors import DataError
from launcher.methods.seeding import seeded_host_rngs

log = logging.getLogger(__name__)


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for one sample in one epoch: augmentation, model."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


MAX_REPLACEMENTS = 10  # draws of a replacement for a bad sample before the data set is called broken
_reported: set[str] = set()  # bad files this process has logged already


class SeededDataset(Dataset):
    """Applies the transform under the sample's own seed; keys are (index, epoch) pairs.

    A sample whose file cannot be read is replaced by another, drawn from (seed, epoch, index),
    so the pipeline stays a function of the key and resume stays exact; the sample says so
    (``bad``: 1) for the trainer to count, and the file is logged once per process. A transform
    with ``reads_encoded`` gets the file's bytes (``base.encoded``) and decodes them itself, so a
    file that fails there is replaced alike. The transform's output is the sample's ``image``, or,
    as a dict, several entries (``data.decode: device`` sends bytes and crop boxes).
    """

    def __init__(self, base: BaseDataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.reads_encoded = getattr(transform, "reads_encoded", False)
        # Seeding Python's and NumPy's RNGs costs about as much as a small crop: only for
        # transforms that may draw from them (timm's).
        self.host_rngs = getattr(transform, "host_rngs", True)

    def __len__(self) -> int:
        return len(self.base)

    def _transformed(self, index: int, augment_seed: int) -> tuple[object, torch.Tensor]:
        sample, label = self.base.encoded(index) if self.reads_encoded else self.base[index]
        # Seed every RNG an augmentation may draw from (timm's also use Python's and NumPy's),
        # and restore them after, so the caller's (or the worker's) streams stay untouched.
        # The CPU generator alone: torch.manual_seed would also queue seeds for every accelerator.
        with torch.random.fork_rng(devices=[]), seeded_host_rngs(augment_seed) if self.host_rngs else nullcontext():
            torch.default_generator.manual_seed(augment_seed)
            return self.transform(sample), label

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, epoch = key
        augment_seed, model_seed = sample_seeds(self.seed, epoch, index)
        draws = np.random.default_rng([self.seed, epoch, index])
        source, bad = index, 0
        while True:
            try:
                out, label = self._transformed(source, augment_seed)
                break
            except BadSample as e:
                if e.path not in _reported:
                    _reported.add(e.path)
                    log.warning("unreadable sample replaced by another: %s", e)
                bad += 1
                if bad > MAX_REPLACEMENTS:
                    raise DataError(
                        f"{bad} samples in a row could not be read, the last {e}: the data set is mostly "
                        f"broken. Run `launch data check {Path(e.path).parent.parent}` to list bad files."
                    ) from None
                source = int(draws.integers(len(self.base)))
        entries = out if isinstance(out, dict) else {"image": out}
        return {**entries, "label": label, "seed": model_seed, "index": index, "bad": bad}


# ----------------------------------------------------------------------------- sampling


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, sharded over processes, and able to start mid-epoch.

    Global step s of an epoch uses samples ``perm[s*G:(s+1)*G]`` with G the global
    batch; they are split into ``accumulation_steps x world_size`` micro-batches and
    this process takes column ``rank``. The split does not change which samples make
    up a step, so any number of processes gives the same optimizer steps.
    """

    def __init__(
        self, num_samples: int, micro_batch_size: int, accumulation_steps: int, rank: int, world_size: int, seed: int
    ) -> None:
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
        mine = used[self.start_step :, :, self.rank].reshape(-1)
        return iter([(int(i), self.epoch) for i in mine])


def collate(samples: list[dict]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """A batch of samples: tensors stacked (image or features, label), integers as int64 (seed, index);
    tensors of differing shapes (the encoded files of ``data.decode: device``) as a list."""
    batch: dict[str, torch.Tensor | list[torch.Tensor]] = {}
    for key, value in samples[0].items():
        values = [s[key] for s in samples]
        if not isinstance(value, torch.Tensor):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif all(v.shape == value.shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def build_loader(dataset: SeededDataset, sampler: ResumableSampler, num_workers: int, pin_memory: bool) -> DataLoader:
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
