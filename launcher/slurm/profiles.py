"""Cluster profiles and the resources one job asks for.

A profile says where and how jobs of one cluster run: partition, account, resources per
node, time limit, signal delay, setup lines, and a runs directory every node shares. The
command line's ``--nodes``, ``--gpus-per-node``, ``--partition`` and ``--time`` override it.

``--cluster NAME`` is looked up in ``$LAUNCH_CLUSTERS`` (a directory), then
``~/.config/launch/clusters/``, then the profiles this project ships (``slurm/clusters/``);
``--cluster PATH.yaml`` is that file. ``launch cluster init NAME`` writes one into the first
of the user directories from what SLURM itself reports (``discover.py``).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher.config import build_dataclass, field_comments, load_yaml, to_dict, yaml_problem
from launcher.errors import ConfigError, RunDirError, UserError

# Scratch folders that are local to each machine: submitit jobs fail silently there.
LOCAL_ONLY_DIRS = (Path("/tmp"), Path("/dev/shm"))


class SlurmError(UserError):
    """A cluster profile, flag or cluster state that stops a submission."""


# ----------------------------------------------------------------------------- profiles


@dataclass
class ClusterProfile:
    """One cluster profile (``NAME.yaml``): where and how jobs of this cluster run.

    The comment of each field is the key's documentation: ``launch cluster init`` writes it above
    the key, and slurm/README.md's table of keys is ``profile_reference()``, checked by a test.
    """

    # the partition jobs go to (`--partition` overrides it)
    partition: str
    # where runs go, an absolute path on a filesystem every node shares (under /tmp or /dev/shm is refused)
    runs_dir: str
    # the most nodes one job may ask for (`--nodes` beyond it is refused)
    max_nodes: int
    # the job's time limit in minutes (`--time` overrides it)
    time_min: int
    # the account jobs are charged to (sbatch `--account`); null: the user's default
    account: str | None = None
    # the quality of service (sbatch `--qos`); null: the partition's default
    qos: str | None = None
    # GPUs per node, one task each (`--gpus-per-node` overrides it); 0: one task per node, on CPUs
    gpus_per_node: int = 0
    # CPUs of each task (sbatch `--cpus-per-task`), data loader workers included
    cpus_per_task: int = 1
    # memory per node in GB (sbatch `--mem`); null: the partition's default
    mem_gb: float | None = None
    # node features the job needs (sbatch `--constraint`, e.g. a100); null: any node
    constraint: str | None = None
    # seconds before the time limit SLURM sends USR2, so that every rank checkpoints and the job requeues
    signal_delay_s: int = 90
    # shell lines the sbatch script runs before srun (e.g. `module load cuda`, activating an environment)
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


YAML_TYPES = {"str": "string", "int": "integer", "float": "number", "tuple[str, ...]": "list of strings"}


def profile_reference() -> str:
    """The Markdown table of every profile key: type, default and meaning, from ``ClusterProfile`` itself."""
    comments = field_comments(ClusterProfile)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(ClusterProfile):
        default = "required"
        if f.default is not dataclasses.MISSING:  # as it reads in YAML: null, [], 90
            value = list(f.default) if isinstance(f.default, tuple) else f.default
            default = f"`{yaml.safe_dump({f.name: value}).strip().split(': ', 1)[1]}`"
        kind, optional = f.type.removesuffix(" | None"), f.type.endswith(" | None")
        kind = YAML_TYPES[kind] + (" or null" if optional else "")
        rows.append(f"| `{f.name}` | {kind} | {default} | {comments[f.name]} |")
    return "\n".join(rows) + "\n"


def commented_profile(profile: ClusterProfile) -> str:
    """``profile`` as YAML, each key under its meaning (the field's comment), so the file explains itself."""
    comments = field_comments(ClusterProfile)
    return "".join(f"# {comments[key]}\n{yaml.safe_dump({key: value})}" for key, value in to_dict(profile).items())


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


def home_dir() -> Path | None:
    """What ``~`` is: ``$HOME``, else this user's entry in the password database; None without an absolute one.

    An empty or relative ``HOME`` would put profiles under the working directory (and ``~/x`` at ``/x``).
    """
    home = os.environ.get("HOME")
    if home is None:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            return None
    return Path(home) if os.path.isabs(home) else None


def no_home(fix: str) -> ConfigError:
    """The error for a default under ``~`` when ``home_dir()`` is None; ``fix`` says what to pass instead."""
    home = os.environ.get("HOME")
    state = (
        "unset, and this user has none in the password database" if home is None else f"{home!r}, not an absolute path"
    )
    return ConfigError(f"no home directory: HOME is {state}. Set HOME to your home folder, or {fix}")


PROFILES_UNDER_HOME = Path(".config") / "launch" / "clusters"


def user_profile_dir() -> Path:
    """Where profiles of one's own go: ``$LAUNCH_CLUSTERS``, else ``~/.config/launch/clusters``."""
    if os.environ.get("LAUNCH_CLUSTERS"):
        return Path(os.environ["LAUNCH_CLUSTERS"])
    home = home_dir()
    if home is None:
        raise no_home("set LAUNCH_CLUSTERS to a folder for your cluster profiles")
    return home / PROFILES_UNDER_HOME


def profile_path_to_write(name: str) -> Path:
    """Where ``launch cluster init NAME`` writes; a bad name or a folder this user cannot write is refused
    before SLURM is asked anything."""
    check_profile_name(name)
    path = user_profile_dir() / f"{name}.yaml"
    nearest = next(p for p in path.parents if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        why = "is not writable by this user" if nearest.is_dir() else "is a file, not a folder"
        raise ConfigError(
            f"cannot write the profile {path}: {nearest} {why}. Set LAUNCH_CLUSTERS to a folder you can write "
            f"(profiles there are found first) and run `launch cluster init {name}` again"
        )
    return path


def check_profile_name(name: str) -> None:
    """A name ``launch cluster init`` may write: one file in the profile folder that ``--cluster NAME`` finds."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith((".yaml", ".yml")):
        raise ConfigError(
            f"cluster profile name {name!r} must be letters, digits, '.', '_' and '-', starting with a letter "
            f"or digit and without .yaml: it names {user_profile_dir()}/NAME.yaml, which --cluster NAME finds"
        )


def profile_dirs() -> list[Path]:
    """Where ``--cluster NAME`` is looked up, in order: the user's directories, then the shipped profiles."""
    from launcher.shipped import clusters_dir

    dirs = [Path(os.environ["LAUNCH_CLUSTERS"])] if os.environ.get("LAUNCH_CLUSTERS") else []
    home = home_dir()  # without one, only $LAUNCH_CLUSTERS and the shipped profiles
    return [*dirs, *([home / PROFILES_UNDER_HOME] if home is not None else []), clusters_dir()]


def profile_names(user_only: bool = False) -> list[str]:
    """Every profile name found (the first directory that has a name wins), sorted."""
    dirs = profile_dirs()[:-1] if user_only else profile_dirs()
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def find_profile(name: str) -> Path:
    """The file of profile ``name``, or ``name`` itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"cluster profile file {path} does not exist")
        return path
    for directory in profile_dirs():
        if (directory / f"{name}.yaml").is_file():
            return directory / f"{name}.yaml"
    looked = ", ".join(str(d) for d in profile_dirs())
    raise ConfigError(
        f"unknown cluster profile {name!r}; looked in {looked} (in that order); known profiles: "
        f"{', '.join(profile_names()) or 'none'}. Write one with `launch cluster init {name}` on the cluster's "
        f"login node, or pass --cluster PATH.yaml"
    )


def load_profile(name: str) -> ClusterProfile:
    """Load profile ``name`` (or a path); an unknown name, malformed YAML or a bad key is a ConfigError."""
    return parse_profile(find_profile(name))


def parse_profile(path: Path) -> ClusterProfile:
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"cluster profile {path} is not valid YAML: {yaml_problem(e)}") from None
    if raw is None:
        raise ConfigError(
            f"cluster profile {path} is empty: it needs at least partition, runs_dir, max_nodes and time_min "
            f"(`launch cluster init NAME` on the cluster's login node writes one)"
        )
    try:
        return build_dataclass(ClusterProfile, raw, "")
    except (ConfigError, RunDirError) as e:
        raise ConfigError(f"cluster profile {path}: {e}") from None


def profile_name(name: str) -> str:
    """How a profile is named in records and messages: its name, or a file's stem."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) or "/" in name else name


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


def write_profile(path: Path, text: str, name: str) -> None:
    """Write a profile whole (a reader never sees half of it), or say where a writable one can go."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write the profile {path} ({e.strerror}); set LAUNCH_CLUSTERS to a folder you can "
            f"write and run `launch cluster init {name}` again"
        ) from None
