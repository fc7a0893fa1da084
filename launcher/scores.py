"""Scores of predictions against targets, in one place for every probe and evaluation."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def r2_score(y: Array, prediction: Array) -> Array:
    """Coefficient of determination per target column of ``y`` ``[N, T]`` (NumPy or torch).

    1 is a perfect prediction, 0 predicting the mean, below 0 worse than the mean.
    """
    residual = ((y - prediction) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - residual / total


def r2_from_sums(sse: torch.Tensor, total: torch.Tensor, squares: torch.Tensor, n: float) -> torch.Tensor:
    """R² per column from streamed sums: squared errors, targets and squared targets over ``n`` samples.

    The same score as ``r2_score``, for an evaluation whose predictions are never gathered in
    one place (each process sums its shard); NaN where a target is constant.
    """
    sst = squares - total**2 / n
    return torch.where(sst > 0, 1.0 - sse / sst, torch.full_like(sst, float("nan")))
