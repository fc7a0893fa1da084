"""Studies: a grid of runs, a trial that trains and judges one point, and a report.

``ae_losses`` (the autoencoder loss comparison, ``launch tune ae-losses``) runs its grid through
the Ray Tune driver (``launcher/tune``). Studies are found by name, so the SLURM job that runs
a sweep (``launcher.slurm.jobs.RaySweepJob``) needs only that name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from launcher.errors import ConfigError

STUDIES = {"ae-losses": "launcher.studies.ae_losses"}


def get_study(name: str) -> ModuleType:
    try:
        return importlib.import_module(STUDIES[name])
    except KeyError:
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(STUDIES)}") from None
