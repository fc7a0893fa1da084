"""The embedded default's probe phase: a stop signal ends it at once, and the run is kept."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

from launcher import demo
from launcher.data import DataConfig
from launcher.experiment import experiment_from_dict
from launcher.probe import ProbeConfig, ProbeSet
from tests.helpers import tiny_experiment


@pytest.mark.slow  # a tiny run of 4 steps, then the probe
def test_a_sigterm_while_probing_stops_at_once_and_leaves_no_probe_file(tmp_path: Path, monkeypatch) -> None:
    frames = {"name": "lunarlander", "augment": "none", "num_workers": 0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    raw = tiny_experiment("mae", tmp_path / "unused")
    raw["method"].update({"img_size": 64})
    raw["data"] = {**frames, "root": str(tmp_path / "train"), "generate_frames": 48}
    raw["train"].update({"num_epochs": 1})
    cfg = experiment_from_dict(raw)
    probe_data = DataConfig(
        **{
            **frames,
            "root": str(tmp_path / "probe"),
            "generate_frames": 300,
            "generate_seed": 3,
            "generate_agent": "random",
            "generate_max_episode_steps": 40,
        }
    )
    shown = demo.DemoConfig(probe=ProbeConfig(data=probe_data, targets=(0, 1, 4), pixels=8))
    monkeypatch.setattr(demo, "load_demo", lambda: shown)
    calls = []

    def signalled_score(self, encode, device="cpu"):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` during the probe's embedding

    monkeypatch.setattr(ProbeSet, "score", signalled_score)
    out = io.StringIO()
    assert demo.run_demo(cfg, Path("tiny.yaml"), tmp_path / "run", False, out) == 0
    assert calls == [1]  # the first signal stopped the probe: no second encoder was probed
    assert "stopped by SIGTERM while probing" in out.getvalue()
    assert not (tmp_path / "run" / "probe.json").exists() and not (tmp_path / "run" / "linprobe").exists()
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the pretraining is kept for the rerun


def test_the_verdict_says_in_words_whether_pretraining_helped() -> None:
    assert demo.verdict(0.10, 0.02).startswith("Pretraining helped")
    assert demo.verdict(-0.10, 0.02).startswith("Pretraining made the encoder worse")
    assert demo.verdict(0.01, 0.02).startswith("Pretraining made no clear difference")
    assert "No spread over seeds is known" in demo.verdict(0.05, 0.0)
