"""A quick ridge-regression probe: how well do frozen embeddings predict the labels?

Used by the local demo: after pretraining, the encoder's embeddings of held-out
LunarLander frames are regressed onto the lander's (x, y), and the same is done for
the encoder at its random initialisation, so the gain from pretraining is visible.
Train and test frames come from different episodes (neighbouring frames are nearly
identical, so a random split would leak).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from launcher.config import ExperimentConfig
from launcher.data import build_base_dataset, build_transform

log = logging.getLogger(__name__)

RIDGE_PENALTIES = tuple(10.0 ** k for k in range(-3, 5))


def grid_features(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens ``[B, N, D]`` of a square image, averaged over grid x grid cells: ``[B, grid*grid*D]``."""
    b, n, d = tokens.shape
    side = int(round(n ** 0.5))
    assert side * side == n, f"{n} patch tokens do not form a square grid"
    token_map = tokens.transpose(1, 2).reshape(b, d, side, side)
    return torch.nn.functional.adaptive_avg_pool2d(token_map, grid).flatten(1)


@torch.no_grad()
def embed(model: nn.Module, images: list[torch.Tensor], grid: int, batch_size: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack(images[i:i + batch_size]).to(device)
        out.append((grid_features(model.patch_tokens(x), grid) if grid else model.embed(x)).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def fit_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression on standardised features; returns (mean, scale, weights, bias)."""
    mean, scale = x.mean(0), x.std(0) + 1e-8
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ (y - y.mean(0)))
    return mean, scale, weights, y.mean(0)


def r2_scores(y: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Coefficient of determination per target column."""
    residual = ((y - prediction) ** 2).sum(0)
    total = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - residual / total


def ridge_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """Test R² per target; the penalty is chosen on the last fifth of the training set."""
    cut = int(len(train_x) * 0.8)

    def predict(params: tuple, x: np.ndarray) -> np.ndarray:
        mean, scale, weights, bias = params
        return (x - mean) / scale @ weights + bias

    best = max(RIDGE_PENALTIES, key=lambda lam: r2_scores(
        train_y[cut:], predict(fit_ridge(train_x[:cut], train_y[:cut], lam), train_x[cut:])).mean())
    return r2_scores(test_y, predict(fit_ridge(train_x, train_y, best), test_x))


def probe_encoders(cfg: ExperimentConfig, encoders: dict[str, nn.Module]) -> dict[str, list[float]]:
    """R² of the configured label columns for each encoder, on the same frames."""
    base = build_base_dataset(cfg.data, cfg.method.img_size)
    transform = build_transform(cfg.data, cfg.method.img_size, train=False)
    train_idx, test_idx = base.split(cfg.probe.test_fraction)
    budget = cfg.probe.num_samples
    n_test = max(1, int(budget * cfg.probe.test_fraction))
    # Evenly spaced frames across each side keep every episode represented.
    train_idx = train_idx[np.linspace(0, len(train_idx) - 1, min(len(train_idx), budget - n_test)).astype(int)]
    test_idx = test_idx[np.linspace(0, len(test_idx) - 1, min(len(test_idx), n_test)).astype(int)]

    def load(indices: np.ndarray) -> tuple[list[torch.Tensor], np.ndarray]:
        samples = [base[int(i)] for i in indices]
        labels = np.stack([s[1].numpy() for s in samples])[:, list(cfg.probe.targets)].astype(np.float64)
        return [transform(s[0]) for s in samples], labels

    (train_images, train_y), (test_images, test_y) = load(train_idx), load(test_idx)
    log.info("probe: %d train / %d test frames, targets %s", len(train_y), len(test_y), list(cfg.probe.targets))
    grid = cfg.probe.grid
    return {name: ridge_probe(embed(model, train_images, grid), train_y, embed(model, test_images, grid), test_y).tolist()
            for name, model in encoders.items()}
