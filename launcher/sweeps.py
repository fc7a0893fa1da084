"""``launch sweep pretrain METHOD --grid KEY=V1,V2 ...``: a grid of pretraining runs in one sweep directory.

The grid is the cartesian product of the ``--grid`` value lists, each point a set of overrides on
top of the experiment and the command's own ``KEY=VALUE`` overrides. ``SWEEP/grid.yaml`` records
what the sweep is; each point is an ordinary run directory ``SWEEP/points/NAME`` (config.yaml,
checkpoints, metrics), so everything that works on a run works on a point. On SLURM the points
that have not finished are submitted as one job array (``launcher/slurm/submit.py``,
``SweepArrayWork``), each task a normal multi-node run; ``--local`` trains them here one after
another. Running the same command again resumes the unfinished points and leaves finished ones be.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import parse_override, read_yaml
from launcher.errors import ConfigError, RunDirError
from launcher.slurm.records import GRID_FILE

POINTS = "points"
MAX_POINTS = 64


def parse_grid(specs: list[str], max_points: int) -> dict[str, list[Any]]:
    """``["optim.blr=1e-4,3e-4", "method.mask_ratio=0.75,0.9"]`` -> ``{key: [values]}``, checked."""
    if not specs:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2 (e.g. --grid optim.blr=1e-4,3e-4)")
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        parse_override(f"{key}=0")  # the same rules for the key as an override's
        items = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in items):
            raise ConfigError(
                f"--grid {spec!r} has an empty value list or an empty value; give KEY=V1,V2,... "
                f"(e.g. --grid {key}=1e-4,3e-4)"
            )
        if key in grid:
            raise ConfigError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2")
        grid[key] = [parse_override(f"{key}={v}")[1] for v in items]
    count = 1
    for values in grid.values():
        count *= len(values)
    if count > max_points:
        raise ConfigError(
            f"the grid has {count} points ({' x '.join(str(len(v)) for v in grid.values())}), more than "
            f"--max-points {max_points}; drop some values, or raise --max-points if you mean it"
        )
    return grid


def format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class Sweep:
    """What a sweep is: a method, an experiment, common overrides and a grid (``SWEEP/grid.yaml``)."""

    method: str
    experiment: str
    overrides: list[str]
    grid: dict[str, list[Any]]

    def record(self) -> dict[str, Any]:
        return {"method": self.method, "experiment": self.experiment, "overrides": self.overrides, "grid": self.grid}

    def default_name(self) -> str:
        """The same command names the same directory, so running it again resumes the sweep."""
        digest = hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:8]
        return f"sweep-{self.method}-{Path(self.experiment).stem}-{digest}"

    def points(self) -> list[tuple[str, list[str]]]:
        """(name, overrides) of every point, in the grid's order."""
        keys = list(self.grid)
        out = []
        for k, values in enumerate(itertools.product(*self.grid.values())):
            settings = [f"{key}={format_value(v)}" for key, v in zip(keys, values)]
            label = "_".join(f"{key.rsplit('.', 1)[-1]}={format_value(v)}" for key, v in zip(keys, values))
            out.append((f"{k:02d}_{label}".replace("/", "-").replace(" ", ""), settings))
        return out

    def configs(self) -> list[tuple[str, Any]]:
        """(name, ExperimentConfig) of every point; a bad key or value is a ``ConfigError`` naming it."""
        from launcher.experiment import load_experiment

        return [
            (name, load_experiment(Path(self.experiment), [*self.overrides, *settings], method=self.method))
            for name, settings in self.points()
        ]

    def check_directory(self, directory: Path) -> bool:
        """Whether ``directory`` holds this sweep already; raise if it holds something else."""
        path = Path(directory) / GRID_FILE
        if path.is_file():
            if read_yaml(path) != json.loads(json.dumps(self.record())):
                raise RunDirError(
                    f"sweep directory {directory} belongs to another sweep (its {GRID_FILE}: "
                    f"{json.dumps(read_yaml(path))}). Nothing was changed. Run that sweep's command to resume it, "
                    f"or pass another --sweep-dir."
                )
            return True
        if Path(directory).exists() and (not Path(directory).is_dir() or any(Path(directory).iterdir())):
            raise RunDirError(
                f"{directory} exists and is not a sweep directory (no {GRID_FILE}); pass another --sweep-dir"
            )
        return False

    def write(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tmp = Path(directory) / f".{GRID_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.record(), indent=2) + "\n")  # JSON is YAML
        os.replace(tmp, Path(directory) / GRID_FILE)


def point_dir(directory: Path, name: str) -> Path:
    return Path(directory) / POINTS / name


def load_sweep(directory: Path) -> Sweep:
    path = Path(directory) / GRID_FILE
    if not path.is_file():
        raise RunDirError(f"{directory} is not a sweep directory (no {GRID_FILE})")
    return Sweep(**read_yaml(path))


def is_sweep(directory: Path) -> bool:
    return (Path(directory) / GRID_FILE).is_file()


def finished(run_dir: Path) -> bool:
    """Whether a run (local or SLURM) has recorded an attempt that trained to the end."""
    from launcher.slurm.records import LAUNCH_JSON, LOCAL_JSON

    ended = {LAUNCH_JSON: lambda a: a.get("outcome") == "finished", LOCAL_JSON: lambda a: a.get("finished")}
    for name, done in ended.items():
        path = Path(run_dir) / name
        if path.is_file():
            try:
                if any(done(a) for a in json.loads(path.read_text()).get("attempts", [])):
                    return True
            except ValueError:
                continue
    return False


@dataclass
class Plan:
    """A sweep checked against its directory: every point's config, and those still to train."""

    sweep: Sweep
    directory: Path
    resuming: bool
    configs: list[tuple[str, Any]]
    pending: list[str]

    def describe(self) -> str:
        done = len(self.configs) - len(self.pending)
        shape = " x ".join(f"{k} {len(v)}" for k, v in self.sweep.grid.items())
        lines = [
            f"# sweep of {len(self.configs)} point(s) ({shape}) from {self.sweep.experiment}",
            f"# sweep directory: {self.directory}{' (exists: resumes)' if self.resuming else ''}; "
            f"{done} finished, {len(self.pending)} to train",
        ]
        lines += [f"#   {name}{'' if name in self.pending else '  (finished)'}" for name, _ in self.configs]
        return "\n".join(lines) + "\n"


def plan(sweep: Sweep, directory: Path) -> Plan:
    """Check the sweep (keys, values, every point's run directory) before anything is written."""
    from launcher.runs import check_run_dir

    directory = Path(directory)
    resuming = sweep.check_directory(directory)
    configs = sweep.configs()
    pending = []
    for name, cfg in configs:
        run_dir = point_dir(directory, name)
        check_run_dir(run_dir, cfg)
        if not finished(run_dir):
            pending.append(name)
    return Plan(sweep, directory, resuming, configs, pending)


def run_locally(p: Plan, out: Any) -> int:
    """Train the unfinished points one after another; a stop signal ends the sweep after its checkpoint."""
    from launcher.local import run_training

    if not p.pending:
        out.write(f"all {len(p.configs)} points of {p.directory} have finished; nothing to train\n")
        return 0
    p.sweep.write(p.directory)
    for name, cfg in p.configs:
        if name not in p.pending:
            continue
        run_dir = point_dir(p.directory, name)
        out.write(f"point {name}: {run_dir}\n")
        out.flush()
        _, result = run_training(cfg, run_dir)
        if not result.finished:
            out.write(
                f"stopped at step {result.step}/{result.total_steps} of point {name}; run the same command to "
                f"resume the sweep\n"
            )
            return 0
    out.write(f"all {len(p.configs)} points finished; `launch status {p.directory}`, `launch report {p.directory}`\n")
    return 0


# ----------------------------------------------------------------------------- status, report


def point_rows(directory: Path) -> list[dict[str, Any]]:
    """One row per point: its grid values, state, step, loss, last evaluation and cost."""
    from launcher.runs import read_eval, read_metrics
    from launcher.slurm.control import run_status
    from launcher.slurm.records import LAUNCH_JSON, LOCAL_JSON

    sweep = load_sweep(directory)
    rows = []
    for (name, _), values in zip(sweep.points(), itertools.product(*sweep.grid.values())):
        run_dir = point_dir(directory, name)
        row: dict[str, Any] = {"point": name, "run_dir": str(run_dir), **dict(zip(sweep.grid, values))}
        if (run_dir / LAUNCH_JSON).is_file() or (run_dir / LOCAL_JSON).is_file():
            status = run_status(run_dir)
            row.update(state=status["state"], cost=status["cost"])
        else:
            row.update(state="NOT STARTED", cost=None)
        if finished(run_dir):
            row["state"] = "FINISHED" if row["state"] in ("UNKNOWN", "COMPLETED") else row["state"]
        metrics = read_metrics(run_dir) if run_dir.is_dir() else []
        row["step"] = metrics[-1]["step"] if metrics else None
        row["loss"] = metrics[-1].get("loss") if metrics else None
        row["eval"] = read_eval(run_dir) if run_dir.is_dir() else None
        rows.append(row)
    return rows


def _eval_text(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    shown = {k: v for k, v in record.items() if k not in ("step", "epoch", "seconds", "samples")}
    return ", ".join(f"{k} {v:.4g}" for k, v in list(shown.items())[:3])


def _cost_text(cost: dict[str, Any] | None) -> str:
    if not cost or not cost.get("attempts"):
        return "-"
    return f"{cost['wall_seconds'] / 3600:.3f} h, {cost['cpu_hours']:.3f} CPU-h, {cost['gpu_hours']:.3f} GPU-h"


def table(directory: Path) -> str:
    """The points as a Markdown table (``launch status SWEEP`` and ``launch report SWEEP``)."""
    sweep = load_sweep(directory)
    rows = point_rows(directory)
    head = ["point", *sweep.grid, "state", "step", "loss", "last eval", "cost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["point"],
            *(format_value(row[k]) for k in sweep.grid),
            row["state"],
            "-" if row["step"] is None else str(row["step"]),
            "-" if row["loss"] is None else f"{row['loss']:.4f}",
            _eval_text(row["eval"]),
            _cost_text(row["cost"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(directory: Path) -> str:
    """One line for a sweep among runs (``launch status``): how many points are in which state."""
    counts: dict[str, int] = {}
    for row in point_rows(directory):
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in counts.items())
    return f"{directory}: sweep of {sum(counts.values())} point(s): {states} (`launch status {directory}`: the table)"


def write_report(directory: Path) -> Path:
    """``SWEEP/report.md``: the grid and the points' table."""
    sweep = load_sweep(directory)
    text = (
        f"# Sweep {Path(directory).name}\n\n`launch sweep pretrain {sweep.method}` from {sweep.experiment}, "
        f"overrides {' '.join(sweep.overrides) or '(none)'}\n\n{table(directory)}"
    )
    path = Path(directory) / "report.md"
    tmp = path.with_name(f".report.md.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
