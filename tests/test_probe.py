from __future__ import annotations

import numpy as np
import torch

from launcher.probe import grid_features, r2_scores, ridge_probe


def test_ridge_probe_recovers_a_linear_map_and_rejects_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 20))
    w = rng.normal(size=(20, 2))
    y = x @ w + 0.01 * rng.normal(size=(600, 2))
    r2 = ridge_probe(x[:500], y[:500], x[500:], y[500:])
    assert r2.shape == (2,) and (r2 > 0.99).all()
    noise = rng.normal(size=(600, 2))
    assert (ridge_probe(x[:500], noise[:500], x[500:], noise[500:]) < 0.1).all()


def test_r2_is_one_for_perfect_and_zero_for_the_mean() -> None:
    y = np.array([[1.0], [2.0], [4.0]])
    assert r2_scores(y, y)[0] == 1.0
    assert abs(r2_scores(y, np.full_like(y, y.mean()))[0]) < 1e-12


def test_grid_features_average_each_cell() -> None:
    # 4 x 4 patches with D = 1 holding their own row-major index.
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    cells = grid_features(tokens, 2)
    expected = [np.mean([0, 1, 4, 5]), np.mean([2, 3, 6, 7]), np.mean([8, 9, 12, 13]), np.mean([10, 11, 14, 15])]
    assert cells.tolist() == [expected]
