"""Cluster profiles: where ``--cluster NAME`` is looked up, bad profiles, and the flags that override them."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import ConfigError
from launcher.slurm import profiles
from tests.helpers import launch

GOOD = "partition: gpu\nruns_dir: /shared/runs\nmax_nodes: 8\ntime_min: 120\ngpus_per_node: 4\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A home of its own, so that profiles of the machine's user play no part."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAUNCH_CLUSTERS", raising=False)
    monkeypatch.delenv("LAUNCH_CLUSTER", raising=False)
    return tmp_path / "home"


def test_every_shipped_profile_loads(home: Path) -> None:
    assert "local-test" in profiles.profile_names()
    for name in profiles.profile_names():
        profiles.load_profile(name)
    profile = profiles.load_profile("local-test")
    assert (profile.partition, profile.max_nodes, profile.runs_dir) == ("debug", 4, "/var/tmp/launch-runs")


def test_profiles_are_found_in_launch_clusters_then_home_then_shipped(home: Path, tmp_path: Path, monkeypatch) -> None:
    mine = home / ".config" / "launch" / "clusters"
    mine.mkdir(parents=True)
    (mine / "local-test.yaml").write_text(GOOD)  # the user's own profile shadows the shipped one
    assert profiles.load_profile("local-test").partition == "gpu"
    team = tmp_path / "team"
    team.mkdir()
    (team / "local-test.yaml").write_text(GOOD.replace("partition: gpu", "partition: team"))
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(team))
    assert profiles.load_profile("local-test").partition == "team"
    assert profiles.profile_dirs()[:2] == [team, mine]
    (tmp_path / "elsewhere.yaml").write_text(GOOD.replace("partition: gpu", "partition: file"))
    assert profiles.load_profile(str(tmp_path / "elsewhere.yaml")).partition == "file"
    assert profiles.profile_name(str(tmp_path / "elsewhere.yaml")) == "elsewhere"


def test_unknown_profile_says_where_it_looked_and_how_to_write_one(home: Path) -> None:
    with pytest.raises(ConfigError) as error:
        profiles.load_profile("nope")
    message = str(error.value)
    assert f"looked in {home / '.config' / 'launch' / 'clusters'}, " in message
    assert "known profiles: local-test" in message and "launch cluster init nope" in message


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\nnodes: 3\n",
            r"key\(s\) nodes; it allows: acc",
        ),
        ("partition: a\nruns_dir: /shared/runs\nmax_nodes: 2\ntime_min: many\n", "time_min must be a int"),
        ("partition: a\nruns_dir: /tmp/runs\nmax_nodes: 2\ntime_min: 5\n", "local to each machine"),
        ("partition: a\nruns_dir: runs\nmax_nodes: 2\ntime_min: 5\n", "absolute path"),
        ("runs_dir: /shared/runs\nmax_nodes: 2\ntime_min: 5\n", "partition"),
        ("partition: a\nruns_dir: [/shared\n", "is not valid YAML: .*line 3"),
        ("", "is empty"),
    ],
)
def test_bad_profiles_are_rejected_naming_the_file_and_the_key(
    home: Path, tmp_path: Path, monkeypatch, text: str, message: str
) -> None:
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path))
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        profiles.load_profile("bad")
    assert str(tmp_path / "bad.yaml") in str(error.value)


def test_flags_override_the_profile(home: Path) -> None:
    profile = profiles.load_profile("local-test")
    res = profiles.resolve_resources(
        "local-test", profile, nodes=3, gpus_per_node=2, partition="high", time_min=profiles.parse_time("1:30:00")
    )
    assert (res.nodes, res.tasks_per_node, res.partition, res.time_min) == (3, 2, "high", 90)
    assert profiles.resolve_resources("local-test", profile).tasks_per_node == 1  # CPU: one task per node
    with pytest.raises(ConfigError, match="max_nodes: 4"):
        profiles.resolve_resources("local-test", profile, nodes=5)
    assert profiles.parse_time("2-00:00:00") == 2880 and profiles.parse_time("45") == 45


# ------------------------------------------------- --nodes without --cluster: which cluster?


def dry_run(flags: str, capsys) -> tuple[int, str, str]:
    code = launch(f"pretrain pcae {flags} --dry-run data.root=/ --run-dir /var/tmp/launch-never/x")
    out, err = capsys.readouterr()
    return code, out, err


def test_nodes_alone_uses_the_one_profile_of_ones_own(home: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM here: the profile alone decides
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path))
    (tmp_path / "mine.yaml").write_text(GOOD)
    code, out, err = dry_run("--nodes 2", capsys)
    assert code == 0, err
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --nodes=2" in out
    (tmp_path / "other.yaml").write_text(GOOD)
    code, out, err = dry_run("--nodes 2", capsys)
    assert code == 2 and "several cluster profiles (mine, other): pass --cluster NAME" in err
    monkeypatch.setenv("LAUNCH_CLUSTER", "other")
    assert dry_run("--nodes 2", capsys)[0] == 0


def test_nodes_alone_without_profile_or_slurm_names_the_ways_out(home: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = dry_run("--nodes 2", capsys)
    assert code == 2 and out == ""
    assert "no cluster profile and no SLURM answers on this machine" in err and "--local" in err


def test_cluster_show_prints_profiles_and_refuses_a_malformed_one(
    home: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path))
    (tmp_path / "mine.yaml").write_text(GOOD)
    assert launch("cluster show mine") == 0
    out = capsys.readouterr().out
    assert f"# mine: {tmp_path / 'mine.yaml'}" in out and "partition: gpu" in out
    assert "no SLURM answers on this machine" in out
    (tmp_path / "broken.yaml").write_text(GOOD + "gpus: 4\n")
    assert launch("cluster show broken") == 2
    assert "unknown key(s) gpus; it allows" in capsys.readouterr().err


def test_cluster_init_without_slurm_exits_2_and_writes_nothing(home: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert launch("cluster init mine") == 2
    assert "no `scontrol` on PATH: this machine does not see a SLURM cluster" in capsys.readouterr().err
    assert not (home / ".config" / "launch" / "clusters").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", "mine.yaml", "new\nline", ""])
def test_cluster_init_refuses_a_name_that_is_not_one_file_of_the_profile_folder(
    tmp_path: Path, monkeypatch, capsys, name: str
) -> None:
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path / "profiles"))
    monkeypatch.setenv("PATH", "/nonexistent")  # asking SLURM is never reached
    assert launch("cluster init", name) == 2
    assert "must be letters, digits" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cluster_init_without_a_home_names_home_and_launch_clusters(tmp_path: Path) -> None:
    import os

    from tests.helpers import launch_as_another_user

    if os.geteuid() != 0:
        pytest.skip("a user without a home in the password database needs root to become")
    # HOME unset and uid 54321 in no password database: Python cannot tell where ~ is.
    result = launch_as_another_user("cluster", "init", "mine", env={"PATH": "/usr/bin:/bin"}, uid=54321)
    assert result.returncode == 2, result.stderr
    assert "no home directory: HOME is unset, and this user has none in the password database" in result.stderr
    assert "LAUNCH_CLUSTERS" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("launch_clusters", [False, True])
def test_cluster_init_with_an_empty_home_writes_nothing_relative_to_here(
    tmp_path: Path, monkeypatch, capsys, launch_clusters: bool
) -> None:
    # HOME="" made ~ the working directory's "" and the default runs_dir /launch-runs.
    monkeypatch.setenv("HOME", "")
    monkeypatch.chdir(tmp_path)
    if launch_clusters:
        monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path / "profiles"))
    else:
        monkeypatch.delenv("LAUNCH_CLUSTERS", raising=False)
    assert launch("cluster init mine") == 2
    err = capsys.readouterr().err
    assert "no home directory: HOME is '', not an absolute path" in err
    assert ("--runs-dir" if launch_clusters else "LAUNCH_CLUSTERS") in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("read_only", ["LAUNCH_CLUSTERS", "HOME"])
def test_cluster_init_into_a_folder_this_user_cannot_write_asks_slurm_nothing(shared_tmp: Path, read_only: str) -> None:
    import os

    from tests.helpers import launch_as_another_user

    shared_tmp.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(shared_tmp), "LAUNCH_CLUSTERS": str(shared_tmp / "profiles")}
    if read_only == "HOME":
        del env["LAUNCH_CLUSTERS"]
    else:
        (shared_tmp / "profiles").mkdir(mode=0o755)
    if os.geteuid() != 0:  # root runs it as nobody; anyone else, in folders made read-only
        for folder in (shared_tmp, *shared_tmp.iterdir()):
            folder.chmod(0o555)
    result = launch_as_another_user("cluster", "init", "mine", env=env)
    folder = shared_tmp / "profiles" if read_only == "LAUNCH_CLUSTERS" else shared_tmp / ".config/launch/clusters"
    nearest = shared_tmp / "profiles" if read_only == "LAUNCH_CLUSTERS" else shared_tmp
    assert result.returncode == 2, result.stderr
    assert f"cannot write the profile {folder / 'mine.yaml'}: {nearest} is not writable by this user" in result.stderr
    assert "Set LAUNCH_CLUSTERS to a folder you can write" in result.stderr and "Traceback" not in result.stderr
    assert "sinfo" not in result.stderr and "scontrol" not in result.stderr  # refused before SLURM is asked
    assert sorted(p.name for p in shared_tmp.iterdir()) == (["profiles"] if read_only == "LAUNCH_CLUSTERS" else [])
