"""launch: pretraining image encoders on this machine or a SLURM cluster (the ``launch`` command)."""

from __future__ import annotations

DISTRIBUTION = "launch-encoders"  # the name pip knows the project by (pyproject.toml)


def package_version() -> str:
    """The installed distribution's version, or a note that this checkout is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed: run from a checkout; `pip install -e .` records a version)"
