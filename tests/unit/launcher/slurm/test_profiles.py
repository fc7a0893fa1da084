"""Cluster profiles and the flags that override them."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.slurm import profiles


def test_every_shipped_profile_loads() -> None:
    assert "local-test" in profiles.profile_names()
    for name in profiles.profile_names():
        profiles.load_profile(name)
    profile = profiles.load_profile("local-test")
    assert (profile.partition, profile.max_nodes, profile.runs_dir) == ("debug", 4, "/var/tmp/launch-runs")


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown cluster profile 'nope'; known profiles: .*local-test"):
        profiles.load_profile("nope")


@pytest.mark.parametrize(
    "text, message",
    [
        ("partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\nnodes: 3\n", "unknown key"),
        ("partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: many\n", "time_min must be a int"),
        ("partition: a\nruns_dir: /tmp/runs\nmax_nodes: 2\ntime_min: 5\n", "local to each machine"),
        ("partition: a\nruns_dir: runs\nmax_nodes: 2\ntime_min: 5\n", "absolute path"),
        ("runs_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\n", "partition"),
    ],
)
def test_bad_profiles_are_rejected(tmp_path: Path, monkeypatch, text: str, message: str) -> None:
    monkeypatch.setattr(profiles, "CLUSTERS_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        profiles.load_profile("bad")


def test_flags_override_the_profile() -> None:
    profile = profiles.load_profile("local-test")
    res = profiles.resolve_resources(
        "local-test", profile, nodes=3, gpus_per_node=2, partition="high", time_min=profiles.parse_time("1:30:00")
    )
    assert (res.nodes, res.tasks_per_node, res.partition, res.time_min) == (3, 2, "high", 90)
    assert profiles.resolve_resources("local-test", profile).tasks_per_node == 1  # CPU: one task per node
    with pytest.raises(ConfigError, match="max_nodes: 4"):
        profiles.resolve_resources("local-test", profile, nodes=5)
    assert profiles.parse_time("2-00:00:00") == 2880 and profiles.parse_time("45") == 45
