"""The run's length and optimisation: how many steps, at what batch and learning rate, with which optimiser.

``TrainConfig`` (the loop's length, batch, logging and checkpointing) and ``OptimConfig`` (the
optimiser and its schedule) are two sections of an experiment; ``schedule`` turns them, the number
of processes and the data set's size into the steps, the accumulation and the absolute lr that
the trainer follows and a dry run prints. Nothing here needs the whole experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from launcher.errors import ConfigError
from launcher.methods.protocol import NoWeightDecay, NumberedLayers
from launcher.tracking import check_names as check_tracker_names


@dataclass
class OptimConfig:
    """AdamW (or LARS) with a per-step linear warmup and half-cosine decay."""

    name: Literal["adamw", "lars"] = "adamw"  # lars: MAE's linear probe (momentum, trust 0.001)
    blr: float = 1.5e-4  # lr = blr * global_batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = None
    layer_decay: float | None = None  # layer-wise lr decay (MAE fine-tuning: 0.65); needs a ViT method
    momentum: float = 0.9  # lars only

    def __post_init__(self) -> None:
        if self.blr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("optim.blr must be > 0; optim.min_lr and optim.weight_decay >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError("optim.clip_grad must be > 0, or null to turn clipping off")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1], or null, got {self.layer_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class TrainConfig:
    """The loop: how long, how big, how often to log and checkpoint."""

    num_epochs: int = 400
    num_steps: int = 0  # when > 0: this many optimizer steps instead of num_epochs epochs (a study's budget)
    global_batch_size: int = 4096  # summed over processes and accumulation steps
    micro_batch_size: int = 64  # per process per forward pass
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Compile the method's forward and backward (torch.compile; the optimizer and EMA stay eager).
    compile: bool = False
    log_every: int = 20
    # Every this many steps (and at each log and checkpoint step) the ranks read the loss back
    # and agree on stopping: the loop's only host synchronisation. A stop signal is acted upon,
    # and a non-finite loss or too many unreadable samples found, within this many steps.
    check_every: int = 10
    checkpoint_every: int = 1000  # optimizer steps; a checkpoint is also written at the end
    num_checkpoints_kept: int = 2
    # Where the scalars go (launcher/tracking.py): any of tensorboard, wandb, mlflow.
    trackers: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "launch"
    wandb_entity: str | None = None  # None: the W&B account's default entity
    mlflow_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a file store RUN/../mlruns
    mlflow_experiment: str = "launch"
    # A checkpoint whose random states cannot be restored stops the resume (it would not repeat the
    # uninterrupted run). True: resume from it all the same, with a warning in the run's log.
    allow_inexact_resume: bool = False

    def __post_init__(self) -> None:
        for key in (
            "num_epochs",
            "global_batch_size",
            "micro_batch_size",
            "log_every",
            "check_every",
            "checkpoint_every",
            "num_checkpoints_kept",
        ):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be positive, got {getattr(self, key)}")
        check_tracker_names(self.trackers)
        if self.num_steps < 0:
            raise ValueError(f"train.num_steps must be >= 0 (0: train num_epochs epochs), got {self.num_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )

    def check_world(self, processes: int) -> int:
        """The gradient accumulation steps on ``processes`` processes; a batch that does not divide fails."""
        accumulation, remainder = divmod(self.global_batch_size, self.micro_batch_size * processes)
        if remainder or not accumulation:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) is not a multiple of "
                f"train.micro_batch_size x processes ({self.micro_batch_size} x {processes}); "
                f"change one of them or the number of nodes/GPUs"
            )
        return accumulation


@dataclass
class Schedule:
    """How a run's batch, learning rate and length follow from its config, its processes and its data."""

    processes: int
    micro_batch_size: int
    accumulation_steps: int
    global_batch_size: int
    blr: float
    base_lr: float  # the absolute peak lr: blr x global batch / 256
    num_samples: int | None  # None: not counted (then the steps are known only from train.num_steps)
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int | None
    num_epochs: int

    def describe(self) -> str:
        """One line: what a dry run shows before anything starts, and the run logs when it does."""
        batch = (
            f"{self.processes} processes x {self.micro_batch_size} micro-batch x {self.accumulation_steps} "
            f"accumulation = global batch {self.global_batch_size}"
        )
        lr = f"lr {self.base_lr:.4g} (blr {self.blr:.4g} x {self.global_batch_size}/256)"
        if self.total_steps is None:
            steps = (
                f"{self.num_epochs} epochs of (samples // {self.global_batch_size}) steps: the run counts the "
                f"samples when it opens its data set (train.num_steps fixes the length)"
            )
        elif self.steps_per_epoch is None:
            steps = f"{self.total_steps} steps (train.num_steps)"
        else:
            steps = (
                f"{self.num_samples} samples, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps "
                f"(warmup {self.warmup_steps})"
            )
        return f"{batch}; {lr}; {steps}"


def schedule(train: TrainConfig, optim: OptimConfig, processes: int, num_samples: int | None) -> Schedule:
    """The run's batch split, absolute lr and steps; ``num_samples`` None when the data set is not counted."""
    accumulation = train.check_world(processes)
    steps_per_epoch = None if num_samples is None else num_samples // train.global_batch_size
    total = train.num_steps or (None if steps_per_epoch is None else train.num_epochs * steps_per_epoch)
    warmup = None if steps_per_epoch is None else round(optim.warmup_epochs * steps_per_epoch)
    return Schedule(
        processes,
        train.micro_batch_size,
        accumulation,
        train.global_batch_size,
        optim.blr,
        optim.blr * train.global_batch_size / 256,
        num_samples,
        steps_per_epoch,
        total,
        warmup,
        train.num_epochs,
    )


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup from 0, then a half-cosine down to ``min_lr`` (MAE's schedule, per step)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or LARS; no weight decay on biases, norms and other 1-D parameters; frozen parts left out.

    With ``layer_decay`` every group gets an ``lr_scale`` (timm's layer-wise decay, by the
    method's ``group_matcher``, ``protocol.NumberedLayers``). LARS adapts the step of matrices only, as MAE's does.
    ``fused``: AdamW's one-kernel CUDA implementation (the parameters must be on the GPU).
    """
    skip = model.no_weight_decay() if isinstance(model, NoWeightDecay) else ()
    if cfg.layer_decay is not None:
        if not isinstance(model, NumberedLayers):
            raise ConfigError(
                "optim.layer_decay needs a method with numbered layers (finetune, linprobe); "
                "set optim.layer_decay=null for this one"
            )
        groups = param_groups_layer_decay(
            model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    if cfg.name == "lars":  # split every group into matrices (adapted) and the rest (plain momentum SGD)
        groups = [
            {**group, "params": params, "always_adapt": matrices}
            for group in groups
            for matrices in (True, False)
            if (params := [p for p in group["params"] if (p.ndim > 1) == matrices])
        ]
        return Lars(groups, lr=0.0, momentum=cfg.momentum, trust_coeff=0.001)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), fused=fused)
