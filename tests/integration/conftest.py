"""Integration tests: the real local SLURM cluster, real Ray, the command line end to end.

Every test here is marked ``slow``, so ``pytest -m "not slow and not slurm"`` is the unit suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no sinfo/sbatch on PATH"
    out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not out.stdout.strip():
        return f"sinfo failed: {out.stderr.strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="session")
def cluster() -> None:
    """The local SLURM cluster (`bash slurm/local-cluster.sh up`): skip without it, except under CI=true.

    CI starts the cluster first (see .ci/run), so a missing cluster there is a broken CI, not a
    reason to skip.
    """
    problem = cluster_problem()
    if problem:
        message = f"the local SLURM cluster is not up ({problem}); start it: bash slurm/local-cluster.sh up"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
