"""Stop at the next step boundary: what Ctrl-C, SIGTERM and SLURM's SIGUSR2 ask of a run.

A signal handler only sets a flag (``StopRequest``); the trainer all-reduces it once per step,
so every rank checkpoints at the same step and returns. This module imports nothing heavy, so
a SLURM job installs its handlers before torch is even imported.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class StopRequest:
    """Set by a signal handler: the run checkpoints at the next step boundary and returns.

    ``signal`` is the name of the first signal received: the one that decides what happens
    next (a SLURM job requeues itself only after SIGUSR2).
    """

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None


def install_stop_handlers(
    stop: StopRequest, signals: Iterable[signal.Signals], describe: dict[str, str] | None = None
) -> None:
    """Make each of ``signals`` request a stop; ``describe`` maps a signal name to the warning to log.

    After the first signal, SIGINT interrupts at once (the usual second Ctrl-C); other signals
    only log that the run is already stopping.
    """

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.requested:
            log.info("received %s while stopping on %s", name, stop.signal)
            return
        stop.signal = name
        log.warning((describe or {}).get(name, f"received {name}: checkpointing at the next step boundary"))
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in signals:
        signal.signal(sig, handler)


# What a SLURM task holds back from the moment its interpreter starts until its job body has its
# handlers: without it, a preemption's USR2 in the seconds Python and submitit take to start
# kills the task (the default action) with nothing recorded and no requeue. Blocked signals stay
# pending across exec and are delivered the moment they are released.
# What stops a run on this machine: Ctrl-C, SIGTERM (kill, `launch cancel`) and SIGUSR2 (as SLURM sends).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
HELD_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def held_signals_python(python: str) -> str:
    """A command that runs ``python`` with HELD_SIGNALS blocked (submitit's ``python`` parameter).

    A bare interpreter (``-S``, no site imports) blocks them and replaces itself by ``python``, so
    the unguarded window is that interpreter's start-up, milliseconds instead of seconds.
    """
    code = (
        "import os,signal,sys;"
        f"signal.pthread_sigmask(signal.SIG_BLOCK,({','.join(f'signal.{s.name}' for s in HELD_SIGNALS)}));"
        "os.execv(sys.argv[1],sys.argv[1:])"
    )
    return f"{shlex.quote(python)} -S -c {shlex.quote(code)} {shlex.quote(python)}"


def release_held_signals() -> None:
    """Deliver what HELD_SIGNALS held back, to the handlers now installed (a no-op when none was held)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)


class Interrupted(Exception):
    """A stop signal arrived while there was no step boundary to stop at (data generation, say)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stopped by {name}")
        self.signal = name


@contextlib.contextmanager
def signals_interrupt(signals: Iterable[signal.Signals]) -> Iterator[None]:
    """Within the block, each of ``signals`` raises ``Interrupted``: work that cannot stop at a step
    boundary unwinds and cleans up (a generator removes its partial output). Restores the handlers."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
