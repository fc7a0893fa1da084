"""Runs on this machine: train a run directory to its end (or a stop signal), or evaluate one."""

from __future__ import annotations

from pathlib import Path

from launcher import local_runs
from launcher.data import DataConfig, prepare
from launcher.experiment import ExperimentConfig
from launcher.stopping import STOP_SIGNALS, StopRequest, install_stop_handlers, signals_interrupt
from launcher.tracking import check_trackers
from launcher.trainer import FitResult, Trainer


def prepare_data(cfg: ExperimentConfig, *more: DataConfig) -> None:
    """Make the run's data sets (and ``more``, read at its image size) where this project makes them
    (LunarLander), before anything trains."""
    for data in (*cfg.data_sets(), *more):
        prepare(data, cfg.method.img_size)


def run_training(cfg: ExperimentConfig, run_dir: Path) -> tuple[Trainer, FitResult]:
    """Train ``cfg`` in ``run_dir`` from its newest checkpoint; Ctrl-C, SIGTERM, SIGUSR2 checkpoint and stop.

    A stop signal while the data is being generated raises ``Interrupted`` once the generator has
    removed its partial output (nothing is kept; the same command starts it again).
    """
    check_trackers(cfg.train, run_dir)  # before the data is generated, which may take minutes
    with signals_interrupt(STOP_SIGNALS):
        prepare_data(cfg)
    stop = StopRequest()
    install_stop_handlers(stop, STOP_SIGNALS)
    trainer = Trainer(cfg, run_dir, stop)
    trainer.resume()
    main = trainer.accelerator.is_main_process
    if main:  # for `launch status|logs|cancel RUN`: who trains it, since when, and how it ended
        local_runs.start_attempt(run_dir, trainer.state.step, trainer.total_steps)
    gpus = trainer.accelerator.num_processes if trainer.accelerator.device.type == "cuda" else 0
    try:
        result = trainer.fit()
    except BaseException as e:
        if main:
            local_runs.end_attempt(run_dir, trainer.state.step, "failed", gpus, f"{type(e).__name__}: {e}"[:500])
        raise
    if main:
        local_runs.end_attempt(run_dir, result.step, "finished" if result.finished else "stopped", gpus)
    return trainer, result


def evaluate_run(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """Evaluate the newest checkpoint of ``run_dir`` (or the model as built when there is none)."""
    prepare_data(cfg)
    trainer = Trainer(cfg, run_dir)
    trainer.resume()
    return trainer.evaluate()
