"""Experiment trackers: the run's scalars in TensorBoard, Weights & Biases and/or MLflow.

``train.trackers`` names them (default ``[tensorboard]``). Rank 0 opens them when training
starts and gives each the same things: the training scalars of every logged step, every
evaluation, and (W&B, MLflow) the resolved config as hyperparameters, under the run directory's
name. The W&B and MLflow run ids are kept in ``RUN/trackers.json``: a resumed or requeued run
goes on logging into the same tracker run instead of starting another.

``check_trackers`` is called before anything starts (before a submission, before the data is
prepared): a tracker that cannot start (no W&B credentials, an MLflow URI it cannot use) is one
paragraph naming the setting to fix. The packages are optional extras
(``pip install "launch-encoders[wandb,mlflow]"``) imported only when a run asks for them.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launcher.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKERS_JSON = "trackers.json"  # the W&B and MLflow run ids of RUN
OFFLINE_MODES = ("offline", "dryrun", "disabled")


def check_names(names: tuple[str, ...]) -> None:
    """``train.trackers`` lists known trackers, each once (a ``ValueError`` as the config's other checks)."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"train.trackers must list each of {', '.join(TRACKERS)} at most once, got {list(names)}")


def mlflow_uri(train: Any, run_dir: Path) -> str:
    """Where MLflow runs go: ``train.mlflow_uri``, else $MLFLOW_TRACKING_URI, else a file store
    ``mlruns`` beside the run directory (runs of one runs folder share it, to be compared)."""
    uri = train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or (Path(run_dir).resolve().parent / "mlruns").as_uri()


def _file_store(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(uri) if parsed.scheme == "" else None


def check_trackers(train: Any, run_dir: Path) -> None:
    """Raise a ``ConfigError`` naming the setting to fix when one of ``train.trackers`` cannot start."""
    if "wandb" in train.trackers:
        _check_wandb()
    if "mlflow" in train.trackers:
        _check_mlflow(mlflow_uri(train, run_dir))


def _missing_package(name: str, extra: str) -> ConfigError:
    return ConfigError(
        f"train.trackers lists {extra} but the {name} package is not installed: install it "
        f'(pip install "launch-encoders[{extra}]"), or remove {extra} from train.trackers'
    )


def _check_wandb() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise _missing_package("wandb", "wandb") from None
    if os.environ.get("WANDB_MODE", "online") in OFFLINE_MODES or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host):
            return
    except (netrc.NetrcParseError, OSError):
        pass
    raise ConfigError(
        f"train.trackers lists wandb, but there are no W&B credentials for {host} on this machine "
        f"(no WANDB_API_KEY, no entry in {path}). Run `wandb login` or set WANDB_API_KEY; or set "
        f"WANDB_MODE=offline to log into the run directory and `wandb sync` it later; or remove wandb "
        f"from train.trackers."
    )


def _check_mlflow(uri: str) -> None:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise _missing_package("mlflow-skinny", "mlflow") from None
    store = _file_store(uri)
    if store is not None:
        parent = next((p for p in (store, *store.parents) if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(
                f"the MLflow file store {uri} cannot be written ({parent} is not a writable directory): set "
                f"train.mlflow_uri (or MLFLOW_TRACKING_URI) to a folder you can write, or an MLflow server's URL"
            )
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # mlflow raises its own and requests' errors for an unusable URI
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"MLflow cannot use the tracking URI {uri} ({type(e).__name__}: {first[:300]}). Set train.mlflow_uri "
            f"(or MLFLOW_TRACKING_URI) to a reachable MLflow server or a file store folder (file:///PATH), "
            f"or remove mlflow from train.trackers."
        ) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: MLflow's parameters are flat."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_ids(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / TRACKERS_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_ids(run_dir: Path, ids: dict[str, Any]) -> None:
    tmp = Path(run_dir) / f".{TRACKERS_JSON}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, Path(run_dir) / TRACKERS_JSON)


class TensorBoard:
    def __init__(self, run_dir: Path, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandB:
    """A W&B run whose id is kept in RUN/trackers.json; its files go to RUN/wandb/."""

    def __init__(self, run_dir: Path, config: dict[str, Any], train: Any, ids: dict[str, Any]) -> None:
        import wandb

        run_id = ids.get("wandb", {}).get("id") or secrets.token_hex(6)  # W&B ids: lowercase letters, digits
        try:
            self.run = wandb.init(
                project=train.wandb_project,
                entity=train.wandb_entity,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # wandb's own errors: an unreachable host, a refused key, a bad entity
            raise ConfigError(
                f"W&B could not start a run ({type(e).__name__}: {str(e).strip()[:300]}): check your W&B login "
                f"(`wandb login`, WANDB_API_KEY), train.wandb_project and train.wandb_entity, or set "
                f"WANDB_MODE=offline, or remove wandb from train.trackers."
            ) from None
        ids["wandb"] = {"id": run_id, "project": train.wandb_project, "mode": self.run.settings.mode}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class MLflow:
    """An MLflow run (MlflowClient, no global state) whose id is kept in RUN/trackers.json."""

    def __init__(self, run_dir: Path, config: dict[str, Any], train: Any, ids: dict[str, Any]) -> None:
        uri = mlflow_uri(train, run_dir)
        if _file_store(uri) is not None:
            # MLflow 3 keeps its file store only on request; it is the one store that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        known = ids.get("mlflow", {})
        if known.get("run_id") and known.get("uri") == uri:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(train.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(train.mlflow_experiment)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        ids["mlflow"] = {"run_id": self.run_id, "uri": uri, "experiment": train.mlflow_experiment}

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key.replace("/", "."), float(v), stamp, step) for key, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class Trackers:
    """The trackers of one run, opened by rank 0 when training starts (``open_trackers``)."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    def log_train(self, record: dict[str, float], step: int) -> None:
        self._log({f"train/{k}": v for k, v in record.items() if k not in ("step", "epoch")}, step)

    def log_eval(self, record: dict[str, float], step: int) -> None:
        self._log({f"eval/{k}": v for k, v in record.items() if k not in ("step", "epoch", "seconds")}, step)

    def _log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def close(self, finished: bool) -> None:
        for tracker in self.trackers:
            try:
                tracker.close(finished)
            except Exception as e:  # closing must not hide the error that ended the run, if any
                log.warning("closing %s failed: %s", type(tracker).__name__, e)


def open_trackers(run_dir: Path, config: dict[str, Any], train: Any, step: int) -> Trackers:
    """Start (or continue, from RUN/trackers.json) every tracker of ``train.trackers``."""
    run_dir = Path(run_dir)
    check_trackers(train, run_dir)
    ids = read_ids(run_dir)
    opened: list[Any] = []
    try:
        for name in train.trackers:
            if name == "tensorboard":
                opened.append(TensorBoard(run_dir, step))
            elif name == "wandb":
                opened.append(WandB(run_dir, config, train, ids))
            else:
                opened.append(MLflow(run_dir, config, train, ids))
    except BaseException:
        Trackers(opened).close(finished=False)
        raise
    if ids:
        _write_ids(run_dir, ids)
    return Trackers(opened)
