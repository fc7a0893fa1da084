"""R², the one score every probe and evaluation reports."""

from __future__ import annotations

import numpy as np
import torch

from launcher.scores import r2_from_sums, r2_score


def test_r2_is_one_for_perfect_and_zero_for_the_mean() -> None:
    y = np.array([[1.0], [2.0], [4.0]])
    assert r2_score(y, y)[0] == 1.0
    assert abs(r2_score(y, np.full_like(y, y.mean()))[0]) < 1e-12


def test_streamed_sums_give_the_same_r2_as_the_arrays() -> None:
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    prediction = y + 0.5 * torch.randn(50, 3, generator=generator, dtype=torch.float64)
    streamed = r2_from_sums(((prediction - y) ** 2).sum(0), y.sum(0), (y**2).sum(0), len(y))
    torch.testing.assert_close(streamed, r2_score(y, prediction))
    constant = r2_from_sums(torch.ones(1), torch.full((1,), 5.0), torch.full((1,), 5.0), 5)
    assert torch.isnan(constant).all()  # a constant target has no variance to explain
