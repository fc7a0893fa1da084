"""Describe the SLURM cluster this machine sees: what ``launch cluster init`` writes as a profile.

Everything comes from SLURM itself (``sinfo``, ``scontrol show partition``, ``scontrol show
node``): partition names, the default partition, each partition's nodes and time limit, the
CPUs, memory and GPUs (GRES) of its nodes, and the partitions whose jobs preempt it. Nothing
here assumes a node or partition name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import ConfigError
from launcher.slurm.profiles import ClusterProfile, SlurmError, commented_profile, home_dir, no_home

UNLIMITED_MIN = 24 * 60  # the default --time of a partition without a time limit


@dataclass
class Partition:
    name: str
    nodes: list[str]
    default: bool
    max_time_min: int | None  # None: no limit
    priority_tier: int = 1
    preempt_mode: str = "OFF"


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass
class ClusterDescription:
    partitions: dict[str, Partition]
    nodes: dict[str, Node]
    name: str = ""
    preemptors: dict[str, list[str]] = field(default_factory=dict)  # partition -> those that preempt it

    @property
    def default_partition(self) -> Partition:
        return next((p for p in self.partitions.values() if p.default), next(iter(self.partitions.values())))

    def nodes_of(self, partition: str) -> list[Node]:
        return [self.nodes[n] for n in self.partitions[partition].nodes if n in self.nodes]


def run(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        raise SlurmError(
            f"no `{command[0]}` on PATH: this machine does not see a SLURM cluster. Run this on the "
            f"cluster's login node (or start the local test cluster: `bash slurm/local-cluster.sh up`), "
            f"or run on this machine with --local"
        )
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(command)}` did not answer in 30 s: is the SLURM controller up?") from None
    if out.returncode != 0:
        raise SlurmError(
            f"`{' '.join(command)}` failed ({out.stderr.strip() or out.returncode}): is the SLURM controller up?"
        )
    return out.stdout


def slurm_answers() -> bool:
    """Whether a SLURM controller answers here (``sinfo`` on PATH and working)."""
    try:
        run(["sinfo", "-h", "-o", "%P"])
        return True
    except SlurmError:
        return False


def parse_records(text: str) -> list[dict[str, str]]:
    """``scontrol show ... -o`` lines: one ``key=value key=value`` record per line."""
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(dict(re.findall(r"(\S+?)=(\S*)", line)))
    return records


def parse_minutes(text: str) -> int | None:
    """A SLURM time (``UNLIMITED``, ``30``, ``1:00:00``, ``2-00:00:00``) in minutes; None for no limit."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 24 * 60 + hours * 60 + minutes + (1 if seconds else 0)


def gpus_in(gres: str) -> int:
    """GPUs in a node's GRES string (``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def expand_nodes(expression: str) -> list[str]:
    """Node names of a SLURM host list (``node[1-4],gpu7``), as ``scontrol show hostnames`` gives them."""
    if not expression or expression == "(null)":
        return []
    return run(["scontrol", "show", "hostnames", expression]).split()


def describe_cluster() -> ClusterDescription:
    """What SLURM reports about its partitions and nodes."""
    partitions = {}
    for record in parse_records(run(["scontrol", "show", "partition", "-o"])):
        if record.get("State", "UP") not in ("UP",):
            continue
        name = record["PartitionName"]
        partitions[name] = Partition(
            name=name,
            nodes=expand_nodes(record.get("Nodes", "")),
            default=record.get("Default") == "YES",
            max_time_min=parse_minutes(record.get("MaxTime", "UNLIMITED")),
            priority_tier=int(record.get("PriorityTier", "1") or 1),
            preempt_mode=record.get("PreemptMode", "OFF"),
        )
    if not partitions:
        raise SlurmError("SLURM reports no partition that is up; ask the cluster's administrators")
    nodes = {}
    for record in parse_records(run(["scontrol", "show", "node", "-o"])):
        name = record.get("NodeName")
        if name:
            nodes[name] = Node(
                name,
                int(record.get("CPUTot", "1") or 1),
                int(record.get("RealMemory", "0") or 0),
                gpus_in(record.get("Gres", "")),
            )
    config = run(["scontrol", "show", "config"])
    cluster = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M)
    description = ClusterDescription(partitions, nodes, cluster.group(1) if cluster else "")
    for name, partition in partitions.items():
        # A partition whose jobs preempt this one's: a higher priority tier over shared nodes,
        # on a cluster that preempts by partition priority.
        description.preemptors[name] = sorted(
            other.name
            for other in partitions.values()
            if other.priority_tier > partition.priority_tier
            and set(other.nodes) & set(partition.nodes)
            and partition.preempt_mode.upper() not in ("OFF", "")
        )
    return description


def default_runs_dir() -> Path:
    """``~/launch-runs``: the home folder is shared by every node on nearly every cluster."""
    home = home_dir()
    if home is None:
        raise no_home("name a folder for the runs, on a filesystem every node shares: --runs-dir DIR")
    return home / "launch-runs"


def profile_from(
    description: ClusterDescription, partition: str | None = None, runs_dir: str | None = None
) -> ClusterProfile:
    """A profile for jobs of ``partition`` (default: the cluster's default partition).

    One task per GPU, each with its share of the node's CPUs; on a CPU partition one task per
    node with all of its CPUs. The smallest node of the partition sets what a task can ask for.
    """
    if partition is not None and partition not in description.partitions:
        raise SlurmError(
            f"partition {partition!r} does not exist on this cluster; partitions: {', '.join(description.partitions)}"
        )
    chosen = description.partitions[partition] if partition else description.default_partition
    nodes = description.nodes_of(chosen.name)
    if not nodes:
        raise SlurmError(f"partition {chosen.name!r} has no nodes SLURM reports; pass --partition")
    gpus = min(n.gpus for n in nodes)
    cpus = min(n.cpus for n in nodes)
    runs = str((Path(runs_dir).expanduser() if runs_dir else default_runs_dir()).resolve())
    time_min = chosen.max_time_min or UNLIMITED_MIN
    return ClusterProfile(
        partition=chosen.name,
        runs_dir=runs,
        max_nodes=len(nodes),
        time_min=time_min,
        gpus_per_node=gpus,
        cpus_per_task=max(1, cpus // max(1, gpus)),
    )


def profile_text(profile: ClusterProfile, description: ClusterDescription) -> str:
    """The profile as YAML, with comments saying where the values came from and what each key means."""
    partition = description.partitions[profile.partition]
    preemptors = description.preemptors.get(profile.partition, [])
    header = [
        f"# Written by `launch cluster init` from what SLURM reported on cluster {description.name or '?'}.",
        f"# Partitions: {', '.join(description.partitions)} (default: {description.default_partition.name}).",
        f"# {profile.partition}: {profile.max_nodes} nodes, {profile.gpus_per_node} GPUs and "
        f"{profile.cpus_per_task * max(1, profile.gpus_per_node)} CPUs per node (the smallest node), time limit "
        f"{'none' if partition.max_time_min is None else f'{partition.max_time_min} min'}.",
        "# Jobs of "
        + (", ".join(preemptors) + " preempt" if preemptors else "no other partition preempt")
        + " this partition's jobs (they get SIGUSR2, checkpoint and requeue).",
    ]
    return "\n".join(header) + "\n" + commented_profile(profile)


def describe_text(description: ClusterDescription) -> str:
    """What the cluster says now, in a few lines (``launch cluster show``)."""
    lines = [f"cluster {description.name or '?'}: {len(description.nodes)} node(s)"]
    for p in description.partitions.values():
        nodes = description.nodes_of(p.name)
        gpus = sorted({n.gpus for n in nodes})
        cpus = sorted({n.cpus for n in nodes})
        limit = "no time limit" if p.max_time_min is None else f"time limit {p.max_time_min} min"
        preempted_by = description.preemptors.get(p.name) or []
        lines.append(
            f"  {p.name}{' (default)' if p.default else ''}: {len(nodes)} nodes, CPUs {cpus}, GPUs {gpus}, "
            f"{limit}" + (f", preempted by {', '.join(preempted_by)}" if preempted_by else "")
        )
    return "\n".join(lines)


def find_cluster(slurm_flags: list[str], partition: str | None) -> tuple[str, ClusterProfile | None, str]:
    """The cluster of ``launch pretrain pcae --nodes 4`` as typed (SLURM flags, no ``--cluster``).

    The profile ``$LAUNCH_CLUSTER`` names, or the one user profile there is; else, where SLURM
    answers, the cluster described as ``launch cluster init`` would describe it, for this
    submission only. Returns (cluster name, that described profile or None, a note for the output).
    """
    from launcher.slurm.profiles import profile_names

    flags = " ".join(slurm_flags)
    user = profile_names(user_only=True)
    if os.environ.get("LAUNCH_CLUSTER"):
        return os.environ["LAUNCH_CLUSTER"], None, ""
    if len(user) == 1:
        return user[0], None, ""
    if len(user) > 1:
        raise ConfigError(
            f"{flags} asks for a SLURM job and there are several cluster profiles ({', '.join(user)})"
            f": pass --cluster NAME, or set LAUNCH_CLUSTER=NAME"
        )
    if slurm_answers():
        description = describe_cluster()
        profile = profile_from(description, partition)
        note = (
            f"# no cluster profile: the cluster was described from what SLURM reports "
            f"(partition {profile.partition}, runs_dir {profile.runs_dir}); "
            f"`launch cluster init NAME` keeps it as a profile\n"
        )
        return description.name or "slurm", profile, note
    raise ConfigError(
        f"{flags} asks for a SLURM job, but there is no cluster profile and no SLURM answers "
        f"on this machine (no working sinfo). Run on the cluster's login node, pass --cluster "
        f"NAME or PATH.yaml, or drop {flags} (or pass --local) to run here"
    )
