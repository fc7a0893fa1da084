"""The embedded default (``launch pretrain METHOD --local``): pretrain, then show what was learnt.

After the local pretraining run, a ridge probe of the lander's state on frozen embeddings
of held-out episodes is printed next to the same probe of the encoder at its random
initialisation, then MAE's linear probe (``experiments/linprobe/local.yaml``) trains on the
frozen encoder and is evaluated on frames of other episodes. None of this is part of the
run's config: a run directory holds the pretraining run, ``probe.json`` and ``linprobe/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from launcher import sources
from launcher.config import EXPERIMENTS_DIR
from launcher.data import open_dataset
from launcher.data.lunarlander import STATE_FIELDS
from launcher.data.transforms import build_transform
from launcher.embeddings import embed_dataset, pooled_patch_tokens
from launcher.experiment import ExperimentConfig, load_experiment
from launcher.local import run_training
from launcher.probe import ridge_probe
from launcher.runs import describe_eval, read_eval
from methods import build_method


@dataclass(frozen=True)
class ProbeConfig:
    """The demo's ridge probe: label columns, how many frames, held-out share, pooling grid."""

    targets: tuple[int, ...] = (0, 1)  # LunarLander: x, y
    num_samples: int = 4000
    test_fraction: float = 0.2
    grid: int = 2  # patch tokens averaged over grid x grid cells; 0 uses the method's embed()
    linprobe: Path = EXPERIMENTS_DIR / "linprobe" / "local.yaml"


def target_names(cfg: ExperimentConfig, targets: tuple[int, ...]) -> list[str]:
    names = STATE_FIELDS if cfg.data.name == "lunarlander" else ()
    return [names[t] if t < len(names) else str(t) for t in targets]


def run_demo(
    cfg: ExperimentConfig,
    experiment: Path,
    run_dir: Path,
    resuming: bool,
    out: TextIO,
    probe: ProbeConfig = ProbeConfig(),
) -> int:
    """Pretrain ``cfg`` in ``run_dir``, then the two probes; writes what it shows to ``out``."""
    out.write(f"experiment {experiment}\nrun directory {run_dir}{' (resuming)' if resuming else ''}\n")
    out.flush()
    trainer, result = run_training(cfg, run_dir)
    if not result.finished:
        out.write(
            f"stopped at step {result.step}/{result.total_steps}; run the same command with "
            f"--run-dir {run_dir} to resume\n"
        )
        return 0
    out.write(f"finished {result.step} steps in {run_dir}\n")
    if not trainer.accelerator.is_main_process:
        return 0
    trained = trainer.accelerator.unwrap_model(trainer.model)
    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
    initial = build_method(cfg.method).to(next(trained.parameters()).device)
    scores = probe_encoders(cfg, probe, {"pretrained": trained, "random init": initial})
    (run_dir / "probe.json").write_text(json.dumps({"targets": list(probe.targets), "r2": scores}, indent=2))
    columns = [f"R2({name})" for name in target_names(cfg, probe.targets)]
    out.write(f"\nRidge probe of label columns {list(probe.targets)} on frozen embeddings (held-out episodes):\n")
    out.write(f"  {'encoder':<28}" + "".join(f"{c:>9}" for c in columns) + f"{'mean':>9}\n")
    labels = {"pretrained": f"{cfg.method.name} after {result.step} steps", "random init": "same encoder, random init"}
    for name, r2 in scores.items():
        out.write(f"  {labels[name]:<28}" + "".join(f"{v:>9.3f}" for v in r2) + f"{sum(r2) / len(r2):>9.3f}\n")
    linear_probe(run_dir, probe.linprobe, out)
    return 0


def probe_encoders(cfg: ExperimentConfig, probe: ProbeConfig, encoders: dict[str, nn.Module]) -> dict[str, list]:
    """R² of the probe's label columns for each encoder, on the same frames of held-out episodes."""
    base = open_dataset(cfg.data, cfg.method.img_size)
    transform = build_transform(cfg.data, cfg.method.img_size, train=False)
    train_idx, test_idx = base.split(probe.test_fraction)
    n_test = max(1, int(probe.num_samples * probe.test_fraction))
    # Evenly spaced frames across each side keep every episode represented.
    train_idx = train_idx[
        np.linspace(0, len(train_idx) - 1, min(len(train_idx), probe.num_samples - n_test)).astype(int)
    ]
    test_idx = test_idx[np.linspace(0, len(test_idx) - 1, min(len(test_idx), n_test)).astype(int)]
    scores = {}
    for name, model in encoders.items():
        model.eval()
        device = next(model.parameters()).device
        encode = pooled_patch_tokens(model, probe.grid)
        (train_x, train_y), (test_x, test_y) = (
            embed_dataset(encode, base, transform, idx, device) for idx in (train_idx, test_idx)
        )
        columns = list(probe.targets)
        scores[name] = ridge_probe(
            train_x.astype(np.float64),
            train_y[:, columns].astype(np.float64),
            test_x.astype(np.float64),
            test_y[:, columns].astype(np.float64),
        ).tolist()
    return scores


def linear_probe(run_dir: Path, experiment: Path, out: TextIO) -> None:
    """``launch linprobe RUN`` with the demo's experiment, into ``RUN/linprobe``."""
    source = sources.resolve_source(run_dir, "linprobe")
    cfg = load_experiment(experiment, source.overrides, method="linprobe")
    probe_dir = run_dir / "linprobe"
    head = "BatchNorm + linear head" if cfg.method.head_batchnorm else "linear head"
    shown = (
        experiment.relative_to(EXPERIMENTS_DIR.parent) if EXPERIMENTS_DIR.parent in experiment.parents else experiment
    )
    out.write(
        f"\nLinear probe of the frozen encoder ({cfg.method.pool} pooling, {head}, "
        f"{cfg.optim.name}) from {shown}, run directory {probe_dir}\n"
    )
    out.flush()
    _, result = run_training(cfg, probe_dir)
    out.write(f"finished {result.step} steps in {probe_dir}\n")
    record = read_eval(probe_dir)
    if record is not None and "r2" in record:
        names = target_names(cfg, cfg.method.targets)
        columns = " ".join(f"R2({name}) {record[f'r2_{t}']:.3f}" for name, t in zip(names, cfg.method.targets))
        out.write(
            f"{describe_eval(record)}\nlinear probe of the pretrained encoder on held-out frames: {columns}, "
            f"mean {record['r2']:.3f}\n"
        )
