"""Downstream predictors: small MLPs trained on frozen embeddings, to judge an encoder.

The grid of hidden sizes is the feature-prediction paper's, from a linear map up to two
layers of 128. Each predictor trains with early stopping on a validation set and is
scored on a test set it never saw: cross-entropy and accuracy for classes, MSE and R²
for regression. Unlike the reference code, validation and test passes run without
gradients, every predictor gets a fresh model and optimizer, training is seeded, and
time is wall-clock.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.scores import r2_score

log = logging.getLogger(__name__)

Task = Literal["classification", "regression"]
PAPER_HIDDEN_SIZES: tuple[tuple[int, ...], ...] = ((), (32,), (64,), (32, 32), (64, 32), (64, 64), (128, 128))


@dataclass
class Split:
    """Embeddings and targets of one set: ``x`` [N, D] float, ``y`` [N] class ids or [N, T] values."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class PredictorResult:
    hidden: tuple[int, ...]
    val_loss: float
    test: dict[str, float]
    epochs: int
    seconds: float
    history: list[float] = field(default_factory=list, repr=False)


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    """Linear layers with LeakyReLU between them; ``hidden=()`` is a linear probe."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.LeakyReLU()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


def _loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target) if task == "classification" else F.mse_loss(output, target)


@torch.no_grad()
def _mean_loss(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = sum(
        _loss(task, model(x[i : i + batch_size]), y[i : i + batch_size]).item() * len(x[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    )
    return total / len(x)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    model.eval()
    output = model(x)
    if task == "classification":
        return {
            "cross_entropy": F.cross_entropy(output, y).item(),
            "accuracy": (output.argmax(1) == y).float().mean().item(),
        }
    return {"mse": F.mse_loss(output, y).item(), "r2": r2_score(y, output).mean().item()}


def _tensors(split: Split, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(split.x, dtype=torch.float32)
    y = torch.as_tensor(split.y, dtype=torch.long if task == "classification" else torch.float32)
    return x, y


def train_predictor(
    train: Split,
    val: Split,
    test: Split,
    task: Task,
    hidden: tuple[int, ...],
    *,
    seed: int = 0,
    max_epochs: int = 500,
    patience: int = 25,
    batch_size: int = 512,
    lr: float = 1e-3,
) -> PredictorResult:
    """Train one MLP with Adam, keep the weights of the best validation epoch, score them on test."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (x, y), (vx, vy), (tx, ty) = _tensors(train, task), _tensors(val, task), _tensors(test, task)
    out_dim = int(y.max().item()) + 1 if task == "classification" else y.shape[1]
    model = mlp(x.shape[1], hidden, out_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, since_best, history = float("inf"), None, 0, []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, max_epochs + 1):  # noqa: B007 (the count of epochs run is returned)
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = _loss(task, model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_loss = _mean_loss(model, task, vx, vy, 4096)
        history.append(val_loss)
        if val_loss < best:
            best, since_best = val_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if since_best >= patience:
                break
    model.load_state_dict(best_state)
    return PredictorResult(hidden, best, evaluate(model, task, tx, ty), epoch, time.perf_counter() - start, history)


def fit_predictors(
    train: Split,
    val: Split,
    test: Split,
    task: Task,
    grid: tuple[tuple[int, ...], ...] = PAPER_HIDDEN_SIZES,
    seed: int = 0,
    **kwargs,
) -> list[PredictorResult]:
    """Every predictor of ``grid`` on the same embeddings; pick the best by ``val_loss``."""
    results = []
    for i, hidden in enumerate(grid):
        result = train_predictor(train, val, test, task, hidden, seed=seed + i, **kwargs)
        log.info(
            "predictor %s: val %.4g, test %s, %d epochs, %.1f s",
            list(hidden) or "linear",
            result.val_loss,
            {k: round(v, 4) for k, v in result.test.items()},
            result.epochs,
            result.seconds,
        )
        results.append(result)
    return results
