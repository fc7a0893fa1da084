"""Ray Tune sweeps: the autoencoder loss comparison (``launch tune ae-losses``).

This is the only module that imports ray. A sweep file (``experiments/tune/ae_losses*.yaml``)
names a grid: procedures x latent sizes z x KL weights γ x seeds x data sets. Every trial
trains one autoencoder with the project's trainer (checkpointed in the trial's directory,
so a restarted trial resumes), embeds the predictor and test sets with μ, trains the
predictor grid on those embeddings and reports the best predictor's test score together
with the autoencoder's wall-clock training time per epoch. Re-running the same command
restores the sweep: finished trials are kept, unfinished and failed ones run again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from launcher.config import (REPO_ROOT, DataConfig, ExperimentConfig, OptimConfig, TrainConfig, build_dataclass,
                             read_yaml, to_dict)
from launcher.errors import ConfigError

log = logging.getLogger(__name__)

PROCEDURES = ("ae_iipw", "ae_iips", "ae_iffp", "ae_fipw", "ae_fips", "ae_fffp")
TUNE_DIR = REPO_ROOT / "experiments" / "tune"


@dataclass
class PredictorSetup:
    """The downstream predictors every trial trains on its embeddings."""

    hidden_sizes: tuple[tuple[int, ...], ...] = ((), (32,), (64,), (32, 32), (64, 32), (64, 64), (128, 128))
    max_epochs: int = 500
    patience: int = 25
    batch_size: int = 512
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.hidden_sizes or min(self.max_epochs, self.patience, self.batch_size) <= 0 or self.lr <= 0:
            raise ValueError("predictors need hidden_sizes and positive max_epochs, patience, batch_size, lr")


@dataclass
class SweepDataset:
    """One data set of the sweep: where its three sets are and what the predictors predict."""

    task: Literal["classification", "regression"]
    autoencoder: DataConfig  # the set the autoencoders train on
    predictor: DataConfig  # predictors train on it; its last validation_fraction validates them
    test: DataConfig
    img_size: int = 64
    targets: tuple[int, ...] = ()  # regression: label columns to predict (LunarLander: x, y)
    on_screen_only: bool = False  # LunarLander: predictor and test frames with the lander on screen
    validation_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.task == "regression" and not self.targets:
            raise ValueError("a regression data set needs targets (label columns)")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


@dataclass
class SweepConfig:
    name: str
    datasets: dict[str, SweepDataset]
    procedures: tuple[str, ...] = PROCEDURES
    z: tuple[int, ...] = (64, 128)
    gamma: tuple[float, ...] = (0.0, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    loss_network: str = "efficientnet_lite0"
    loss_network_weights: str | None = None
    loss_network_sigmoid: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        blr=5e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_epochs=0.0, min_lr=1e-3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        num_epochs=50, global_batch_size=512, micro_batch_size=512, log_every=1, checkpoint_every=200))
    predictors: PredictorSetup = field(default_factory=PredictorSetup)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2  # retries of a failed trial

    def __post_init__(self) -> None:
        unknown = set(self.procedures) - set(PROCEDURES)
        if unknown:
            raise ValueError(f"unknown procedure(s) {sorted(unknown)}; known: {', '.join(PROCEDURES)}")
        if not (self.datasets and self.procedures and self.z and self.gamma and self.seeds):
            raise ValueError("a sweep needs at least one data set, procedure, z, gamma and seed")
        if self.train.log_every != 1:
            raise ValueError("train.log_every must be 1: the time per epoch is summed from every step")


def load_sweep(path: Path, only_dataset: str | None = None) -> SweepConfig:
    raw = read_yaml(path)
    sweep = build_dataclass(SweepConfig, raw, "sweep")
    if only_dataset is not None:
        if only_dataset not in sweep.datasets:
            raise ConfigError(f"sweep {path} has no data set {only_dataset!r}; it has {', '.join(sweep.datasets)}")
        sweep.datasets = {only_dataset: sweep.datasets[only_dataset]}
    return sweep


def trial_experiment(sweep: SweepConfig, trial: dict[str, Any]) -> ExperimentConfig:
    """The experiment one trial trains: the procedure at (z, γ, seed) on the data set's AE set."""
    from methods import get_method

    spec = sweep.datasets[trial["dataset"]]
    try:
        method = get_method(trial["procedure"]).config(
            img_size=spec.img_size, z=trial["z"], gamma=trial["gamma"],
            loss_network=sweep.loss_network, loss_network_weights=sweep.loss_network_weights,
            loss_network_sigmoid=sweep.loss_network_sigmoid)
    except ValueError as e:
        raise ConfigError(f"trial {trial}: {e}") from None
    return ExperimentConfig(method=method, data=spec.autoencoder, optim=sweep.optim,
                            train=dataclasses.replace(sweep.train, seed=trial["seed"]))


# ----------------------------------------------------------------------------- one trial


def embed_set(model, data: DataConfig, img_size: int, spec: SweepDataset) -> tuple[np.ndarray, np.ndarray, Any]:
    """μ embeddings and labels of a whole set (no augmentation), and the data set for splitting."""
    import torch

    from launcher.data import build_base_dataset, build_transform

    base = build_base_dataset(data, img_size)
    transform = build_transform(data, img_size, train=False)
    keep = np.arange(len(base))
    if spec.on_screen_only:
        keep = keep[base.frames.on_screen_mask()]
    device = next(model.parameters()).device
    embeddings, labels = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(keep), 256):
            samples = [base[int(i)] for i in keep[start:start + 256]]
            images = torch.stack([transform(s[0]) for s in samples]).to(device)
            embeddings.append(model.embed(images).float().cpu().numpy())
            labels.append(np.stack([s[1].numpy() for s in samples]))
    y = np.concatenate(labels)
    if spec.task == "regression":
        y = y[:, list(spec.targets)].astype(np.float32)
    return np.concatenate(embeddings), y, (base, keep)


def run_trial(trial: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """Train one autoencoder, then its predictors; returns the metrics to report."""
    from ray import tune

    from launcher.predictors import Split, fit_predictors
    from launcher.runs import read_metrics
    from launcher.trainer import Trainer

    spec = sweep.datasets[trial["dataset"]]
    cfg = trial_experiment(sweep, trial)
    run_dir = Path(tune.get_context().get_trial_dir()) / "autoencoder"
    trainer = Trainer(cfg, run_dir)
    trainer.resume()
    trainer.fit()
    steps = read_metrics(run_dir)
    seconds_per_epoch = sum(m["step_time"] for m in steps) / cfg.train.num_epochs
    model = trainer.accelerator.unwrap_model(trainer.model)

    start = time.perf_counter()
    x, y, (base, kept) = embed_set(model, spec.predictor, spec.img_size, spec)
    test_x, test_y, _ = embed_set(model, spec.test, spec.img_size, spec)
    # Split by the data set's own rule (LunarLander: whole episodes), among the kept samples.
    _, val_idx = base.split(spec.validation_fraction)
    is_val = np.isin(kept, val_idx)
    results = fit_predictors(Split(x[~is_val], y[~is_val]), Split(x[is_val], y[is_val]), Split(test_x, test_y),
                             spec.task, grid=sweep.predictors.hidden_sizes, seed=trial["seed"],
                             max_epochs=sweep.predictors.max_epochs, patience=sweep.predictors.patience,
                             batch_size=sweep.predictors.batch_size, lr=sweep.predictors.lr)
    best = min(results, key=lambda r: r.val_loss)
    score = "accuracy" if spec.task == "classification" else "r2"
    return {
        "score": best.test[score],
        "score_name": score,
        **{f"test_{k}": v for k, v in best.test.items()},
        "best_hidden": list(best.hidden),
        "seconds_per_epoch": seconds_per_epoch,
        "final_loss": steps[-1]["loss"],
        "predictor_seconds": time.perf_counter() - start,
        "predictors": [{"hidden": list(r.hidden), "val_loss": r.val_loss, **r.test} for r in results],
    }


def _trainable(trial: dict[str, Any], sweep: SweepConfig) -> None:
    from ray import tune

    tune.report(run_trial(trial, sweep))


# ----------------------------------------------------------------------------- the sweep


def sweep_dir(sweep: SweepConfig, storage: Path) -> Path:
    return (storage / sweep.name).resolve()


def prepare_data(sweep: SweepConfig) -> None:
    """Open every set once here, before any trial: missing files fail now, LunarLander is generated."""
    from launcher.data import build_base_dataset

    for spec in sweep.datasets.values():
        for data in (spec.autoencoder, spec.predictor, spec.test):
            build_base_dataset(data, spec.img_size)


def run_sweep(sweep: SweepConfig, storage: Path, address: str | None = None) -> Path:
    """Run (or, when its directory exists, restore and finish) the sweep; returns its directory."""
    import ray
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # relative data paths stay relative to here
    storage = storage.resolve()
    path = sweep_dir(sweep, storage)
    if path.exists() and not (path / "sweep.yaml").exists():
        raise ConfigError(f"{path} exists but is not a sweep of this tool; choose another --storage or sweep name")
    if (path / "sweep.yaml").exists() and read_yaml(path / "sweep.yaml") != to_dict(sweep):
        raise ConfigError(f"{path} holds a sweep with a different configuration; rename the sweep (name: ...) "
                          f"or remove that directory to start over")
    prepare_data(sweep)
    ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=sweep),
                                    {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    if tune.Tuner.can_restore(str(path)):
        log.info("restoring the sweep in %s: finished trials are kept", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / "sweep.yaml").write_text(json.dumps(to_dict(sweep)))  # JSON is valid YAML
        space = {"procedure": tune.grid_search(list(sweep.procedures)), "z": tune.grid_search(list(sweep.z)),
                 "gamma": tune.grid_search(list(sweep.gamma)), "seed": tune.grid_search(list(sweep.seeds)),
                 "dataset": tune.grid_search(list(sweep.datasets))}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="score", mode="max"),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
        )
    results = tuner.fit()
    errors = [r for r in results if r.error is not None]
    log.info("sweep %s: %d trials, %d failed", path, len(results), len(errors))
    return path


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The last reported result of every finished trial of a sweep directory."""
    trials = []
    for result_file in sorted(Path(path).glob("*/result.json")):
        lines = [line for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(json.loads(lines[-1]))
    return trials
