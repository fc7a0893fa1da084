"""Run directories: the resolved config, logs and metrics of one run.

``RUN/config.yaml`` is the resolved experiment; ``RUN/metrics.jsonl`` one JSON line per
logged step; ``RUN/eval.json`` the newest evaluation (``RUN/eval.jsonl`` all of them);
``RUN/tb/`` TensorBoard events; ``RUN/logs/rank_K.log`` every rank's log;
``RUN/checkpoints/`` see ``checkpoint.py``. A run directory belongs to one config:
starting the same config in it again resumes; a different config is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from launcher.config import dump_yaml, to_dict
from launcher.errors import RunDirError

if TYPE_CHECKING:
    from launcher.experiment import ExperimentConfig

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
EVAL_HISTORY = "eval.jsonl"


def default_run_dir(command: str, experiment: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{command}-{experiment}-{stamp}"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_run_dir(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``run_dir`` already holds this config (a resume); raise if it holds another."""
    existing = run_dir / CONFIG
    if existing.is_file():
        old = yaml.safe_load(existing.read_text())
        diffs = _differences(old, to_dict(cfg))
        if diffs:
            raise RunDirError(
                f"run directory {run_dir} belongs to a different config ({'; '.join(diffs[:5])}"
                f"{'; ...' if len(diffs) > 5 else ''}). Nothing was changed. To resume it, run the "
                f"same config; to start a new run, pass another --run-dir."
            )
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"run directory {run_dir} exists, is not empty and has no {CONFIG}: it is not a run "
            f"of this tool. Pass another --run-dir."
        )
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RunDirError(
            f"cannot write the run directory {run_dir}: {parent} is not writable. Pass a --run-dir you can write to."
        )
    return False


def write_config(run_dir: Path, cfg: ExperimentConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{CONFIG}.tmp"
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, run_dir / CONFIG)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Rank 0 logs INFO to the console; every rank logs to ``RUN/logs/rank_K.log``."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank_{rank}.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._launcher = True  # type: ignore[attr-defined]
        root.addHandler(handler)


class MetricsLog:
    """Appends one JSON line per logged step; on resume drops lines past the checkpoint."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / METRICS
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_eval(run_dir: Path, record: dict[str, Any]) -> None:
    """Record an evaluation: ``eval.json`` (replaced atomically) and a line of ``eval.jsonl``."""
    tmp = run_dir / f".{EVAL}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, run_dir / EVAL)
    with open(run_dir / EVAL_HISTORY, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / EVAL
    return json.loads(path.read_text()) if path.is_file() else None


def describe_eval(record: dict[str, Any] | None) -> str:
    """One line for an evaluation record (``read_eval``)."""
    if record is None:
        return "no evaluation recorded"
    shown = {k: v for k, v in record.items() if k not in ("step", "epoch", "seconds")}
    return f"evaluation at step {record['step']} ({record['seconds']:.1f} s): " + ", ".join(
        f"{k} {v:.4g}" for k, v in shown.items()
    )


def last_evaluated_step(run_dir: Path) -> int | None:
    record = read_eval(run_dir)
    return None if record is None else record["step"]
