"""The resumable sampler and per-sample seeds: any split of a step, exact skipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.data import DataConfig, open_dataset
from launcher.data.sampling import ResumableSampler, SeededDataset, build_loader, sample_seeds
from launcher.data.transforms import build_transform


def step_indices(sampler: ResumableSampler, step: int) -> list[int]:
    """The sample indices this process uses in optimizer step ``step`` of the current epoch."""
    per_step = sampler.micro * sampler.accumulation_steps
    keys = list(sampler)
    return [i for i, _ in keys[step * per_step : (step + 1) * per_step]]


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 2), (4, 1)])
def test_a_step_uses_the_same_samples_for_any_split(world: int, accum: int) -> None:
    global_batch = 8
    single = ResumableSampler(100, global_batch, 1, 0, 1, seed=3)
    shards = [ResumableSampler(100, global_batch // (world * accum), accum, r, world, seed=3) for r in range(world)]
    assert all(s.steps_per_epoch == single.steps_per_epoch == 12 for s in shards)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        for step in range(single.steps_per_epoch):
            together = sorted(i for s in shards for i in step_indices(s, step))
            assert together == sorted(step_indices(single, step))


def test_epochs_reshuffle_and_start_step_skips_exactly() -> None:
    sampler = ResumableSampler(64, 4, 2, 0, 1, seed=0)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert [i for i, _ in list(sampler)] != [i for i, _ in epoch0]
    sampler.set_epoch(0, start_step=3)
    assert list(sampler) == epoch0[3 * 8 :]
    assert len(sampler) == len(epoch0) - 3 * 8


def test_sample_seeds_depend_on_seed_epoch_index() -> None:
    seeds = {sample_seeds(s, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(seeds) == 8
    assert sample_seeds(0, 0, 5) == sample_seeds(0, 0, 5)
    a, m = sample_seeds(0, 0, 0)
    assert a != m and 0 <= a < 2**63 and 0 <= m < 2**63


@pytest.mark.parametrize("resample", ["tensor", "pillow"])
def test_augmentation_is_a_function_of_the_key_not_of_workers(image_folder: Path, resample: str) -> None:
    cfg = DataConfig(name="imagefolder", root=str(image_folder), augment="mae", num_workers=2, resample=resample)
    dataset = SeededDataset(open_dataset(cfg, 32), build_transform(cfg, 32), seed=0)
    first = dataset[(5, 0)]
    torch.manual_seed(123)  # the caller's RNG must not matter...
    assert torch.equal(first["image"], dataset[(5, 0)]["image"])
    assert not torch.equal(first["image"], dataset[(5, 1)]["image"])  # ...but the epoch does
    assert first["image"].shape == (3, 32, 32)

    sampler = ResumableSampler(len(dataset), 4, 1, 0, 1, seed=0)
    in_process = list(build_loader(dataset, sampler, num_workers=0, pin_memory=False))
    in_workers = list(build_loader(dataset, sampler, num_workers=2, pin_memory=False))
    for a, b in zip(in_process, in_workers, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seed"], b["seed"])


def test_pillow_resampling_draws_the_crops_and_flips_of_the_tensor_path(image_folder: Path) -> None:
    # Same key, same crop box and flip: the two paths differ only by Pillow's 8-bit rounding
    # and clipping of the bicubic overshoot, while the other flip differs by whole intensities.
    tensor, pillow = (
        SeededDataset(open_dataset(cfg, 32), build_transform(cfg, 32), seed=0)
        for cfg in (
            DataConfig(name="imagefolder", root=str(image_folder), augment="mae", resample=resample)
            for resample in ("tensor", "pillow")
        )
    )
    for key in [(i, epoch) for i in range(0, 36, 5) for epoch in range(3)]:
        a, b = tensor[key]["image"], pillow[key]["image"]
        assert a.shape == b.shape == (3, 32, 32)
        assert (a - b).abs().mean() < 0.1 < 0.3 < (a - b.flip(-1)).abs().mean(), key
