"""What ``launch cluster init`` makes of SLURM's answers (the live cluster: tests/integration/test_cluster_init.py)."""

from __future__ import annotations

import pytest
import yaml

from launcher.config import field_comments
from launcher.slurm import discover
from launcher.slurm.discover import ClusterDescription, Node, Partition
from launcher.slurm.profiles import ClusterProfile, SlurmError, parse_profile


def test_slurm_times_gres_and_records_parse() -> None:
    assert discover.parse_minutes("UNLIMITED") is None
    assert [discover.parse_minutes(t) for t in ("30", "1:00:00", "2-00:00:00", "0:10:30")] == [30, 60, 2880, 11]
    assert discover.gpus_in("gpu:4") == 4 and discover.gpus_in("gpu:a100:8(S:0-1)") == 8
    assert discover.gpus_in("(null)") == 0 and discover.gpus_in("gpu:a100:2,gpu:v100:2,shard:4") == 4
    records = discover.parse_records("NodeName=g1 CPUTot=64 Gres=gpu:8\n\nNodeName=g2 CPUTot=32 Gres=(null)\n")
    assert records == [
        {"NodeName": "g1", "CPUTot": "64", "Gres": "gpu:8"},
        {"NodeName": "g2", "CPUTot": "32", "Gres": "(null)"},
    ]


def gpu_cluster() -> ClusterDescription:
    partitions = {
        "cpu": Partition("cpu", ["c1", "c2"], default=True, max_time_min=None),
        "gpu": Partition("gpu", ["g1", "g2", "g3"], default=False, max_time_min=2880, preempt_mode="REQUEUE"),
        "urgent": Partition("urgent", ["g1"], default=False, max_time_min=60, priority_tier=10),
    }
    nodes = {
        "c1": Node("c1", 16, 64000, 0),
        "c2": Node("c2", 16, 64000, 0),
        "g1": Node("g1", 64, 512000, 8),
        "g2": Node("g2", 64, 512000, 8),
        "g3": Node("g3", 48, 512000, 4),
    }
    return ClusterDescription(partitions, nodes, "big", preemptors={"gpu": ["urgent"], "cpu": [], "urgent": []})


def test_profile_from_takes_the_smallest_node_of_the_partition(tmp_path) -> None:
    description = gpu_cluster()
    profile = discover.profile_from(description, "gpu", "/var/tmp/launch-never/runs")
    assert (profile.partition, profile.max_nodes, profile.time_min) == ("gpu", 3, 2880)
    assert (profile.gpus_per_node, profile.cpus_per_task) == (4, 12)  # g3: 48 CPUs over 4 GPUs
    default = discover.profile_from(description, runs_dir="/var/tmp/launch-never/runs")
    assert (default.partition, default.gpus_per_node, default.cpus_per_task) == ("cpu", 0, 16)
    assert default.time_min == discover.UNLIMITED_MIN  # no time limit: a day by default
    text = discover.profile_text(profile, description)
    assert "Jobs of urgent preempt this partition's jobs" in text
    assert yaml.safe_load(text)["partition"] == "gpu"  # the comments leave valid YAML
    with pytest.raises(SlurmError, match="partition 'a100' does not exist on this cluster; partitions: cpu, gpu"):
        discover.profile_from(description, "a100")


def test_describe_text_lists_every_partition() -> None:
    text = discover.describe_text(gpu_cluster())
    assert "cluster big: 5 node(s)" in text
    assert "  cpu (default): 2 nodes, CPUs [16], GPUs [0], no time limit" in text
    assert "  gpu: 3 nodes, CPUs [48, 64], GPUs [4, 8], time limit 2880 min, preempted by urgent" in text


def test_the_written_profile_says_what_each_key_means_and_loads(tmp_path) -> None:
    profile = discover.profile_from(gpu_cluster(), "gpu", "/var/tmp/launch-never/runs")
    path = tmp_path / "big.yaml"
    path.write_text(discover.profile_text(profile, gpu_cluster()))
    assert parse_profile(path) == profile  # through the real loader, comments and all
    lines = path.read_text().splitlines()
    for key, meaning in field_comments(ClusterProfile).items():
        line = next(i for i, text in enumerate(lines) if text.startswith(f"{key}:"))
        assert lines[line - 1] == f"# {meaning}"
