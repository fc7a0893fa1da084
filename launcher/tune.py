"""Ray Tune sweeps: the autoencoder loss comparison (``launch tune ae-losses``).

This is the only module that imports ray. A sweep file (``experiments/tune/ae_losses*.yaml``)
names a grid: procedures x latent sizes z x KL weights γ x seeds x data sets. Every trial
trains one autoencoder with the project's trainer (checkpointed in the trial's directory,
so a restarted trial resumes), embeds the predictor and test sets with μ, trains the
predictor grid on those embeddings and reports the best predictor's test score together
with the autoencoder's wall-clock training time per epoch. Re-running the same command
restores the sweep: finished trials are kept, unfinished and failed ones run again.

On SLURM (``launch tune ae-losses --nodes N --cluster NAME``) the sweep runs on a Ray cluster
that one job of N nodes starts: ``launcher.slurm.RaySweepJob`` runs a task per node, and the
helpers here start and stop this node's part of it (``ray_node``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
RAY_NODES = "ray-nodes.json"  # in a sweep directory: the Ray cluster it last ran on


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

    @property
    def num_trials(self) -> int:
        return len(self.procedures) * len(self.z) * len(self.gamma) * len(self.seeds) * len(self.datasets)


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
        "hostname": socket.gethostname(),  # the node that ran the trial
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


def check_sweep_dir(sweep: SweepConfig, path: Path) -> bool:
    """Refuse a directory that holds something else; True if it holds this sweep already."""
    if path.exists() and not (path / "sweep.yaml").exists():
        raise ConfigError(f"{path} exists but is not a sweep of this tool; choose another --storage or sweep name")
    if (path / "sweep.yaml").exists() and read_yaml(path / "sweep.yaml") != to_dict(sweep):
        raise ConfigError(f"{path} holds a sweep with a different configuration; rename the sweep (name: ...) "
                          f"or remove that directory to start over")
    return path.exists()


def write_sweep_file(sweep: SweepConfig, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sweep.yaml").write_text(json.dumps(to_dict(sweep)))  # JSON is valid YAML


def run_sweep(sweep: SweepConfig, storage: Path, address: str | None = None, num_nodes: int | None = None,
              nodes_timeout_s: float = 300.0) -> Path:
    """Run (or, when its directory exists, restore and finish) the sweep; returns its directory.

    ``address``: an existing Ray cluster (default: a local one). ``num_nodes``: wait until that
    many nodes have joined it before the first trial starts.
    """
    import ray
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # relative data paths stay relative to here
    storage = storage.resolve()
    path = sweep_dir(sweep, storage)
    check_sweep_dir(sweep, path)
    prepare_data(sweep)
    ray.init(address=address, num_cpus=None if address else os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    try:
        if address is not None:
            nodes = wait_for_nodes(num_nodes or 1, nodes_timeout_s)
            path.mkdir(parents=True, exist_ok=True)
            (path / RAY_NODES).write_text(json.dumps({"address": address, "nodes": nodes}, indent=2) + "\n")
        trainable = tune.with_resources(tune.with_parameters(_trainable, sweep=sweep),
                                        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
        if tune.Tuner.can_restore(str(path)):
            log.info("restoring the sweep in %s: finished trials are kept", path)
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=True)
        else:
            write_sweep_file(sweep, path)
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
    finally:
        # Disconnect before anyone stops the cluster: a driver that loses its GCS exits hard.
        ray.shutdown()
    errors = [r for r in results if r.error is not None]
    log.info("sweep %s: %d trials, %d failed", path, len(results), len(errors))
    return path


def wait_for_nodes(num_nodes: int, timeout_s: float) -> list[dict[str, Any]]:
    """Wait until the connected Ray cluster has ``num_nodes`` live nodes; describe them."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= num_nodes:
            return [{"hostname": n["NodeManagerHostname"], "address": n["NodeManagerAddress"],
                     "cpus": n["Resources"].get("CPU", 0.0), "gpus": n["Resources"].get("GPU", 0.0)}
                    for n in alive]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(alive)} of {num_nodes} Ray nodes joined the cluster in "
                               f"{timeout_s:.0f} s; the logs of the job's other tasks say why")
        time.sleep(1.0)


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The last reported result of every finished trial of a sweep directory."""
    trials = []
    for result_file in sorted(Path(path).glob("*/result.json")):
        lines = [line for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(json.loads(lines[-1]))
    return trials


# ----------------------------------------------------------------------------- a Ray node of a SLURM job


class RayNode:
    """This task's ``ray start --block``: the Ray processes of one node, and only those.

    ``ray stop`` would stop every Ray instance of the machine, other users' and, on a test cluster
    whose nodes share a machine, the other nodes'. A blocking ``ray start`` instead owns its
    processes: SIGTERM makes it stop them all, and they die with it if it is killed.
    """

    def __init__(self, process: subprocess.Popen, address: str, temp_dir: Path) -> None:
        self.process, self.address, self.temp_dir = process, address, temp_dir

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("ray start did not stop its node in %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def use_cluster_token(token: str) -> None:
    """Token authentication with the job's own token, for this process and the Ray processes it starts.

    Ray turns token authentication on for a head whenever ``~/.ray/auth_token`` exists, while
    nodes that join read the mode from the environment only: without this, they would be refused.
    """
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)


def ray_temp_dir(name: str) -> Path:
    """A node-local Ray temp dir of its own (short: Ray's socket paths are length-limited)."""
    return Path(os.environ.get("RAY_TMPDIR") or "/tmp") / f"ray-{name}"


def _free_ports(host: str, count: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # all bound at once, so they differ
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def start_ray_node(temp_dir: Path, head_address: str | None = None, num_cpus: int | None = None,
                   num_gpus: int | None = None, timeout_s: float = 300.0) -> RayNode:
    """Start the head (``head_address`` None) or a worker joining it; return once it runs.

    Several nodes may share one machine and network stack (the local test cluster): each has
    its own temp dir, and every port but the head's is picked free by the OS.
    """
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--temp-dir", str(temp_dir),
               "--disable-usage-stats", "--node-manager-port", "0", "--object-manager-port", "0",
               "--min-worker-port", "0", "--max-worker-port", "0", "--dashboard-agent-listen-port", "0"]
    if head_address is None:
        # The address the other nodes reach this one at: its hostname resolved, as in Ray's
        # SLURM recipe. Ray's CLI replaces a loopback address (the local test cluster's) by the
        # machine's own; GCS and raylet listen on every interface anyway, hence the token.
        # Workers find their address by the route to the head.
        ip = socket.gethostbyname(socket.gethostname())
        port, dashboard_port, client_port = _free_ports(ip, 3)
        command += ["--head", "--node-ip-address", ip, "--port", str(port), "--include-dashboard", "false",
                    "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port)]
        address = f"{ip}:{port}"
    else:
        command += ["--address", head_address]
        address = head_address
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    # Trials keep the job's working directory, on every node: relative data paths resolve alike.
    # A node is stopped only once the sweep is over: nothing to drain (Ray waits up to 30 s).
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    log.info("starting a Ray %s node: %s", "head" if head_address is None else "worker", " ".join(command))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    node = RayNode(process, address, temp_dir)
    ready = temp_dir / "ray_current_cluster"  # ray start writes it once its node runs
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if not node.alive():
            node.stop()
            raise RuntimeError(f"`ray start` exited with code {process.returncode} before its node ran; "
                               f"its output is in this task's log")
        if time.monotonic() > deadline:
            node.stop()
            raise RuntimeError(f"the Ray node did not start in {timeout_s:.0f} s; see this task's log")
        time.sleep(0.5)
    log.info("Ray %s node running (cluster %s)", "head" if head_address is None else "worker", address)
    return node


@contextlib.contextmanager
def ray_node(temp_dir: Path, head_address: str | None = None, num_cpus: int | None = None,
             num_gpus: int | None = None) -> Iterator[RayNode]:
    """A Ray node of this task (see ``start_ray_node``), stopped on leaving, however we leave."""
    node = start_ray_node(temp_dir, head_address, num_cpus, num_gpus)
    try:
        yield node
    finally:
        node.stop()
        log.info("stopped the Ray node of this task")
