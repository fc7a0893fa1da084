"""Waiting on jobs of the real local SLURM cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from launcher.slurm import control

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_for(run: Path, states: tuple[str, ...], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = control.run_status(run)
        if status["state"] in states:
            return status
        time.sleep(1.0)
    log = control.log_path(run, 0)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    pytest.fail(f"run {run} not in {states} after {timeout_s} s: {control.run_status(run)}\n{tail}")
