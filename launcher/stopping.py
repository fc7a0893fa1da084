"""Stop at the next step boundary: what Ctrl-C, SIGTERM and SLURM's SIGUSR2 ask of a run.

A signal handler only sets a flag (``StopRequest``); the trainer all-reduces it once per step,
so every rank checkpoints at the same step and returns. This module imports nothing heavy, so
a SLURM job installs its handlers before torch is even imported.
"""

from __future__ import annotations

import contextlib
import logging
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
