"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary folder outside /tmp, which SLURM runs refuse as node-local; removed afterwards."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="launch-test-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
