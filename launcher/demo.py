"""The embedded default (``launch pretrain METHOD --local``): pretrain, then show what was learnt.

After the local pretraining run, the cheap probe (``launcher/probe.py``) of the lander's state
on frames of episodes the encoder never saw is printed for the pretrained encoder, the same
encoder at its random initialisation and raw pixels, then MAE's linear probe
(``experiments/linprobe/local.yaml``) trains on the frozen encoder and is evaluated on frames of
other episodes. None of this is part of the run's config: the run directory holds the
pretraining run, ``probe.json`` and ``linprobe/``. What the demo shows is set in
``experiments/demo/local.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from launcher import sources
from launcher.config import build_dataclass, read_yaml
from launcher.data import prepare
from launcher.experiment import ExperimentConfig, load_experiment
from launcher.local import run_training
from launcher.methods import build_method
from launcher.probe import ProbeConfig, ProbeSet, describe, target_names
from launcher.runs import CONFIG, describe_eval, read_eval, resume_note
from launcher.shipped import experiment_label, find_experiment, shipped_experiment
from launcher.stopping import STOP_SIGNALS, Interrupted, signals_interrupt
from launcher.trainer import FitResult, Trainer


@dataclass
class DemoConfig:
    """What the demo shows: the probe, and the linear-probe experiment run on the encoder."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    linprobe: str = "linprobe/local"  # a shipped experiment, or a path
    # The seeds' spread of the gain, as a study measured it (0: unknown), and where that was.
    spread: float = 0.0
    spread_note: str = "the spread over seeds is unmeasured"


def verdict(gain: float, spread: float) -> str:
    """One sentence a newcomer reads: did pretraining help the probe, given the seeds' spread?"""
    if spread <= 0:
        return (
            "Pretraining helped the probe." if gain > 0 else "Pretraining did not help the probe."
        ) + " (No spread over seeds is known, so a small difference may be chance.)"
    if gain > 2 * spread:
        return "Pretraining helped: the encoder reads the lander's state better than its random initialisation."
    if gain < -2 * spread:
        return "Pretraining made the encoder worse than its random initialisation at reading the lander's state."
    return "Pretraining made no clear difference: the gain is within twice the spread over seeds."


def load_demo(path: Path | None = None) -> DemoConfig:
    return build_dataclass(DemoConfig, read_yaml(path or shipped_experiment("demo/local")), "demo")


def run_demo(cfg: ExperimentConfig, experiment: Path, run_dir: Path, resuming: bool, out: TextIO) -> int:
    """Pretrain ``cfg`` in ``run_dir``, then the probe and the linear probe; writes what it shows to ``out``."""
    demo = load_demo()
    out.write(f"experiment {experiment}\nrun directory {run_dir}{resume_note(run_dir, resuming)}\n")
    out.flush()
    with signals_interrupt(STOP_SIGNALS):
        prepare(demo.probe.data, cfg.method.img_size)  # before training: a bad probe set fails now
    trainer, result = run_training(cfg, run_dir)
    if not result.finished:
        out.write(
            f"stopped at step {result.step}/{result.total_steps}; run the same command with "
            f"--run-dir {run_dir} to resume\n"
        )
        return 0
    out.write(f"finished {result.step} steps in {run_dir} ({result.train_seconds:.0f} s of training)\n")
    if not trainer.accelerator.is_main_process:
        return 0
    try:
        with signals_interrupt(STOP_SIGNALS):  # no step boundary while probing: a signal stops it at once
            probe_encoders(cfg, demo, trainer, result, run_dir, out)
    except Interrupted as e:
        out.write(f"{e} while probing; the pretraining run is kept. Run the same command to probe again.\n")
        return 0
    linear_probe(run_dir, find_experiment(demo.linprobe), out)
    return 0


def probe_encoders(
    cfg: ExperimentConfig, demo: DemoConfig, trainer: Trainer, result: FitResult, run_dir: Path, out: TextIO
) -> None:
    """The cheap probe of the trained encoder, its random initialisation and raw pixels, into ``RUN/probe.json``."""
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    device = next(trained.parameters()).device
    torch.manual_seed(cfg.train.seed)  # the same initialisation the run started from
    initial = build_method(cfg.method).to(device).eval()
    probe = ProbeSet(demo.probe, cfg.method.img_size)
    scores = {
        f"{cfg.method.name} after {result.step} steps": probe.score(probe.encoder(trained), device),
        "same encoder, random init": probe.score(probe.encoder(initial), device),
        f"raw pixels ({demo.probe.pixels}x{demo.probe.pixels})": probe.score_pixels(),
    }
    tmp = run_dir / ".probe.json.tmp"
    tmp.write_text(json.dumps({k: v.to_dict(probe.names) for k, v in scores.items()}, indent=2))
    tmp.replace(run_dir / "probe.json")  # never half a file
    trained_score, initial_score = list(scores.values())[:2]
    episodes = len(np.unique(probe.groups))
    headline = ", ".join(probe.names[t] for t in demo.probe.headline)
    gain = trained_score.mean - initial_score.mean
    out.write(
        f"\nProbe of the frozen encoder: ridge regression on {demo.probe.describe_readout()}, for "
        f"{len(probe.indices)} frames of {episodes} episodes it never saw ({demo.probe.data.root}); R² of "
        f"predictions of each frame by a probe fit on other episodes ({demo.probe.num_folds} folds). Targets "
        f"after the bar are rates of change, which no single frame shows:\n"
        f"{describe(scores, probe.names, demo.probe.headline, demo.probe.data.name)}\n"
        f"gain from pretraining: {gain:+.3f} mean R² over {headline} (one seed; {demo.spread_note})\n"
        f"{verdict(gain, demo.spread)}\n"
    )


def linear_probe(run_dir: Path, experiment: Path, out: TextIO) -> None:
    """``launch linprobe RUN`` with the demo's experiment, into ``RUN/linprobe``."""
    probe_dir = run_dir / "linprobe"
    recorded = read_yaml(probe_dir / CONFIG)["method"] if (probe_dir / CONFIG).is_file() else None
    source = sources.resolve_source(run_dir, "linprobe", recorded)
    cfg = load_experiment(experiment, source.overrides, method="linprobe")
    head = "BatchNorm + linear head" if cfg.method.head_batchnorm else "linear head"
    shown = experiment_label(experiment)
    out.write(
        f"\nLinear probe of the frozen encoder ({cfg.method.pool} pooling, {head}, "
        f"{cfg.optim.name}) from {shown}, run directory {probe_dir}\n"
    )
    out.flush()
    _, result = run_training(cfg, probe_dir)
    if not result.finished:
        out.write(f"stopped at step {result.step}/{result.total_steps}; run the same command to finish the probe\n")
        return
    out.write(f"finished {result.step} steps in {probe_dir}\n")
    record = read_eval(probe_dir)
    if record is not None and "r2" in record:
        names = target_names(cfg.data.name, cfg.method.targets)
        columns = " ".join(f"R2({names[t]}) {record[f'r2_{t}']:.3f}" for t in cfg.method.targets)
        out.write(
            f"{describe_eval(record)}\nlinear probe of the pretrained encoder on held-out frames: {columns}, "
            f"mean {record['r2']:.3f}\n"
        )
