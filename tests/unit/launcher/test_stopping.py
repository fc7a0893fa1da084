"""Stop signals: held from a SLURM task's first instruction until its handlers exist, then delivered."""

from __future__ import annotations

import signal
import subprocess
import sys

from launcher.stopping import held_signals_python

# A job body in miniature: it says it has started, waits (torch importing), installs its handler,
# releases what was held, and reports what it received.
BODY = """
import signal, sys, time
from launcher.stopping import release_held_signals
print("started", flush=True)
sys.stdin.readline()  # the test signals us now, before there is a handler
received = []
signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signal.Signals(signum).name))
release_held_signals()
print("received", received, flush=True)
"""


def _start(command: str) -> subprocess.Popen:
    process = subprocess.Popen(
        f"exec {command} -c '{BODY}'", shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "started"
    return process


def test_a_signal_before_the_handler_is_held_and_delivered_to_it() -> None:
    process = _start(held_signals_python(sys.executable))
    process.send_signal(signal.SIGUSR2)
    out, _ = process.communicate("go\n", timeout=60)
    assert process.returncode == 0 and "received ['SIGUSR2']" in out


def test_without_holding_the_same_signal_kills_the_task() -> None:
    # What every SLURM task met before: USR2's default action ends the process.
    process = _start(sys.executable)
    process.send_signal(signal.SIGUSR2)
    process.communicate("go\n", timeout=60)
    assert process.returncode == -signal.SIGUSR2
