"""`launch cluster init` against the real local cluster, with its default settings and with others.

Nothing in the code may assume a node or partition name: the cluster is restarted with other
node names, partition names, node count and ports, and `launch pretrain pcae --nodes 3` (no
--cluster, no profile) must find it and run there. The default cluster is restored afterwards.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.slurm.records import read_launch
from tests.helpers import REPO, launch, make_image_folder, tiny_experiment
from tests.integration.slurm_helpers import TERMINAL, wait_for

pytestmark = pytest.mark.slurm

OTHER = {
    "LOCAL_SLURM_NODES": "3",
    "LOCAL_SLURM_NODE_PREFIX": "worker",
    "LOCAL_SLURM_PARTITIONS": "batch,urgent",
    "LOCAL_SLURM_PORT_BASE": "25800",
    "LOCAL_SLURM_CLUSTER": "othertest",
}


def cluster_script(action: str, settings: dict[str, str] | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCAL_SLURM_")}
    subprocess.run(
        ["bash", str(REPO / "slurm" / "local-cluster.sh"), action],
        env={**env, **(settings or {})},
        check=True,
        capture_output=True,
        timeout=600,
    )


def tiny_pcae(folder: Path) -> Path:
    experiment = folder / "pcae.yaml"
    cfg = tiny_experiment("pcae", make_image_folder(folder / "images"), train={"num_epochs": 1})
    cfg["train"]["global_batch_size"] = 12  # divides over 2 and 3 ranks
    cfg["train"]["micro_batch_size"] = 2
    experiment.write_text(yaml.safe_dump(cfg))
    return experiment


def test_cluster_init_describes_each_cluster_and_pretrain_nodes_runs_there(
    cluster, shared_tmp: Path, monkeypatch
) -> None:
    experiment = tiny_pcae(shared_tmp)
    profiles = shared_tmp / "profiles"
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(profiles))
    monkeypatch.delenv("LAUNCH_CLUSTER", raising=False)
    assert launch(f"cluster init here --runs-dir {shared_tmp / 'runs-here'}") == 0
    here = yaml.safe_load((profiles / "here.yaml").read_text())
    assert (here["partition"], here["max_nodes"], here["gpus_per_node"]) == ("debug", 4, 0)
    assert launch(f"cluster init here --runs-dir {shared_tmp}") == 2  # refuses to overwrite without --force
    run = shared_tmp / "runs-here" / "two-nodes"
    assert launch(f"pretrain pcae --cluster here --nodes 2 --time 10 --experiment {experiment} --run-dir {run}") == 0
    assert wait_for(run, TERMINAL, 180)["state"] == "COMPLETED"

    try:
        cluster_script("down")
        cluster_script("up", OTHER)
        assert launch(f"cluster init other --runs-dir {shared_tmp / 'runs-other'}") == 0
        other = yaml.safe_load((profiles / "other.yaml").read_text())
        assert (other["partition"], other["max_nodes"]) == ("batch", 3)
        # No profile at all, no --cluster: the cluster is described on the spot.
        monkeypatch.setenv("LAUNCH_CLUSTERS", str(shared_tmp / "no-profiles"))
        monkeypatch.setenv("HOME", str(shared_tmp / "home"))
        run = shared_tmp / "home" / "launch-runs" / "three-nodes"
        assert launch(f"pretrain pcae --nodes 3 --time 10 --experiment {experiment} --run-dir {run}") == 0
        status = wait_for(run, TERMINAL, 180)
        assert status["state"] == "COMPLETED", status
        assert read_launch(run)["resources"]["partition"] == "batch"
        job = read_launch(run)["jobs"][-1]["job_id"]
        nodes = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", job], capture_output=True, text=True
        ).stdout.split()
        assert nodes == ["worker[1-3]"], nodes
    finally:
        cluster_script("down", OTHER)
        cluster_script("up")


def test_without_slurm_the_nodes_flag_says_to_run_here_with_local(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo here
    monkeypatch.setenv("LAUNCH_CLUSTERS", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert launch("pretrain pcae --nodes 4 --dry-run") == 2
    err = capsys.readouterr().err
    assert "no SLURM answers on this machine" in err and "--local" in err
    assert launch("cluster init mine") == 2
    assert "on PATH: this machine does not see a SLURM cluster" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
