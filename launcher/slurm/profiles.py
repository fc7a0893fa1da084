"""Cluster profiles (``slurm/clusters/NAME.yaml``) and the resources one job asks for.

A profile says where and how jobs of one cluster run: partition, account, resources per
node, time limit, signal delay, setup lines, and a runs directory every node shares. The
command line's ``--nodes``, ``--gpus-per-node``, ``--partition`` and ``--time`` override it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.config import REPO_ROOT, build_dataclass, load_yaml, yaml_problem
from launcher.errors import ConfigError, RunDirError, UserError

CLUSTERS_DIR = REPO_ROOT / "slurm" / "clusters"
# Scratch folders that are local to each machine: submitit jobs fail silently there.
LOCAL_ONLY_DIRS = (Path("/tmp"), Path("/dev/shm"))


class SlurmError(UserError):
    """A cluster profile, flag or cluster state that stops a submission."""


# ----------------------------------------------------------------------------- profiles


@dataclass
class ClusterProfile:
    """One ``slurm/clusters/NAME.yaml``: where and how jobs of this cluster run."""

    partition: str
    runs_dir: str  # on a filesystem every node shares
    max_nodes: int
    time_min: int
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    constraint: str | None = None
    signal_delay_s: int = 90
    setup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("max_nodes", "time_min", "cpus_per_task"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or self.signal_delay_s < 0 or (self.mem_gb is not None and self.mem_gb <= 0):
            raise ValueError("gpus_per_node and signal_delay_s must be >= 0 and mem_gb > 0")
        if not Path(self.runs_dir).is_absolute():
            raise ValueError(f"runs_dir must be an absolute path on a shared filesystem, got {self.runs_dir!r}")
        check_shared(Path(self.runs_dir), "runs_dir")


def check_shared(path: Path, what: str) -> None:
    """Refuse node-local scratch folders: the job's files must be visible from every node."""
    resolved = Path(os.path.abspath(path))
    for local in LOCAL_ONLY_DIRS:
        if resolved == local or local in resolved.parents:
            raise RunDirError(
                f"{what} {path} is under {local}, which is local to each machine: SLURM jobs would "
                f"fail silently there. Use a directory on a filesystem all nodes share "
                f"(e.g. /var/tmp on the local test cluster, your cluster's scratch otherwise)."
            )


def profile_names() -> list[str]:
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    """Load ``slurm/clusters/NAME.yaml``; unknown names and keys are ConfigErrors."""
    path = CLUSTERS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown cluster profile {name!r}; known profiles: "
            f"{', '.join(profile_names()) or 'none'} (files in {CLUSTERS_DIR})"
        )
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster profile {path} is not valid YAML: {yaml_problem(e)}") from None
    try:
        return build_dataclass(ClusterProfile, raw, f"cluster profile {name}")
    except RunDirError as e:
        raise ConfigError(f"cluster profile {path}: {e}") from None


@dataclass
class Resources:
    """What one job asks for: the profile with the command line's overrides applied."""

    cluster: str
    nodes: int
    gpus_per_node: int
    partition: str
    time_min: int

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)


def resolve_resources(
    cluster: str,
    profile: ClusterProfile,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    partition: str | None = None,
    time_min: int | None = None,
) -> Resources:
    res = Resources(
        cluster=cluster,
        nodes=1 if nodes is None else nodes,
        gpus_per_node=profile.gpus_per_node if gpus_per_node is None else gpus_per_node,
        partition=partition or profile.partition,
        time_min=profile.time_min if time_min is None else time_min,
    )
    if res.nodes <= 0 or res.gpus_per_node < 0 or res.time_min <= 0:
        raise ConfigError("--nodes and --time must be positive and --gpus-per-node >= 0")
    if res.nodes > profile.max_nodes:
        raise ConfigError(
            f"--nodes {res.nodes} is more than cluster profile {cluster!r} allows "
            f"(max_nodes: {profile.max_nodes}); ask for fewer nodes"
        )
    return res


def parse_time(text: str) -> int:
    """``--time`` in minutes: ``90``, ``1:30:00`` (h:m:s) or ``2-00:00:00`` (days)."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:
            minutes = parts[0] * 60 + parts[1]
        else:
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
        return minutes + int(days or 0) * 24 * 60
    except ValueError:
        raise ConfigError(f"--time {text!r} is not minutes, H:MM:SS or D-HH:MM:SS") from None
