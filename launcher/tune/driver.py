"""A generic Ray Tune driver: every point of a grid, one trial each, restored when interrupted.

The only module that imports ray's Tune API (lazily). A study (``launcher/studies/``) gives a
trial function, ``trial(config, trial_dir) -> metrics``, and a grid; ``run_sweep`` runs it on
local Ray or on an existing Ray cluster (``address``; see ``ray_cluster.py`` for one started
inside a SLURM job). Re-running the same sweep directory restores it: finished trials are kept,
unfinished and failed ones run again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.tune.ray_cluster import wait_for_nodes

log = logging.getLogger(__name__)

RAY_NODES = "ray-nodes.json"  # in a sweep directory: the Ray cluster it last ran on
Trial = Callable[[dict[str, Any], Path], dict[str, Any]]


def _trainable(config: dict[str, Any], trial: Trial) -> None:
    from ray import tune

    tune.report(trial(config, Path(tune.get_context().get_trial_dir())))


def run_sweep(
    trial: Trial,
    grid: dict[str, list],
    path: Path,
    *,
    resources: dict[str, float],
    metric: str,
    mode: str = "max",
    max_failures: int = 0,
    address: str | None = None,
    num_nodes: int | None = None,
    nodes_timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Run ``trial`` on every point of ``grid`` (their cross product) in ``path``; the trials' last results.

    ``address``: an existing Ray cluster (default: a local one using every core of this
    machine). ``num_nodes``: wait until that many nodes have joined it before the first trial.
    """
    import ray
    from ray import tune

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # relative data paths stay relative to here
    path = Path(path).resolve()
    ray.init(
        address=address,
        num_cpus=None if address else os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    try:
        if address is not None:
            nodes = wait_for_nodes(num_nodes or 1, nodes_timeout_s)
            path.mkdir(parents=True, exist_ok=True)
            (path / RAY_NODES).write_text(json.dumps({"address": address, "nodes": nodes}, indent=2) + "\n")
        trainable = tune.with_resources(tune.with_parameters(_trainable, trial=trial), resources)
        if tune.Tuner.can_restore(str(path)):
            log.info("restoring the sweep in %s: finished trials are kept", path)
            tuner = tune.Tuner.restore(
                str(path), trainable, resume_unfinished=True, resume_errored=False, restart_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: tune.grid_search(list(values)) for key, values in grid.items()},
                tune_config=tune.TuneConfig(metric=metric, mode=mode),
                run_config=tune.RunConfig(
                    name=path.name,
                    storage_path=str(path.parent),
                    verbose=1,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                ),
            )
        results = tuner.fit()
    finally:
        # Disconnect before anyone stops the cluster: a driver that loses its GCS exits hard.
        ray.shutdown()
    errors = [r for r in results if r.error is not None]
    log.info("sweep %s: %d trials, %d failed", path, len(results), len(errors))
    return read_trials(path)


def read_trials(path: Path) -> list[dict[str, Any]]:
    """The last reported result of every finished trial of a sweep directory."""
    trials = []
    for result_file in sorted(Path(path).glob("*/result.json")):
        lines = [line for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            trials.append(json.loads(lines[-1]))
    return trials
