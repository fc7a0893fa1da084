"""What the package ships beside its code: experiment files and cluster profiles (package data).

They live at the top of the repository (``experiments/``, ``slurm/clusters/``) and are installed
as the packages ``launcher.experiments`` and ``launcher.clusters``, so they are found the same way
from a wheel, an editable install and any working directory: through ``importlib.resources``.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

from launcher.errors import ConfigError


@cache
def experiments_dir() -> Path:
    return Path(str(files("launcher.experiments")))


@cache
def clusters_dir() -> Path:
    return Path(str(files("launcher.clusters")))


def experiment_names() -> list[str]:
    """Every shipped experiment by name (``pretrain/pcae_local``), sorted."""
    root = experiments_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def shipped_experiment(name: str) -> Path:
    """The shipped experiment ``name`` (``pretrain/pcae_local``, with or without ``.yaml``)."""
    return experiments_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")


def experiment_label(path: Path) -> str:
    """How to name an experiment file to the user: its shipped name, or its path."""
    root = experiments_dir()
    return str(path.relative_to(root).with_suffix("")) if root in Path(path).parents else str(path)


def find_experiment(name_or_path: str | Path) -> Path:
    """A path as typed (relative to the working directory), else a shipped experiment of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_experiment(str(name_or_path))
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"experiment {name_or_path} is neither a file (relative to {Path.cwd()}) nor a shipped experiment; "
        f"`launch experiments` lists the shipped ones, e.g. pretrain/pcae_vit_base"
    )
