"""Signalling a job from the login node: one signal, whatever scancel would retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.slurm import control
from launcher.slurm.profiles import SlurmError

# SLURM 22.05's scancel when slurmctld answers "Job can not be altered now" (as it does for a task
# of a job array with pending tasks, after signalling it): it asks again after 5 s, 6 s, ...
RETRYING_SCANCEL = """#!/bin/sh
for i in 0 1 2; do
    echo "$*" >> {calls}
    echo "scancel: Job is in transitional state, retrying" >&2
    sleep 5
done
"""
FAILING_SCANCEL = """#!/bin/sh
echo "$*" >> {calls}
echo "scancel: Signal 12 to job 99" >&2
echo "scancel: error: Kill job error on job id 99: Invalid job id specified" >&2
exit 1
"""


def fake_scancel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """Put a fake ``scancel`` first on PATH; return the file where it writes its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "scancel").write_text(script.format(calls=calls))
    (bin_dir / "scancel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return calls


def test_a_signal_is_sent_once_even_when_scancel_would_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_scancel(tmp_path, monkeypatch, RETRYING_SCANCEL)
    control.send_signal("15_0", "USR2")  # returns once scancel has exited: it can write no more calls
    # Left alone, the fake would have asked three times; stopped at its first retry, it asked once.
    assert calls.read_text().splitlines() == ["--verbose --signal=USR2 15_0"]


def test_a_signal_scancel_refuses_is_an_error_that_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_scancel(tmp_path, monkeypatch, FAILING_SCANCEL)
    with pytest.raises(SlurmError, match="Invalid job id specified"):
        control.send_signal("99", "USR2")
