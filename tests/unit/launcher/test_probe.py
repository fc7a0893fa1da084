"""The cheap probe: episode-level splits, ridge that finds a linear map and nothing in noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.data import DataConfig
from launcher.data.lunarlander import generate_lunarlander
from launcher.probe import (
    ProbeConfig,
    ProbeSet,
    choose_penalties,
    cross_validated_probe,
    episode_folds,
    ridge_predictions,
)


def test_no_fold_puts_one_episode_on_two_sides_and_every_sample_is_held_out_once() -> None:
    groups = np.repeat(np.arange(20), np.random.default_rng(0).integers(1, 30, size=20))
    folds = episode_folds(groups, 5)
    episodes = [set(groups[fold]) for fold in folds]
    assert all(episodes) and sum(len(e) for e in episodes) == len(set().union(*episodes)) == 20  # disjoint
    held_out = np.sort(np.concatenate(folds))
    assert held_out.tolist() == list(range(len(groups)))


def test_ridge_recovers_a_linear_map_and_finds_nothing_in_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20))
    y = np.stack([x[:, 0], x[:, 1] - 2 * x[:, 2], rng.normal(size=300)], axis=1)  # two signals, one noise
    folds = episode_folds(np.arange(300) // 5, 5)
    r2 = cross_validated_probe(x, y, folds)
    assert r2[0] > 0.99 and r2[1] > 0.99 and r2[2] < 0.05  # noise: about 0 or below
    penalties = choose_penalties(x, y, folds)
    assert penalties[2] > penalties[0]  # the noise column is shrunk hardest


@pytest.mark.parametrize("features", [8, 80], ids=["primal", "dual"])
def test_the_penalty_path_equals_one_solve_per_penalty(features: int) -> None:
    rng = np.random.default_rng(1)
    x, y, test = rng.normal(size=(50, features)), rng.normal(size=(50, 2)), rng.normal(size=(7, features))
    mean = x.mean(0)
    scale = np.sqrt(((x - mean) ** 2).mean())
    a, b = (x - mean) / scale, (test - mean) / scale
    for penalty, got in zip((0.1, 10.0), ridge_predictions(x, y, test, (0.1, 10.0))):
        weights = np.linalg.solve(a.T @ a + penalty * np.eye(features), a.T @ (y - y.mean(0)))
        np.testing.assert_allclose(got, b @ weights + y.mean(0), rtol=1e-7, atol=1e-9)


def test_a_feature_equal_to_a_target_scores_one_and_noise_zero_on_lunarlander_episodes(tmp_path) -> None:
    root = tmp_path / "probe"
    generate_lunarlander(root, 900, num_workers=1, seed=3, agent="random")
    cfg = ProbeConfig(data=DataConfig(name="lunarlander", root=str(root), augment="none"), targets=(0, 1, 2, 3, 4))
    probe = ProbeSet(cfg, 64)
    episodes = np.asarray(probe.dataset.frames.episodes)[probe.indices]
    for k, fold in enumerate(probe.folds):
        others = np.concatenate([f for j, f in enumerate(probe.folds) if j != k])
        assert not set(episodes[fold]) & set(episodes[others])  # a probe never sees its test episodes
    x_of_frame = torch.from_numpy(np.asarray(probe.dataset.frames.states)[probe.indices, 0])
    seen, generator = [0], torch.Generator().manual_seed(0)

    def true_x(images: torch.Tensor) -> torch.Tensor:  # the samples come in probe.indices order
        rows = x_of_frame[seen[0] : seen[0] + len(images)]
        seen[0] += len(images)
        return torch.stack([rows, torch.randn(len(rows), generator=generator)], dim=1)

    assert probe.score(true_x).r2[0] > 0.999
    noise = probe.score(lambda images: torch.randn(len(images), 16, generator=generator))
    assert noise.mean < 0.05 and all(r2 < 0.1 for r2 in noise.r2.values())
