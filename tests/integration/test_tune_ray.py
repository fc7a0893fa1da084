"""A real local Ray sweep: killed, then re-run, finishes only what is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_SWEEP


def _terminated_in_state(sweep_dir: Path) -> int:
    """Trials the driver's own experiment state records as finished (what a restore trusts)."""
    return sum(p.read_text().count("TERMINATED") for p in sweep_dir.glob("experiment_state-*.json"))


def _results(sweep_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sweep_dir.glob("*/result.json") if p.read_text().strip()}


# Loaded by every Python process of the test's sweep (PYTHONPATH): the ae_iffp trial starts only once
# the file $LAUNCH_TEST_GATE exists. So the first run is killed with exactly one trial finished, however
# fast the machine is; the test creates the file before the second run.
GATE_SITECUSTOMIZE = """
import importlib.abc
import importlib.util
import os
import sys
import time


class GateTrials(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "launcher.studies.ae_losses":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            run_trial = module.run_trial

            def gated(trial, trial_dir, sweep):
                while trial["procedure"] == "ae_iffp" and not os.path.exists(os.environ["LAUNCH_TEST_GATE"]):
                    time.sleep(0.2)
                return run_trial(trial, trial_dir, sweep)

            module.run_trial = gated

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, GateTrials())
"""


@pytest.mark.slow
def test_a_killed_sweep_reruns_only_its_missing_trials(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(TINY_SWEEP)
    command = [
        sys.executable,
        "-m",
        "launcher.cli",
        "tune",
        "ae-losses",
        "--experiment",
        "tiny.yaml",
        "--storage",
        "runs",
    ]
    # Its own Ray temp dir (short: Ray's socket paths are length-limited), so nothing here
    # touches another Ray instance on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="ray-test-", dir="/tmp")
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "sitecustomize.py").write_text(GATE_SITECUSTOMIZE)
    gate = tmp_path / "second-trial-may-run"
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path / 'gate'}:{REPO}",
        "RAY_TMPDIR": ray_tmp,
        "LAUNCH_TEST_GATE": str(gate),
    }
    sweep_dir = tmp_path / "runs" / "tiny"
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240  # a bound for a broken sweep, not a sequence: the gate orders the trials
        # A trial's result.json is written before the driver saves its experiment state; a
        # restore trusts only the latter, so wait for it to record the first trial as finished.
        while not _terminated_in_state(sweep_dir) and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert len(_results(sweep_dir)) == 1, "the first trial never finished"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray daemons it started (its group)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    time.sleep(3)  # Ray's workers exit once their raylet is gone
    done_before = _results(sweep_dir)
    gate.touch()  # the second run may run the ae_iffp trial

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restoring the sweep" in second.stderr
    results = _results(sweep_dir)
    assert len(results) == 2 and len(list(sweep_dir.glob("_trainable_*"))) == 2
    for name, text in done_before.items():
        assert results[name] == text  # the finished trial was not run again
    procedures = {json.loads(t.splitlines()[-1])["config"]["procedure"] for t in results.values()}
    assert procedures == {"ae_iipw", "ae_iffp"}

    report = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "report", str(sweep_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| I-I-PW |" in report.stdout and "| I-F-FP |" in report.stdout
    assert (sweep_dir / "report" / "lunarlander_z8_gamma0.0.png").is_file()
