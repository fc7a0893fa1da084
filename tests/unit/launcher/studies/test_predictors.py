"""MLP predictors on frozen embeddings: the paper's grid, early stopping, seeding."""

from __future__ import annotations

import numpy as np
import torch

from launcher.studies.predictors import PAPER_HIDDEN_SIZES, Split, fit_predictors, mlp, train_predictor


def regression_sets(seed: int = 0) -> tuple[Split, Split, Split]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(8, 2))

    def make(n: int) -> Split:
        x = rng.normal(size=(n, 8)).astype(np.float32)
        return Split(x, (x @ w + 0.05 * rng.normal(size=(n, 2))).astype(np.float32))

    return make(800), make(200), make(200)


def test_the_paper_grid_goes_from_linear_to_two_layers_of_128() -> None:
    assert PAPER_HIDDEN_SIZES[0] == () and PAPER_HIDDEN_SIZES[-1] == (128, 128)
    assert [m for m in mlp(8, (), 2) if isinstance(m, torch.nn.Linear)][0].in_features == 8
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp(8, (64, 32), 2)) == 3


def test_regression_reaches_high_r2_and_is_seeded() -> None:
    train, val, test = regression_sets()
    a = train_predictor(train, val, test, "regression", (), seed=3, max_epochs=60, lr=1e-2, batch_size=64)
    b = train_predictor(train, val, test, "regression", (), seed=3, max_epochs=60, lr=1e-2, batch_size=64)
    assert a.test["r2"] > 0.95 and a.test["mse"] < 0.05
    assert a.test == b.test and a.history == b.history


def test_classification_accuracy() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 4

    def make(n: int) -> Split:
        y = rng.integers(0, 4, n)
        return Split((centers[y] + rng.normal(size=(n, 6))).astype(np.float32), y)

    result = train_predictor(make(600), make(200), make(200), "classification", (32,), max_epochs=40, lr=1e-2)
    assert result.test["accuracy"] > 0.9 and result.test["cross_entropy"] < 0.5


def test_early_stopping_keeps_the_best_validation_epoch() -> None:
    rng = np.random.default_rng(0)
    # Pure-noise targets: a wide MLP overfits, the validation loss turns up, training stops.
    noise = [
        Split(rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 1)).astype(np.float32))
        for n in (200, 200, 200)
    ]
    result = train_predictor(*noise, "regression", (128, 128), max_epochs=300, patience=5, lr=1e-2, batch_size=32)
    assert result.epochs < 300
    assert result.val_loss == min(result.history)
    assert result.history.index(result.val_loss) == result.epochs - 1 - 5


def test_validation_runs_without_gradients() -> None:
    from launcher.studies.predictors import _mean_loss

    model = mlp(8, (16,), 2)
    x, y = torch.randn(50, 8), torch.randn(50, 2)
    _mean_loss(model, "regression", x, y, 16)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_fit_predictors_trains_each_size_afresh() -> None:
    train, val, test = regression_sets(2)
    results = fit_predictors(train, val, test, "regression", grid=((), (16,)), max_epochs=40, lr=1e-2)
    assert [r.hidden for r in results] == [(), (16,)]
    assert all(r.test["r2"] > 0.5 for r in results)
