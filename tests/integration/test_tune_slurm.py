"""A sweep on a Ray cluster started inside a two-node job of the real local SLURM cluster."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from launcher.slurm import control
from launcher.slurm.records import read_launch
from launcher.tune.driver import RAY_NODES, read_trials
from launcher.tune.ray_cluster import ray_temp_dir
from tests.helpers import TINY_SWEEP, launch
from tests.integration.slurm_helpers import TERMINAL, wait_for

pytestmark = pytest.mark.slurm


def job_processes(job_id: str) -> list[str]:
    """Processes still alive that the job started: they carry its SLURM_JOB_ID."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {command[:200]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def run_sweep_job(storage: Path) -> tuple[str, dict]:
    """Submit the tiny sweep as a 2-node job and wait for it to end; its job id and status."""
    command = "tune ae-losses --experiment tiny.yaml --cluster local-test --nodes 2 --time 10 --storage"
    assert launch(command, storage) == 0
    job = read_launch(storage / "tiny")["jobs"][-1]["job_id"]
    try:
        return job, wait_for(storage / "tiny", TERMINAL, 240)
    finally:
        subprocess.run(["scancel", job], capture_output=True, check=False)


def test_a_sweep_runs_on_a_ray_cluster_started_in_a_two_node_job(cluster, shared_tmp: Path, monkeypatch) -> None:
    # Each trial needs all 4 CPUs of a node, so the two trials can only run on different nodes.
    (shared_tmp / "tiny.yaml").write_text(TINY_SWEEP.replace("cpus_per_trial: 2", "cpus_per_trial: 4"))
    monkeypatch.chdir(shared_tmp)  # the job's working directory: the sweep's relative data paths
    storage = shared_tmp / "runs"
    sweep = storage / "tiny"
    start = time.monotonic()
    job, status = run_sweep_job(storage)
    assert status["state"] == "COMPLETED", (status, control.log_path(sweep, 1).read_text()[-3000:])
    print(f"submit -> COMPLETED: {time.monotonic() - start:.1f} s")

    trials = read_trials(sweep)
    assert sorted(t["config"]["procedure"] for t in trials) == ["ae_iffp", "ae_iipw"]
    nodes = json.loads((sweep / RAY_NODES).read_text())["nodes"]
    assert len(nodes) == 2 and all(n["cpus"] == 4 for n in nodes)
    node_list = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "NodeList", "-j", job], capture_output=True, text=True
    ).stdout.strip()
    job_nodes = subprocess.run(
        ["scontrol", "show", "hostnames", node_list], capture_output=True, text=True
    ).stdout.split()
    assert {n["hostname"] for n in nodes} == set(job_nodes)  # a Ray node on each node of the job
    assert {t["hostname"] for t in trials} == set(job_nodes)  # one trial on each
    assert [a["outcome"] for a in read_launch(sweep)["attempts"]] == ["finished"]

    # Every task stopped its own Ray node: nothing of the job is left, nor its Ray temp dirs.
    deadline = time.monotonic() + 20
    while job_processes(job) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not job_processes(job)
    assert not any(ray_temp_dir(f"{job}-0-{node}").exists() for node in (0, 1))
    assert "stopped the Ray node of this task" in control.log_path(sweep, 1).read_text()

    # The same command again restores the sweep: its finished trials are not run again.
    results = {p: p.read_text() for p in sweep.glob("*/result.json")}
    again, status = run_sweep_job(storage)
    assert status["state"] == "COMPLETED" and again != job, status
    assert "restoring the sweep" in control.log_path(sweep, 0).read_text()
    assert {p: p.read_text() for p in sweep.glob("*/result.json")} == results
    assert [a["outcome"] for a in read_launch(sweep)["attempts"]] == ["finished", "finished"]
    print(f"and restored: {time.monotonic() - start:.1f} s")
