"""Evaluation of a classifier or regressor on a held-out set, sharded over the processes.

A method that can be evaluated has ``cfg.task`` (``"classification"`` or ``"regression"``),
``predict(images)`` and, for regression, ``targets_of(labels)``. Each process evaluates every
``world_size``-th sample; the sums are all-reduced, so the metrics are those of the whole set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from launcher.data import DataConfig, open_dataset, probe_subset
from launcher.data.sampling import SeededDataset, collate
from launcher.data.transforms import build_transform
from launcher.scores import r2_from_sums


@dataclass
class EvalConfig:
    """Evaluation of a fine-tuned or probed model on a held-out set, at the end of training.

    ``data`` holds only the keys that differ from the experiment's ``data`` section (e.g.
    ``split: test`` or another ``root``); unset, there is no evaluation.
    """

    data: DataConfig | None = None
    every_epochs: int = 0  # also evaluate every this many epochs; 0: only at the end
    batch_size: int = 256  # per process
    # Score only the data set's probe subset, as the probe does (LunarLander: the frames whose lander's
    # centre is on screen; a frame of a lander that has flown off the top shows nothing to say where it is).
    on_screen_only: bool = False

    def __post_init__(self) -> None:
        if self.every_epochs < 0 or self.batch_size <= 0:
            raise ValueError("eval.every_epochs must be >= 0 and eval.batch_size > 0")


def build_eval_loader(
    cfg: EvalConfig, img_size: int, rank: int, world_size: int, classes: list[str] | None = None
) -> DataLoader:
    """This rank's share of the evaluation set; ``classes`` (the training set's names) define its labels."""
    data = cfg.data
    base = open_dataset(data, img_size)
    if classes is not None and hasattr(base, "relabel"):
        base.relabel(classes)
    indices = probe_subset(data.name, base, "eval.on_screen_only") if cfg.on_screen_only else np.arange(len(base))
    dataset = SeededDataset(base, build_transform(data, img_size, train=False), seed=0)
    keys = [(int(index), 0) for index in indices[rank::world_size]]
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=keys,
        num_workers=data.num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )


@torch.no_grad()
def evaluate(method: nn.Module, loader: DataLoader, device: torch.device, all_reduce_sum) -> dict[str, float]:
    """Top-1/top-5 accuracy and cross-entropy, or MSE and R² per target; ``all_reduce_sum`` sums over ranks."""
    task = method.cfg.task
    was_training = method.training
    method.eval()
    sums: torch.Tensor | None = None
    try:
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            outputs = method.predict(images).double()
            if task == "classification":
                top5 = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
                hits = top5 == labels.unsqueeze(1)
                part = torch.stack(
                    [
                        torch.tensor(float(len(labels)), device=device, dtype=torch.float64),
                        F.cross_entropy(outputs, labels, reduction="sum"),
                        hits[:, 0].sum().double(),
                        hits.any(dim=1).sum().double(),
                    ]
                )
            else:
                y = method.targets_of(labels).double()
                part = torch.cat(
                    [
                        torch.tensor([float(len(y))], device=device, dtype=torch.float64),
                        ((outputs - y) ** 2).sum(0),
                        y.sum(0),
                        (y**2).sum(0),
                    ]
                )
            sums = part if sums is None else sums + part
    finally:
        method.train(was_training)
    if sums is None:
        raise ValueError("the evaluation set is empty")
    sums = all_reduce_sum(sums).cpu()
    n = float(sums[0])
    if task == "classification":
        return {
            "samples": n,
            "loss": float(sums[1]) / n,
            "acc1": 100 * float(sums[2]) / n,
            "acc5": 100 * float(sums[3]) / n,
        }
    k = (len(sums) - 1) // 3
    sse, total, squares = sums[1 : 1 + k], sums[1 + k : 1 + 2 * k], sums[1 + 2 * k :]
    r2 = r2_from_sums(sse, total, squares, n).tolist()
    return {
        "samples": n,
        "mse": float(sse.sum()) / (n * k),
        "r2": sum(r2) / k,
        **{f"r2_{column}": value for column, value in zip(method.cfg.targets, r2)},
    }
