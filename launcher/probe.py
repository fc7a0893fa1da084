"""A cheap, fixed probe of frozen embeddings: closed-form ridge regression, penalty chosen on validation.

How well a linear map of an encoder's embeddings predicts labels it never trained on is the
measure of quality the demo and the studies share; the same probe runs on a random-init
encoder and on raw pixels, so a gain is visible as a difference.
"""

from __future__ import annotations

import numpy as np

from launcher.scores import r2_score

RIDGE_PENALTIES = tuple(10.0**k for k in range(-3, 5))


def fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression on standardised features; returns (mean, scale, weights, bias)."""
    mean, scale = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    return mean, scale, weights, y.mean(0)


def predict_ridge(params: tuple, x: np.ndarray) -> np.ndarray:
    mean, scale, weights, bias = params
    return (x - mean) / scale @ weights + bias


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """Test R² per target; the penalty is chosen on the last fifth of the training set."""
    cut = int(len(train_x) * 0.8)
    best = max(
        RIDGE_PENALTIES,
        key=lambda lam: r2_score(
            train_y[cut:], predict_ridge(fit_ridge(train_x[:cut], train_y[:cut], lam), train_x[cut:])
        ).mean(),
    )
    return r2_score(test_y, predict_ridge(fit_ridge(train_x, train_y, best), test_x))
