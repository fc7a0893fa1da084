"""The autoencoder loss study (``launch tune ae-losses``): six procedures judged by predictors on their embeddings.

A sweep file (``experiments/tune/ae_losses*.yaml``) names a grid: procedures x latent sizes z
x KL weights γ x seeds x data sets. Every trial trains one autoencoder with the project's
trainer (checkpointed in the trial's directory, so a restarted trial resumes), embeds the
predictor and test sets with μ, trains the predictor grid on those embeddings
(``predictors.py``) and reports the best predictor's test score together with the
autoencoder's wall-clock training time per epoch. The grid runs through the generic Ray
Tune driver (``launcher.tune``), locally or on a Ray cluster inside one SLURM job.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from launcher.config import build_dataclass, read_yaml, to_dict
from launcher.data import DataConfig, open_dataset, prepare, probe_subset, sample_groups
from launcher.errors import ConfigError
from launcher.experiment import ExperimentConfig
from launcher.methods.autoencoders import PROCEDURES
from launcher.optim import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"


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
    on_screen_only: bool = False  # predictor and test sets: the probe subset (LunarLander: the lander on screen)
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
    procedures: tuple[str, ...] = tuple(PROCEDURES)
    z: tuple[int, ...] = (64, 128)
    gamma: tuple[float, ...] = (0.0, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    loss_network: str = "efficientnet_lite0"
    loss_network_weights: str | None = None
    loss_network_sigmoid: bool = True
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            blr=5e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_epochs=0.0, min_lr=1e-3
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            num_epochs=50, global_batch_size=512, micro_batch_size=512, log_every=1, checkpoint_every=200
        )
    )
    predictors: PredictorSetup = field(default_factory=PredictorSetup)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2  # retries of a failed trial

    def __post_init__(self) -> None:
        check_directory_name(self.name, "sweep")
        unknown = set(self.procedures) - set(PROCEDURES)
        if unknown:
            raise ValueError(f"unknown procedure(s) {sorted(unknown)}; known: {', '.join(PROCEDURES)}")
        if not (self.datasets and self.procedures and self.z and self.gamma and self.seeds):
            raise ValueError("a sweep needs at least one data set, procedure, z, gamma and seed")
        if self.train.log_every != 1:
            raise ValueError("train.log_every must be 1: the time per epoch is summed from every step")

    @property
    def num_trials(self) -> int:
        return len(self.procedures) * len(self.z) * len(self.gamma) * len(self.seeds) * len(self.datasets)

    @property
    def grid(self) -> dict[str, list]:
        return {
            "procedure": list(self.procedures),
            "z": list(self.z),
            "gamma": list(self.gamma),
            "seed": list(self.seeds),
            "dataset": list(self.datasets),
        }

    def directory(self, storage: Path) -> Path:
        return (Path(storage) / self.name).resolve()

    def check_directory(self, path: Path) -> bool:
        """Refuse a directory that holds something else; True if it holds this sweep already."""
        if path.exists() and not (path / SWEEP_FILE).exists():
            raise ConfigError(f"{path} exists but is not a sweep of this tool; choose another --storage or sweep name")
        if (path / SWEEP_FILE).exists() and read_yaml(path / SWEEP_FILE) != to_dict(self):
            raise ConfigError(
                f"{path} holds a sweep with a different configuration; rename the sweep (name: ...) "
                f"or remove that directory to start over"
            )
        return path.exists()

    def write(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / SWEEP_FILE).write_text(json.dumps(to_dict(self)))  # JSON is valid YAML


def check_directory_name(name: str, what: str) -> None:
    """``name`` becomes a directory under the storage: letters, digits, '.', '_', '-', nothing that climbs out."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.startswith(".."):
        raise ValueError(
            f"{what} name {name!r} must be letters, digits, '.', '_' and '-' (it names a directory "
            f"under the storage; no '/' or '..')"
        )


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
    from launcher.methods import get_method

    spec = sweep.datasets[trial["dataset"]]
    try:
        method = get_method(trial["procedure"]).make_config(
            img_size=spec.img_size,
            z=trial["z"],
            gamma=trial["gamma"],
            loss_network=sweep.loss_network,
            loss_network_weights=sweep.loss_network_weights,
            loss_network_sigmoid=sweep.loss_network_sigmoid,
        )
    except ValueError as e:
        raise ConfigError(f"trial {trial}: {e}") from None
    return ExperimentConfig(
        method=method,
        data=spec.autoencoder,
        optim=sweep.optim,
        train=dataclasses.replace(sweep.train, seed=trial["seed"]),
    )


# ----------------------------------------------------------------------------- one trial


def embed_set(model, data: DataConfig, spec: SweepDataset) -> tuple[np.ndarray, np.ndarray, Any]:
    """μ embeddings and labels (every column) of a whole set, no augmentation; (data set, kept indices)."""
    from launcher.data.transforms import build_transform
    from launcher.embeddings import embed_dataset

    base = open_dataset(data, spec.img_size)
    keep = probe_subset(data.name, base, "on_screen_only") if spec.on_screen_only else np.arange(len(base))
    model.eval()
    x, y = embed_dataset(
        model.embed, base, build_transform(data, spec.img_size, train=False), keep, next(model.parameters()).device
    )
    return x, y, (base, keep)


def ridge_probe_scores(
    x: np.ndarray,
    labels: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    groups: np.ndarray,
    spec: SweepDataset,
    dataset: str,
) -> dict[str, float]:
    """The cheap probe of ``launcher/probe.py`` on the predictors' embeddings: fit on the predictor set
    (penalty chosen over folds of its ``groups``, LunarLander's episodes), scored on the test set.

    Regression: R² of every label column (LunarLander: all 8 state values) and the mean over the
    first five; classification: ridge on one-hot labels, accuracy of the largest output.
    """
    from launcher.probe import episode_folds, held_out_predictions, held_out_probe, target_names

    # Five folds where there are five episodes; a small predictor set (a few long episodes) gets
    # one fold per episode rather than an error.
    folds = episode_folds(groups, max(2, min(5, len(np.unique(groups)))))
    if spec.task == "regression":
        y, test_y = labels.reshape(len(x), -1), test_labels.reshape(len(test_x), -1)
        r2 = held_out_probe(x, y, folds, test_x, test_y)
        names = target_names(dataset, tuple(range(y.shape[1])))
        scores = {f"probe_r2_{names[k]}": float(v) for k, v in enumerate(r2)}
        return {**scores, "probe_r2_mean": float(np.mean(r2[: min(5, len(r2))]))}
    classes = np.concatenate([labels, test_labels]).astype(int)
    onehot = np.eye(classes.max() + 1)
    y, test_y = onehot[labels.astype(int)], onehot[test_labels.astype(int)]
    prediction = held_out_predictions(x, y, folds, test_x)
    return {"probe_accuracy": float((prediction.argmax(1) == test_y.argmax(1)).mean())}


def run_trial(trial: dict[str, Any], trial_dir: Path, sweep: SweepConfig) -> dict[str, Any]:
    """Train one autoencoder, then its predictors; returns the metrics to report."""
    from launcher.studies.predictors import Split, fit_predictors
    from launcher.trainer import Trainer

    spec = sweep.datasets[trial["dataset"]]
    cfg = trial_experiment(sweep, trial)
    trainer = Trainer(cfg, trial_dir / "autoencoder")
    trainer.resume()
    result = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)

    start = time.perf_counter()
    x, labels, (base, kept) = embed_set(model, spec.predictor, spec)
    test_x, test_labels, _ = embed_set(model, spec.test, spec)
    # Split by the data set's own rule (LunarLander: whole episodes), among the kept samples.
    _, val_idx = base.split(spec.validation_fraction)
    is_val = np.isin(kept, val_idx)
    groups = sample_groups(spec.predictor.name, base)[kept]  # LunarLander: fold by episode
    probe = ridge_probe_scores(x, labels, test_x, test_labels, groups, spec, spec.predictor.name)
    y, test_y = labels, test_labels
    if spec.task == "regression":
        y, test_y = (a[:, list(spec.targets)].astype(np.float32) for a in (labels, test_labels))
    results = fit_predictors(
        Split(x[~is_val], y[~is_val]),
        Split(x[is_val], y[is_val]),
        Split(test_x, test_y),
        spec.task,
        grid=sweep.predictors.hidden_sizes,
        seed=trial["seed"],
        max_epochs=sweep.predictors.max_epochs,
        patience=sweep.predictors.patience,
        batch_size=sweep.predictors.batch_size,
        lr=sweep.predictors.lr,
    )
    best = min(results, key=lambda r: r.val_loss)
    score = "accuracy" if spec.task == "classification" else "r2"
    return {
        "score": best.test[score],
        "score_name": score,
        **{f"test_{k}": v for k, v in best.test.items()},
        "best_hidden": list(best.hidden),
        "seconds_per_epoch": result.seconds_per_epoch,
        "final_loss": result.loss,
        "predictor_seconds": time.perf_counter() - start,
        "predictors": [{"hidden": list(r.hidden), "val_loss": r.val_loss, **r.test} for r in results],
        **probe,
        "hostname": socket.gethostname(),  # the node that ran the trial
    }


# ----------------------------------------------------------------------------- the sweep


def prepare_data(sweep: SweepConfig) -> None:
    """Make and open every set once here, before any trial: missing files fail now."""
    for spec in sweep.datasets.values():
        for data in (spec.autoencoder, spec.predictor, spec.test):
            prepare(data, spec.img_size)
            open_dataset(data, spec.img_size)


def run(sweep: SweepConfig, storage: Path, address: str | None = None, num_nodes: int | None = None) -> Path:
    """Run (or, when its directory exists, restore and finish) the sweep; returns its directory."""
    from launcher.tune.driver import run_sweep

    path = sweep.directory(storage)
    sweep.check_directory(path)
    prepare_data(sweep)
    sweep.write(path)
    run_sweep(
        functools.partial(run_trial, sweep=sweep),
        sweep.grid,
        path,
        resources={"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial},
        metric="score",
        max_failures=sweep.max_failures,
        address=address,
        num_nodes=num_nodes,
    )
    return path


def run_sweep_file(sweep_dir: Path, storage: Path, address: str, num_nodes: int) -> Path:
    """The sweep of ``SWEEP/sweep.yaml`` on an existing Ray cluster (a SLURM sweep job's head)."""
    return run(load_sweep(sweep_dir / SWEEP_FILE), storage, address, num_nodes)
